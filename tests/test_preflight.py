"""The check before a stage's work: a tracking server that is down, rejects our credentials or is
not MLflow fails the stage in seconds, before minutes of work that could then not be logged."""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import BIN, free_port, make_project, project_env, run

from pipeline.errors import PipelineError
from pipeline.tracking import preflight, runs
from pipeline.tracking.resend import resends_itself

pytestmark = pytest.mark.fault
EXPERIMENT = "transfer-pipeline"
CREDENTIALS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def test_a_stage_that_logs_after_its_work_finds_a_dead_server_before_it(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    worked = []
    refused = r"unreachable \(ConnectionRefusedError\).*before any work"
    with pytest.raises(PipelineError, match=refused), runs.stage_run("train_head", EXPERIMENT, {}, defer=True):
        worked.append(True)  # minutes of work in a real stage, lost when the run cannot be logged
    assert worked == []


def test_the_early_check_passes_a_proxy_and_a_local_file_and_hides_passwords(monkeypatch, tmp_path):
    dead = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    preflight.check_reachable(EXPERIMENT)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"postgresql+psycopg://team:s3cret@127.0.0.1:{dead}/mlflow")
    with pytest.raises(PipelineError, match="unreachable") as raised:
        preflight.check_reachable(EXPERIMENT)
    assert "s3cret" not in str(raised.value) and "team:***@127.0.0.1" in str(raised.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{dead}")  # reached through the proxy only
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    preflight.check_reachable(EXPERIMENT)


class ScriptedServer(http.server.ThreadingHTTPServer):
    """Answers every GET with self.answer (status, content type, body) and keeps the requests."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.answer = (404, "application/json", {"error_code": "RESOURCE_DOES_NOT_EXIST"})
        self.seen: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ScriptedHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        status, kind, body = self.server.answer
        data = json.dumps(body).encode() if kind == "application/json" else body.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted_server():
    server = ScriptedServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.slow  # it listens on a port (tests/conftest.py's cost rule), for milliseconds
def test_the_early_check_reads_the_servers_answer(monkeypatch, scripted_server):
    """MLflow's own answer passes and carries MLflow's credentials; a refusal of them, or a web
    server that is not MLflow, fails with the fix; an answer that proves nothing passes."""
    for name in (*CREDENTIALS, *preflight.PLUGIN_AUTH):
        monkeypatch.delenv(name, raising=False)
    server = scripted_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url + "/")
    preflight.check_reachable("shapes & co")  # MLflow's "no such experiment": a server that takes runs
    assert server.seen == [("/api/2.0/mlflow/experiments/get-by-name?experiment_name=shapes+%26+co", None)]

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ann")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    server.answer = (200, "application/json", {"experiment": {"experiment_id": "1"}})
    preflight.check_reachable(EXPERIMENT)
    assert server.seen[-1][1] == "Basic " + base64.b64encode(b"ann:pw").decode()
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok")
    preflight.check_reachable(EXPERIMENT)
    assert server.seen[-1][1] == "Bearer tok"

    for name in CREDENTIALS:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url.replace("//", "//bob:s3cret@"))
    server.answer = (401, "text/plain", "You are not authenticated.")
    rejected = r"rejected the credentials \(HTTP 401\) — set MLFLOW_TRACKING_USERNAME"
    with pytest.raises(PipelineError, match=rejected) as no:
        preflight.check_reachable(EXPERIMENT)
    assert server.seen[-1][1] == "Basic " + base64.b64encode(b"bob:s3cret").decode()  # as requests sends it
    assert "s3cret" not in str(no.value) and "bob:***@" in str(no.value)
    with pytest.raises(PipelineError, match=rejected), runs.stage_run("finetune", EXPERIMENT, {}):
        pytest.fail("a stage whose run opens at once is checked too, not left to MLflow's own error")
    with pytest.raises(PipelineError, match=rejected) as no:
        preflight.check_reachable(None)  # predict, lineage: wrong credentials are wrong for the registry too
    assert str(no.value).endswith("to an account that may read its model registry (checked before any work)")
    server.answer = (403, "text/plain", "Permission denied")
    with pytest.raises(PipelineError, match=r"rejected the credentials \(HTTP 403\)"):
        preflight.check_reachable(EXPERIMENT)  # the stage may not write to its experiment
    preflight.check_reachable(None)  # the Default experiment's permissions say nothing about the registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url + "/mlflow")
    for status in (200, 404):  # a login page, another site's "not found"
        server.answer = (status, "text/html", "<html>Not here</html>")
        with pytest.raises(PipelineError, match=rf"not as an MLflow tracking server \(HTTP {status} to /mlflow/api"):
            preflight.check_reachable(EXPERIMENT)

    server.answer = (503, "text/html", "<html>Busy</html>")  # proves nothing: MLflow's call decides
    preflight.check_reachable(EXPERIMENT)
    monkeypatch.setenv("MLFLOW_TRACKING_AUTH", "my_plugin")  # plugin auth: not ours to imitate
    server.answer = (401, "text/plain", "no")
    asked = len(server.seen)
    preflight.check_reachable(EXPERIMENT)
    assert len(server.seen) == asked


@pytest.mark.slow  # it listens on a port
def test_a_server_that_never_answers_or_does_not_speak_http_is_left_to_mlflow(monkeypatch):
    monkeypatch.setattr(preflight, "TIMEOUT_SECONDS", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        preflight.check_reachable(EXPERIMENT)
        assert time.monotonic() - started < 5

    with socket.socket() as other:  # e.g. the database's port by mistake: bytes that are not HTTP
        other.bind(("127.0.0.1", 0))
        other.listen()

        def babble():
            for _ in range(2):  # the TCP probe's connection, then the HTTP request's
                connection, _address = other.accept()
                with contextlib.suppress(OSError), connection:
                    connection.sendall(b"\x00\x01 not http\r\n\r\n")
                    connection.recv(1024)

        threading.Thread(target=babble, daemon=True).start()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{other.getsockname()[1]}")
        preflight.check_reachable(EXPERIMENT)


@pytest.fixture(scope="module")
def basic_auth_server(tmp_path_factory):
    """A real `mlflow server --app-name basic-auth` (MLflow's own user store), admin's password known.
    One for the module (its start costs 15-30 s): each test writes to an experiment of its own
    (server_project)."""
    tmp_path = tmp_path_factory.mktemp("auth-server")
    port, password = free_port(), "adm1n-s3cret"
    config = tmp_path / "basic_auth.ini"
    config.write_text("[mlflow]\ndefault_permission = READ\n"
                      f"database_uri = sqlite:///{tmp_path / 'users.db'}\nadmin_username = admin\n"
                      f"admin_password = {password}\n"  # in the file: MLflow < 3.17 reads it nowhere else
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {**project_env(tmp_path), "MLFLOW_AUTH_CONFIG_PATH": str(config),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "tests-only"}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination",
                               str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"OK":
                break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
    yield url, password
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture
def server_project(tmp_path, request) -> tuple[Path, str]:
    """A tiny project whose stages log to an experiment named after the test: (project, experiment)."""
    experiment = f"preflight-{request.node.name}"
    return make_project(tmp_path / "project", {"mlflow": {"experiment": experiment}}), experiment


def as_admin(url: str, password: str, endpoint: str, body: dict | None = None) -> dict:
    """The server's REST answer to api/2.0/mlflow/<endpoint> (GET, or POST with a JSON body), asked
    directly as admin: what landed there, not what the client under test says."""
    headers = {"Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()}
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", data=data, headers=headers)
    return json.loads(urllib.request.urlopen(request, timeout=60).read())


def runs_on_server(url: str, password: str, experiment: str) -> list[tuple[str, str]]:
    """(run name, status) of the experiment's runs, asked of the server directly as admin."""
    found = as_admin(url, password, f"experiments/get-by-name?experiment_name={experiment}")
    search = as_admin(url, password, "runs/search", {"experiment_ids": [found["experiment"]["experiment_id"]]})
    return [(r["info"]["run_name"], r["info"]["status"]) for r in search["runs"]]


@pytest.mark.slow
def test_a_real_mlflow_server_that_rejects_the_credentials_stops_a_stage_before_its_work(server_project,
                                                                                        basic_auth_server):
    """`prepare` (it logs at its end) against MLflow's basic-auth server: without the password it
    stops before decoding a single image; with it, the same stage runs and lands on the server."""
    url, password = basic_auth_server
    project, experiment = server_project
    run([str(BIN / "python"), "-m", "pipeline", "shapes"], project)
    stage = [str(BIN / "python"), "-m", "pipeline", "prepare"]
    for wrong in ({}, {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "guess"}):
        refused = run(stage, project, check=False, env={"MLFLOW_TRACKING_URI": url, **wrong})
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip().splitlines()[-1] == (
            f"error: MLflow tracking store {url} rejected the credentials (HTTP 401) — set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account that may write to experiment "
            f"{experiment!r} (checked before any work)")
        assert not (project / "data" / "prepared").exists()

    wrong_path = run(stage, project, check=False, env={"MLFLOW_TRACKING_URI": f"{url}/mlflow",
                                                       "MLFLOW_TRACKING_USERNAME": "admin",
                                                       "MLFLOW_TRACKING_PASSWORD": password})
    assert wrong_path.returncode == 2 and "not as an MLflow tracking server (HTTP 404" in wrong_path.stderr

    admin = {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
    run(stage, project, env=admin)
    assert (project / "data" / "prepared" / "classes.json").exists()
    assert runs_on_server(url, password, experiment) == [("prepare", "FINISHED")]


class FirstTimeUnavailable(http.server.BaseHTTPRequestHandler):
    """A proxy before the real server that answers 503 (what a load balancer says while the
    server restarts) to the first request for each endpoint (each ending in one of `only`, if
    given), and forwards every later one. The first request to an endpoint ending in one of
    `processed_first` reaches the server before the 503 (a load balancer that gave up on an answer
    the server went on to give)."""

    upstream: tuple[str, int]
    refused: list[str]
    processed_first: tuple[str, ...]
    only: tuple[str, ...] | None

    def _relay(self):
        endpoint = f"{self.command} {self.path.split('?')[0]}"
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if endpoint not in self.refused and (self.only is None or endpoint.endswith(self.only)):
            self.refused.append(endpoint)
            if endpoint.endswith(self.processed_first):
                self._forward(body)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status, headers, payload = self._forward(body)
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _forward(self, body: bytes) -> tuple[int, list, bytes]:
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        connection.request(self.command, self.path, body=body, headers=headers)
        answer = connection.getresponse()
        payload = answer.read()
        connection.close()
        return answer.status, answer.getheaders(), payload

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _relay

    def log_message(self, *args):  # the test's output is the stage's, not the proxy's
        pass


def first_time_unavailable(url: str, processed_first: tuple[str, ...] = (), only: tuple[str, ...] | None = None
                           ) -> tuple[http.server.ThreadingHTTPServer, list[str]]:
    """A running FirstTimeUnavailable proxy before the server at url, and the endpoints it refused."""
    refused: list[str] = []
    handler = type("Handler", (FirstTimeUnavailable,), {"upstream": ("127.0.0.1", int(url.rsplit(":", 1)[1])),
                                                        "refused": refused, "processed_first": processed_first,
                                                        "only": only})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy, refused


@pytest.mark.slow
def test_once_checked_a_stage_waits_out_a_server_that_fails_each_request_once(server_project, basic_auth_server):
    """After the early check, MLflow's calls keep MLflow's own retries: a server that is briefly
    unavailable while a stage logs its finished work costs the stage nothing (it used to fail it,
    and DVC recorded none of the work). The creates MLflow (3.18 on) does not resend are resent
    without making two: the experiment's and the run's are refused after the server made them
    (MLflow before 3.18 resends blindly, so that case is not tried there)."""
    url, password = basic_auth_server
    project, experiment = server_project
    made_before_503 = () if resends_itself() else ("/experiments/create", "/runs/create")
    proxy, refused = first_time_unavailable(url, processed_first=made_before_503)
    try:
        run([str(BIN / "python"), "-m", "pipeline", "shapes"], project)
        run([str(BIN / "python"), "-m", "pipeline", "prepare"], project, env={
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{proxy.server_address[1]}",
            "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password})
    finally:
        proxy.shutdown()
    assert any("/runs/create" in e for e in refused) and any("/runs/search" in e for e in refused), refused
    assert any("/runs/log-batch" in e or "/runs/update" in e for e in refused), refused
    assert runs_on_server(url, password, experiment) == [("prepare", "FINISHED")]


@pytest.mark.slow  # it listens on a port, for milliseconds
def test_a_process_asks_once_so_a_stage_checked_before_its_work_is_not_failed_fast_after_it(
        monkeypatch, scripted_server):
    """check_once (store.setup_uri: a deferred stage's MLflow set-up after its work, predict)
    asks only when this process has not yet seen the server take runs; MLflow's retries do the rest."""
    for name in (*CREDENTIALS, *preflight.PLUGIN_AUTH):
        monkeypatch.delenv(name, raising=False)
    server = scripted_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    server.answer = (401, "text/plain", "no")
    with pytest.raises(PipelineError, match="rejected the credentials"):
        preflight.check_once()  # never answered yes: asked, and a definite no fails
    server.answer = (404, "application/json", {"error_code": "RESOURCE_DOES_NOT_EXIST"})
    preflight.check_reachable(EXPERIMENT)  # the stage's check before its work
    server.answer = (401, "text/plain", "no")  # e.g. a password rotated while the stage worked
    asked = len(server.seen)
    preflight.check_once()
    assert len(server.seen) == asked  # not asked again: MLflow's own call (and its retries) decides


STAGE_WHOSE_SERVER_GOES = """
import sys
from pipeline.tracking import runs
with runs.stage_run("train_head", sys.argv[1], {"lr": 0.1}) as stage:
    stage.start()
    print("started", flush=True)
    sys.stdin.readline()  # the test takes the server away
    raise RuntimeError("the stage's own error")
"""


@pytest.mark.slow
def test_a_stage_whose_server_goes_away_ends_with_its_own_error_not_mlflows_retries(server_project, basic_auth_server):
    """Ending a failed run is best effort, one try: the stage stops in seconds with its own error
    (not after MLflow's 4 minutes of retries, not with MLflow's), and the run is left to be reaped."""
    url, password = basic_auth_server
    project, experiment = server_project
    proxy, refused = first_time_unavailable(url)
    env = {**project_env(project), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{proxy.server_address[1]}",
           "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
    stage = subprocess.Popen([str(BIN / "python"), "-c", STAGE_WHOSE_SERVER_GOES, experiment], cwd=project, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert stage.stdout.readline().strip() == "started"
        assert any("/runs/create" in e for e in refused), refused  # through a 503: resent
        proxy.shutdown()
        proxy.server_close()  # connections refused from now on
        started = time.monotonic()
        _, stderr = stage.communicate("\n", timeout=300)
    finally:
        stage.kill()
    assert time.monotonic() - started < 60, "ending the failed run waited on MLflow's retries"
    assert stage.returncode != 0
    assert stderr.strip().splitlines()[-1] == "RuntimeError: the stage's own error"
    assert "warning: MLflow run of train_head not ended FAILED (MlflowException)" in stderr
    assert runs_on_server(url, password, experiment) == [("train_head", "RUNNING")]  # for the next stage to reap


ECHO_MODEL = """
import mlflow.pyfunc
from mlflow.models import set_model


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


set_model(Echo())
"""

REGISTERING_STAGE = """
import sys
from pathlib import Path

import pandas as pd

from pipeline.tracking import registry, runs

experiment, folder, model = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
registry.PACKAGE_DIR = folder / "code"  # not the whole package: each file is a request (the creates are under test)
pyfunc = registry.Pyfunc(folder / "echo.py", ["pandas"], pd.DataFrame({"image": ["x"]}))
with runs.stage_run("evaluate", experiment, {}):
    version = registry.log_and_register(model, folder / "checkpoint", pyfunc, {"weights_sha256": "0123abcd"})
print(version.version, version.source, flush=True)  # source: models:/<logged model id>
"""


@pytest.mark.slow
def test_registering_through_a_server_that_fails_each_request_once_makes_one_version(
        tmp_path, server_project, basic_auth_server):
    """The registry's creates are resent too, without making two: the model version's create
    reaches the server before its 503 (MLflow before 3.18 resends blindly: not tried there). Only
    the creates fail (every endpoint failing once, each artifact's upload included, takes a minute)."""
    url, password = basic_auth_server
    project, experiment = server_project
    (tmp_path / "echo.py").write_text(ECHO_MODEL)
    (tmp_path / "code").mkdir()
    # not empty: an empty file is uploaded chunked, which the proxy does not relay
    (tmp_path / "code" / "placeholder.py").write_text("# uploaded as the model's code\n")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "model.json").write_text("{}")
    model = f"resend-{experiment}"
    made_before_503 = () if resends_itself() else ("/model-versions/create",)
    creates = ("/logged-models", "/registered-models/create", "/model-versions/create")
    proxy, refused = first_time_unavailable(url, processed_first=made_before_503, only=creates)
    try:
        out = run([str(BIN / "python"), "-c", REGISTERING_STAGE, experiment, str(tmp_path), model], project, env={
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{proxy.server_address[1]}",
            "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}).stdout
    finally:
        proxy.shutdown()
    assert sorted(e.split("/mlflow")[-1] for e in refused) == sorted(creates), refused
    version, source = out.strip().splitlines()[-1].split()
    assert version == "1"
    versions = as_admin(url, password, f"model-versions/search?filter=name%3D%27{model}%27")
    assert [v["version"] for v in versions["model_versions"]] == ["1"]
    # the version the failed try made is linked from its logged model, as one register_model made
    # (the server sets the tag when it creates the version; the client may add its own entry)
    logged_model = as_admin(url, password, f"logged-models/{source.removeprefix('models:/')}")["model"]
    tags = {t["key"]: t["value"] for t in logged_model["info"].get("tags", [])}
    linked = {(entry["name"], str(entry["version"])) for entry in json.loads(tags.get("mlflow.modelVersions", "[]"))}
    assert linked == {(model, "1")}, tags


@pytest.mark.slow  # it listens on a port, for milliseconds
@pytest.mark.skipif(resends_itself(), reason="MLflow before 3.18 resends every create itself")
def test_only_a_create_the_server_answered_with_a_5xx_is_resent(monkeypatch, scripted_server):
    """A 503 or 500 is an answer: the create is resent after looking for what it made. A 504 (the
    request may still be running) and a server that is down are not: the create fails when
    MLflow's own retries are spent, not after as many of ours again."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.resend import create_once

    for name, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}.items():
        monkeypatch.setenv(name, value)
    server = scripted_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    looked: list[str] = []

    def attempt(answer, found=None, url=server.url):
        server.answer, server.seen[:] = answer, []
        return create_once(lambda: MlflowClient(url).create_experiment("e"),
                           lambda: looked.append("looked") or found)

    assert attempt((503, "text/plain", ""), found="made by the first try") == "made by the first try"
    assert len(server.seen) == 1 and looked == ["looked"]
    looked.clear()
    with pytest.raises(MlflowException, match="boom"):
        attempt((500, "application/json", {"error_code": "INTERNAL_ERROR", "message": "boom"}))
    assert len(server.seen) == 3 and looked == ["looked"] * 2  # the first try and MLflow's 2 retries' worth
    looked.clear()
    with pytest.raises(MlflowException, match="504"):
        attempt((504, "text/plain", ""))
    assert len(server.seen) == 1 and looked == []
    with pytest.raises(MlflowException, match="(?i)connection"):
        attempt(None, url=f"http://127.0.0.1:{free_port()}")
    assert looked == []
