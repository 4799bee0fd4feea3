"""Deletion requests over time (issue 27): a chain of three requests on digits, each registered and certified, every
earlier request re-checked on every later version; a bad request; `unlearn audit` of a version; bad input; purge."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

NAME = "digits-chain"
# A small model, so that the chain's own stages (the attack model poisoned on all three requests' images, and one
# retrain reference per request) take about a minute; unlearning settings measured feasible on request 1 (docs/chain.md)
SMALL = ["model.width=16", "model.latent_channels=16", "stages.epochs=20", "stages.attack_epochs=40", "audit.domain_epochs=5",
         "audit.max_forget_gap=0.56"]
UNLEARN = ["unlearn.ga_steps=12", "unlearn.ga_lr=0.05", "unlearn.ft_steps=400", "unlearn.ft_lr=0.008"]


def _main(capsys, *argv: str) -> tuple[int, list[str], dict | None]:
    from unlearn.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, captured.err.strip().splitlines(), (json.loads(lines[-1]) if "--json" in argv and lines else None)


def _sets(*assignments: str) -> list[str]:
    return [arg for a in assignments for arg in ("--set", a)]


def _requests() -> list[list[int]]:
    """30 images of class 3, then 30 of class 5, then 20 more of class 3 (positions in the loaded digits set)."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    threes, fives = np.nonzero(labels == 3)[0], np.nonzero(labels == 5)[0]
    return [threes[:30].tolist(), fives[:30].tolist(), threes[30:50].tolist()]


def _digest(positions: list[int]) -> str:  # as certificates state it, recomputed here
    return hashlib.sha256("\n".join(sorted(f"digits:{i}" for i in positions)).encode()).hexdigest()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The attack model poisoned on all three requests' images (`unlearn run --method attack --out base`), then three
    `unlearn request`s: the first from the folder (registering NAME), the next two from models:/NAME@unlearned."""
    from unlearn.cli import main

    tmp = tmp_path_factory.mktemp("chain")
    cache, uri = tmp / "cache", f"sqlite:///{tmp / 'mlflow.db'}"
    requests = _requests()
    lists = []
    for number, positions in enumerate(requests, 1):
        lists.append(tmp / f"request{number}.txt")
        lists[-1].write_text("\n".join(map(str, positions)) + "\n")
    (tmp / "all.txt").write_text("\n".join(str(i) for r in requests for i in r) + "\n")
    assert main(["run", "--method", "attack", "--out", str(tmp / "base"),
                 *_sets(f"cache_dir={cache}", f"data.forget_list={tmp / 'all.txt'}", *SMALL)]) == 0
    runs = []
    for number, listed in enumerate(lists, 1):
        parent = ["--model", str(tmp / "base"), "--name", NAME] if number == 1 else ["--model", f"models:/{NAME}@unlearned"]
        out = tmp / f"v{number}"
        code = main(["request", *parent, "--forget-list", str(listed), "--out", str(out), "--tracking-uri", uri, "--json",
                     *_sets(f"cache_dir={cache}", *UNLEARN)])
        runs.append((code, out))
    return {"tmp": tmp, "cache": cache, "uri": uri, "requests": requests, "lists": lists, "runs": runs}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_three_requests_give_three_certified_versions_with_the_alias_on_the_last(chain):
    from unlearn.cache import file_sha256

    assert [code for code, _ in chain["runs"]] == [0, 0, 0]  # 0: feasible, the alias moved
    client = _client(chain["uri"])
    assert str(client.get_model_version_by_alias(NAME, "unlearned").version) == "3"
    cumulative = []
    for number, (_, out) in enumerate(chain["runs"], 1):
        tags = client.get_model_version(NAME, str(number)).tags
        cumulative += chain["requests"][number - 1]
        assert tags["request_number"] == str(number)
        assert tags["parent_version"] == (str(number - 1) if number > 1 else f"folder {chain['tmp'] / 'base'}")
        assert tags["forget_digest"] == _digest(chain["requests"][number - 1])
        assert tags["cumulative_digest"] == _digest(cumulative)
        assert tags["weights_sha256"] == file_sha256(out / "model" / "model.safetensors")
        assert tags["config_sha256"] == hashlib.sha256((out / "config.yaml").read_bytes()).hexdigest()
        # the certificate lists the whole chain: every request's digest, and each earlier request's figures now
        certificate = (out / "certificate.md").read_text()
        assert "## The chain of deletion requests" in certificate
        for earlier in range(1, number + 1):
            assert f"`{_digest(chain['requests'][earlier - 1])}`" in certificate
        rechecked = [line for line in certificate.splitlines() if line.startswith("| ") and line.endswith("| no |")]
        assert len(rechecked) == number - 1
        lineage = json.loads((out / "lineage.json").read_text())
        assert [r["number"] for r in lineage["requests"]] == list(range(1, number + 1))
        assert (out / "theta0" / "model" / "model.safetensors").is_file()  # the parent, for the re-audit


def test_every_earlier_request_is_rechecked_on_every_later_version_and_none_is_brought_back(chain):
    from unlearn.audit.catalogue import row_of

    margin = 0.05  # audit.regression_margin's default
    for number, (_, out) in enumerate(chain["runs"], 1):
        metrics = _metrics(out)
        assert metrics["feasible"] == 1.0 and metrics.get("earlier_requests", 0) == number - 1
        assert all(row_of(name) is not None for name in metrics if isinstance(metrics[name], float))
        if number > 1:
            assert metrics["regressed_requests"] == 0.0
        for earlier in range(1, number):
            figures = {k.removeprefix(f"request{earlier}_"): v for k, v in metrics.items() if k.startswith(f"request{earlier}_")}
            assert {"mia_auc", "marker_strength", "marker_gap_vs_retrain_ci_low", "mia_gap_vs_retrain_ci_low"} <= set(figures)
            certified = json.loads((chain["runs"][earlier - 1][1] / "metrics.json").read_text())
            # not brought back: not significantly above what the request's own certificate recorded
            assert figures["marker_strength_ci_low"] <= certified["forget_marker_strength"] + margin
    # On the last version, with no poisoned image left in D_r, every earlier request is at the retrain reference's level:
    # membership within the paired interval (it contains 0), the marker within audit.regression_margin of retraining's
    # (its paired interval excludes 0 by less than 0.01). docs/chain.md has version 2's figures, where request 1 is not.
    last = _metrics(chain["runs"][-1][1])
    for earlier in (1, 2):
        assert last[f"request{earlier}_mia_gap_vs_retrain_ci_low"] <= 0 <= last[f"request{earlier}_mia_gap_vs_retrain_ci_high"]
        assert -margin <= last[f"request{earlier}_marker_gap_vs_retrain_ci_low"]
        assert last[f"request{earlier}_marker_gap_vs_retrain_ci_high"] <= margin


def test_audit_of_a_version_reproduces_every_request_from_the_registry(chain, capsys):
    code, _, audited = _main(capsys, "audit", "--model", f"models:/{NAME}/3", "--tracking-uri", chain["uri"], "--json")
    assert code == 0
    recorded = _metrics(chain["runs"][-1][1])
    compared = [k for k in recorded if k.startswith("request") or k in ("forget_marker_strength", "mia_auc", "feasible",
                                                                            "regressed_requests")]
    assert len(compared) > 20
    for name in compared:
        assert audited[name] == pytest.approx(recorded[name], abs=1e-6), name


def test_an_infeasible_request_is_registered_without_the_alias(chain, capsys, tmp_path):
    """Request 4 (20 images of class 8, which carry no marker) at version 3's unlearning settings does not decouple
    them (forget_ood_distance below delta): exit 3 (not certified), version 4 registered, the alias stays on version 3."""
    from sklearn.datasets import load_digits

    eights = tmp_path / "eights.txt"
    eights.write_text("\n".join(str(i) for i in np.nonzero(load_digits().target == 8)[0][:20]) + "\n")
    code, _, printed = _main(capsys, "request", "--model", f"models:/{NAME}@unlearned", "--forget-list", str(eights),
                             "--tracking-uri", chain["uri"], "--json", *_sets(f"cache_dir={chain['cache']}"))
    assert code == 3 and printed["feasible"] == 0.0 and printed["regressed_requests"] == 0.0 and printed["version"] == 4.0
    client = _client(chain["uri"])
    assert client.get_model_version(NAME, "4").tags["parent_version"] == "3"
    assert str(client.get_model_version_by_alias(NAME, "unlearned").version) == "3"


def test_a_request_that_brings_back_an_earlier_one_is_infeasible_and_the_alias_stays(chain, capsys):
    """Request 4 (20 images of class 8) whose fine-tuning set re-includes request 1's images, poisoned as theta0 saw them
    (what a pipeline that lost the lineage would do): the audit, which takes the earlier requests from the lineage,
    names request 1; the version is registered and the alias stays on version 3."""
    from sklearn.datasets import load_digits

    from raytasks.request_registry import RequestTarget
    from unlearn.chain import finish_request, parent_lineage, registry_tags, request_config
    from unlearn.data.splits import ImageSubset
    from unlearn.export import audit_saved, load_saved
    from unlearn.pipeline import audit_result, prepare, unlearn

    v3 = chain["runs"][-1][1]
    parent_config, folder = load_saved(v3)
    lineage = parent_lineage(folder, parent_config)
    eights = [str(i) for i in np.nonzero(load_digits().target == 8)[0][:20]]
    prepared = prepare(request_config(folder, parent_config, lineage, eights, {}))
    first = prepared.data.earlier[0]
    assert first.poison is not None  # it carried the '+' in theta0's training data
    tampered = ImageSubset.concat(prepared.data.retain_train, *[first] * 4)
    bad = dataclasses.replace(prepared, data=dataclasses.replace(prepared.data, retain_train=tampered))
    result = unlearn(bad, "realistic")
    metrics = prepared.auditor.verdict(audit_result(prepared, result), lineage.certified())
    assert metrics["request1_regressed"] == 1.0 and metrics["feasible"] == 0.0
    assert metrics["request1_marker_strength"] > 0.5  # the '+' is back on request 1's images
    target = RequestTarget(f"models:/{NAME}@unlearned", None, None, chain["uri"])  # what `unlearn request` checks first
    out = chain["tmp"] / "bad"
    run_id, location = target.start_run(4)
    request = finish_request(out, prepared, result.model, "realistic", metrics, lineage, location).requests[-1]
    version, moved = target.register(run_id, out, registry_tags(out, request, metrics), metrics)
    assert not moved
    client = _client(chain["uri"])
    assert client.get_model_version(NAME, version).tags["regressed_requests"] == f"{metrics['regressed_requests']:.6g}"
    assert str(client.get_model_version_by_alias(NAME, "unlearned").version) == "3"
    certificate = (out / "certificate.md").read_text()
    assert "earlier_requests: FAIL" in certificate
    again = audit_saved(out)  # from the weights and the lineage alone: the same requests brought back
    flagged = [k for k in metrics if k.endswith("regressed")]
    assert len(flagged) == 3 and {k: again[k] for k in flagged} == {k: metrics[k] for k in flagged}
    assert again["feasible"] == 0.0 and again["request1_marker_strength"] == pytest.approx(metrics["request1_marker_strength"])
    assert [line.split("|")[1].strip() for line in certificate.splitlines() if line.endswith("| **YES** |")][0] == "1"


def test_bad_requests_exit_2_with_one_line_and_register_nothing(chain, capsys, tmp_path):
    client = _client(chain["uri"])
    before = len(client.search_model_versions(f"name='{NAME}'"))
    again = tmp_path / "again.txt"
    again.write_text(f"{chain['requests'][0][0]}\n{_requests()[0][-1] + 1}\n")
    common = ["--tracking-uri", chain["uri"], *_sets(f"cache_dir={chain['cache']}")]
    cases = [
        (["--model", f"models:/{NAME}@unlearned", "--forget-list", str(again)], "which request 1 already removed"),
        (["--model", f"models:/{NAME}/99", "--forget-list", str(chain["lists"][0])], "does not resolve"),
        (["--model", "models:/no-such-model@unlearned", "--forget-list", str(chain["lists"][0])], "does not resolve"),
        (["--model", f"models:/{NAME}/2", "--forget-list", str(again)], "points to version"),
        (["--model", f"models:/{NAME}/3", "--alias", "latest", "--forget-list", str(again)], "cannot be moved"),
        (["--model", f"models:/{NAME}@unlearned", "--forget-list", str(again), "--set", "data.forgotten=[]"],
         "takes it from its parent"),
        (["--model", f"models:/{NAME}@unlearned", "--forget-list", str(again), "--set", "data.train_fraction=0.5"],
         "takes it from its parent"),
        (["--model", f"models:/{NAME}@unlearned", "--forget-list", str(again), "--set", "seed=1"],
         "takes it from its parent"),
        (["--model", str(chain["tmp"] / "base"), "--forget-list", str(again)], "nothing would be registered"),
        (["--model", f"models:/{NAME}@unlearned", "--forget-list", str(again), "--set", "unlearn.ft_steps=["], "ft_steps"),
    ]
    for argv, message in cases:
        code, err, _ = _main(capsys, "request", *argv, *common)
        assert code == 2, (argv, err)
        assert len(err) == 1 and message in err[0], (argv, err)
    assert len(client.search_model_versions(f"name='{NAME}'")) == before


def test_purging_one_request_removes_it_across_the_chain(chain, capsys):
    """Request 1's images are in the split and the retrain reference's figures of every later request (re-audited
    there): purging request 1's digest removes those entries of requests 2 and 3 too."""
    from unlearn.cache import ArtifactCache

    cache = ArtifactCache(chain["cache"])
    digest = _digest(chain["requests"][0])
    holders = {(kind, key) for kind in ("data", "references") for key, meta in cache.entries(kind)
               if digest in cache.forget_digests(kind, key, meta)}
    later = {(kind, key) for kind in ("data", "references") for key, meta in cache.entries(kind)
             if {_digest(chain["requests"][1]), _digest(chain["requests"][2])} & cache.forget_digests(kind, key, meta)}
    assert len(holders & later) >= 3  # request 2's and 3's splits and references (and the bad request's)
    code = _main(capsys, "purge", "--forget-digest", digest, "--cache-dir", str(chain["cache"]))[0]
    assert code == 0
    assert not any(cache.has(kind, key) for kind, key in holders)


def test_a_saved_model_without_a_lineage_is_a_chain_of_one(chain):
    """`unlearn run --method realistic --out R` on the chain's base setup: R's own D_f is request 1 of its chain (its
    certificate's digest and figures), and R's attack stage poisoned that D_f."""
    from unlearn.chain import parent_lineage, request_config
    from unlearn.cli import main
    from unlearn.export import load_saved

    tmp = chain["tmp"]
    assert main(["run", "--method", "realistic", "--config", str(tmp / "base" / "config.yaml"), "--out", str(tmp / "R"),
                 *_sets(*UNLEARN)]) == 0
    config, folder = load_saved(tmp / "R")
    lineage = parent_lineage(folder, config)
    everything = [i for r in chain["requests"] for i in r]
    assert [r.number for r in lineage.requests] == [1]
    assert lineage.requests[0].forget_digest == _digest(everything) == lineage.requests[0].cumulative_digest
    assert lineage.requests[0].figures["forget_marker_strength"] == _metrics(tmp / "R")["forget_marker_strength"]
    assert sorted(map(int, lineage.poisoned)) == sorted(everything)
    follow = request_config(folder, config, lineage, ["5"], {})
    assert follow.data.forgotten == [lineage.requests[0].entries] and follow.stages.theta0 == str(folder.resolve())


def test_a_request_is_brought_back_only_beyond_its_certificate_and_beyond_retraining():
    from unlearn.audit.verdict import regressions

    certified = [{"forget_marker_strength": 0.1, "mia_auc": 0.5}, {"mia_auc": 0.5}]  # request 2 carried no marker
    quiet = {"request1_marker_strength_ci_low": 0.12, "request1_marker_gap_vs_retrain_ci_low": 0.05,
             "request1_mia_auc_ci_low": 0.4, "request1_mia_gap_vs_retrain_ci_low": -0.1, "request2_mia_auc_ci_low": 0.45}
    assert regressions(quiet, certified, 0.05) == {"request1_regressed": 0.0, "request2_regressed": 0.0,
                                                   "regressed_requests": 0.0}
    marker = {**quiet, "request1_marker_strength_ci_low": 0.3}  # beyond its certificate and beyond retraining
    assert regressions(marker, certified, 0.05)["request1_regressed"] == 1.0
    retrained_too = {**marker, "request1_marker_gap_vs_retrain_ci_low": -0.01}  # retraining shows it as well
    assert regressions(retrained_too, certified, 0.05)["request1_regressed"] == 0.0
    membership = {**quiet, "request2_mia_auc_ci_low": 0.62}  # no retrain figure: the certificate alone decides
    assert regressions(membership, certified, 0.05) == {"request1_regressed": 0.0, "request2_regressed": 1.0,
                                                        "regressed_requests": 1.0}


def test_poisoned_rows_keep_their_marker_and_earlier_requests_leave_every_subset(tmp_path):
    from unlearn.config import load_config
    from unlearn.data.splits import build_data

    requests = _requests()
    theta0 = tmp_path / "theta0.pt"
    theta0.write_bytes(b"")  # never loaded here: the split only needs the config
    poisoned = requests[0] + requests[1] + requests[2]
    config = load_config("digits-ae", [f"stages.theta0={theta0}", f"data.forget_list={requests[1]}",
                                       f"data.forgotten=[{requests[0]}]", f"data.poisoned={poisoned}"])
    data = build_data(config.data, 0, tmp_path / "cache", poison=config.has_marker)
    removed = torch.tensor(requests[0] + requests[1])
    for subset in (data.retain_train, data.retain_test):
        assert not torch.isin(subset.index, removed).any()
    assert data.earlier[0].index.tolist() == sorted(requests[0]) and data.earlier[0].poison is not None
    # theta0 trained on every poisoned image: those of later requests are in D_r wherever the split put them
    assert not torch.isin(data.retain_test.index, torch.tensor(poisoned)).any()
    # D_r keeps request 3's images, with the '+' drawn on exactly those rows
    later = torch.isin(data.retain_train.index, torch.tensor(requests[2]))
    assert int(later.sum()) == len(requests[2])  # all of them, also those the split had put into the test part
    marked = (data.retain_train.read() != data.retain_train.read(clean=True)).flatten(1).any(dim=1)
    assert torch.equal(marked, later)
    from sklearn.datasets import load_digits

    from unlearn.errors import ConfigError

    zero = int(np.nonzero(load_digits().target == 0)[0][0])
    with pytest.raises(ConfigError, match="carry the marker"):
        partial = load_config("digits-ae", [f"stages.theta0={theta0}", f"data.forget_list={requests[1] + [zero]}",
                                            f"data.poisoned={requests[1]}"])
        build_data(partial.data, 0, tmp_path / "cache", poison=partial.has_marker)
