"""The arrows of the house: unlearn (the library) <- raytasks (Ray, MLflow) <- analysis (reports, benchmarks).

Every import counts, at module level or inside a function; only `if TYPE_CHECKING:` blocks (annotations, never run)
are left out. Two entry points wire the layers together and may import above their own package: `unlearn.cli`, the
`unlearn` console script (DESIGN section 3 places it in the library; nothing imports it), and `raytasks.sweep`, the
script users hand to `ray submit`, which renders the report when the sweep ends.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"unlearn": 0, "raytasks": 1, "analysis": 2}
COMPOSITION_ROOT = "unlearn.cli"
ENTRY_POINTS = (COMPOSITION_ROOT, "raytasks.sweep")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in LAYERS for p in (ROOT / package).rglob("*.py")}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a `from package import submodule` names the submodule)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = _type_checking_lines(tree)
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_no_import_runs_back_up_the_layers():
    upward = sorted(f"{source} -> {target}" for source, targets in import_graph().items() for target in targets
                    if source not in ENTRY_POINTS and _layer(target) > _layer(source))
    assert not upward, upward


def test_nothing_imports_the_console_script():
    importers = sorted(source for source, targets in import_graph().items() if COMPOSITION_ROOT in targets)
    assert not importers, importers


def test_no_circle_among_files():
    graph = import_graph()
    # Tarjan's strongly connected components: a component of more than one file is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not circles, circles


def test_the_library_never_imports_ray_or_mlflow():
    offenders = []
    for name, path in _modules().items():
        if not name.startswith("unlearn.") or name == COMPOSITION_ROOT:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name}: {n}" for n in names if n.split(".")[0] in ("ray", "mlflow")]
    assert not offenders, offenders


def test_the_graph_sees_function_level_imports(tmp_path):
    """The test can fail: an import inside a function is an arrow too (the old export -> pipeline -> stages ->
    export circle was hidden in function bodies)."""
    graph = import_graph()
    assert "unlearn.config" in graph["unlearn.pipeline"]
    source = (ROOT / "unlearn" / "export.py").read_text()
    tree = ast.parse(source)
    inner = [n for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
             for n in ast.walk(f) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("unlearn.")]
    assert inner, "export.py has no function-level import of the library left to check"
    assert all(n.module in graph["unlearn.export"] or any(t.startswith(f"{n.module}.") for t in graph["unlearn.export"])
               for n in inner)


def test_the_console_script_and_the_decoding_workers_import_no_torch():
    """`unlearn prepare` decodes in a forkserver pool whose server imports the process's __main__ (the console
    script) and `unlearn.data.store`: neither may pull in torch (a second and ~300 MB per server)."""
    import subprocess
    import sys

    code = "import sys, unlearn.cli, unlearn.data.store; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-1000:]


def test_no_module_of_a_script_folder_shadows_an_installed_package():
    """`raytasks/sweep.py` and `analysis/bench.py` run as scripts (`ray submit`, `python analysis/bench.py`), which puts
    their folder first on sys.path: a module there named like an installed package (`requests.py`, `outcome.py`)
    would be imported in its place by MLflow, Ray and their dependencies."""
    import importlib.util

    for folder in ("raytasks", "analysis"):
        for path in sorted((ROOT / folder).glob("*.py")):
            spec = importlib.util.find_spec(path.stem) if path.stem != "__init__" else None
            assert spec is None, f"{folder}/{path.name} shadows the installed {spec.origin}"
