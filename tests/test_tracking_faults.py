"""A tracking server that goes away mid-sweep: trials are held and logged once it answers, never twice."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from raytasks import driver as driver_module
from raytasks import tracking


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An empty sqlite store (its schema migrations take seconds: made once, copied per test)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(empty_store, tmp_path, monkeypatch):
    """A real sqlite store behind a switch: while `down`, every write raises what MLflow raises for a refused
    connection and the health check fails."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = tracking.experiment_id(client, "faults")
    parent = client.create_run(experiment, run_name="parent").info.run_id
    state = SimpleNamespace(down=False, writes=0)
    real_log_trial = tracking.log_trial

    def log_trial(*args, **kwargs):
        state.writes += 1
        if state.down:
            raise MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/create failed with "
                                  "exception ConnectionError(Max retries exceeded)")
        return real_log_trial(*args, **kwargs)

    monkeypatch.setattr(tracking, "log_trial", log_trial)
    monkeypatch.setattr(tracking, "reachable", lambda _uri: not state.down)
    logger = tracking.MLflowTrialLogger(uri, experiment, parent, "faults", workers=1)
    return SimpleNamespace(client=client, experiment=experiment, logger=logger, state=state)


def _trial(trial_id: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"method": "realistic", "ga_lr": 0.05}, checkpoint=None,
                           last_result={"feasible": 1.0, "forget_marker_strength": 0.1, "training_iteration": 1},
                           error_file=None)


def _runs(store) -> list[str]:
    return sorted(r.data.tags["ray.trial_id"] for r in store.client.search_runs([store.experiment])
                  if "ray.trial_id" in r.data.tags)


def test_trials_ending_while_the_server_is_away_are_logged_once_it_answers(store):
    lines: list[str] = []
    callback = tracking.TrialLoggingCallback(store.logger, say=lines.append)
    callback.on_trial_complete(0, [], _trial("a"))
    store.state.down = True
    callback.on_trial_complete(0, [], _trial("b"))
    callback.on_trial_complete(0, [], _trial("c"))
    assert sorted(callback.pending) == ["b", "c"] and _runs(store) == ["a"]
    assert len(lines) == 2 and "unreachable" in lines[0] and "2 trial(s) wait" in lines[1], lines
    writes = store.state.writes
    callback.on_trial_complete(0, [], _trial("d"))  # still away: not even tried (no MLflow retries per trial)
    assert store.state.writes == writes and len(callback.pending) == 3
    store.state.down = False
    callback.on_trial_complete(0, [], _trial("e"))
    assert callback.pending == {} and _runs(store) == ["a", "b", "c", "d", "e"]
    # the driver's final pass logs every trial again: found, not duplicated
    for trial_id in "abcde":
        store.logger.log(trial_id, {"method": "realistic", "ga_lr": 0.05}, {"feasible": 1.0}, None)
    assert _runs(store) == ["a", "b", "c", "d", "e"]


def test_a_write_the_answering_server_refuses_is_an_error_not_a_wait(store, monkeypatch):
    monkeypatch.setattr(tracking, "reachable", lambda _uri: True)
    store.state.down = True  # writes fail, yet the server answers its health check
    callback = tracking.TrialLoggingCallback(store.logger, say=lambda _: None)
    with pytest.raises(MlflowException):
        callback.on_trial_complete(0, [], _trial("a"))


def _driver(store) -> driver_module.SweepDriver:
    sweep = driver_module.SweepDriver.__new__(driver_module.SweepDriver)
    sweep.trial_logger, sweep.uri, sweep.name = store.logger, store.logger.uri, "faults"
    return sweep


def test_the_end_of_the_sweep_waits_for_the_server_and_says_so(store, monkeypatch, capsys):
    store.state.down = True
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        store.state.down = len(naps) < 3  # back after three polls

    monkeypatch.setattr(driver_module.time, "sleep", sleep)
    _driver(store)._log_when_reachable("a", {"method": "realistic"}, {"feasible": 1.0}, None, False)
    assert len(naps) == 3 and _runs(store) == ["a"]
    err = capsys.readouterr().err
    assert err.count("unreachable: waiting") == 1, err


def test_a_server_that_stays_away_stops_the_sweep_resumable(store, monkeypatch):
    store.state.down = True
    monkeypatch.setattr(driver_module, "TRACKING_WAIT_S", 0.0)
    monkeypatch.setattr(driver_module.time, "sleep", lambda _s: None)
    with pytest.raises(driver_module.SweepInterrupted, match="--resume --name faults"):
        _driver(store)._log_when_reachable("a", {"method": "realistic"}, {"feasible": 1.0}, None, False)
    assert _runs(store) == []


def _serve(status: int):
    """A loopback HTTP server answering every GET with `status` (bounded: one thread, stopped by the caller)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_reachable_tells_an_answer_from_a_server_that_is_away(monkeypatch):
    """A 4xx is an answer (the server is there; the call that follows says what is wrong), a 5xx or a refused
    connection is a server not serving; anything else is a bug and is raised, never read as 'away' (which would make
    the sweep wait 10 minutes and exit 130)."""
    import socket
    import urllib.request

    for status, expected in ((200, True), (404, True), (403, True), (503, False)):
        server, url = _serve(status)
        try:
            assert tracking.reachable(url) is expected, status
        finally:
            server.shutdown()
    with socket.socket() as free:  # a port nothing listens on: refused
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert tracking.reachable(f"http://127.0.0.1:{port}") is False

    def broken(*args, **kwargs):
        raise TypeError("a bug in the health check")

    monkeypatch.setattr(urllib.request, "urlopen", broken)
    with pytest.raises(TypeError, match="a bug"):
        tracking.reachable("http://127.0.0.1:1")


def test_connect_reports_an_unusable_store_and_raises_a_bug(tmp_path, monkeypatch):
    from unlearn.errors import ConfigError

    (tmp_path / "not-a-db").write_text("this is no sqlite file")
    with pytest.raises(ConfigError, match="is unusable"):
        tracking.connect(f"sqlite:///{tmp_path / 'not-a-db'}")

    def broken(self, *args, **kwargs):
        raise AttributeError("a bug in a client call")

    monkeypatch.setattr(MlflowClient, "search_experiments", broken)
    with pytest.raises(AttributeError, match="a bug"):
        tracking.connect(f"sqlite:///{tmp_path / 'fresh.db'}")
