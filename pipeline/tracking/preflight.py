"""Is the MLflow tracking store there, and will it take our runs? Asked before a stage's work, in
milliseconds and without importing MLflow: a stage that logs only after its work would otherwise
do minutes of it, then fail and have DVC record none of it. Once this has said yes, MLflow's own
calls keep MLflow's patient retries (store.py): a slow or restarting server is waited for."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request

from pipeline.errors import PipelineError, redacted

# the ports a tracking URI means when it names none (MLflow's database URIs are SQLAlchemy's)
DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}

TIMEOUT_SECONDS = 10  # for the check's own connection and question, not for MLflow's calls

# authentication MLflow does through plugins (custom providers, AWS SigV4): not ours to imitate
PLUGIN_AUTH = ("MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4")


# the tracking URIs this process has checked and found taking runs: asked once, before the work
_answered: set[str] = set()


def check_once(experiment: str | None = None) -> None:
    """check_reachable, unless this process already did so for the same URI (a stage checks before
    its work; its MLflow set-up after the work must not fail fast where it can wait instead)."""
    if os.environ.get("MLFLOW_TRACKING_URI", "") not in _answered:
        check_reachable(experiment)


def check_reachable(experiment: str | None) -> None:
    """Fail now when MLFLOW_TRACKING_URI names a server nothing answers at (a TCP connection) or,
    for an HTTP server, one that definitely will not take our runs: it rejects the credentials,
    or what answers is not an MLflow tracking server. experiment: the one the stage logs to
    (None for commands that only read the registry, such as predict). Anything less definite
    (TLS set-up, a slow or failing server) is left to MLflow's own first call. Skipped when a
    proxy stands between (the connection is the proxy's to make) and for stores with no host (a
    SQLite file, a socket)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+")[0]  # postgresql+psycopg -> postgresql
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return
    if scheme.startswith("http") and scheme in urllib.request.getproxies() \
            and not urllib.request.proxy_bypass(parts.hostname):
        return
    _check_it_answers(uri, parts, scheme, experiment)
    _answered.add(uri)


def _check_it_answers(uri: str, parts: urllib.parse.SplitResult, scheme: str, experiment: str | None) -> None:
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
        socket.create_connection((parts.hostname, port), timeout=TIMEOUT_SECONDS).close()
    except (OSError, ValueError) as exc:  # refused, timed out, unknown host, bad port
        raise PipelineError(f"MLflow tracking store {redacted(uri)} is unreachable ({type(exc).__name__}) — start "
                            "the server or fix MLFLOW_TRACKING_URI (checked before any work)") from None
    if scheme.startswith("http") and not any(os.environ.get(name) for name in PLUGIN_AUTH):
        _check_it_takes_runs(uri, experiment)


def _check_it_takes_runs(uri: str, experiment: str | None) -> None:
    """Ask the server the first question a stage's MLflow asks (does the experiment exist?), with
    the credentials MLflow would send, and fail on a definite no."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]  # credentials in the URI go in the header, as requests does
    query = urllib.parse.urlencode({"experiment_name": experiment or "Default"})
    url = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/") +
                                   "/api/2.0/mlflow/experiments/get-by-name", query, ""))
    request = urllib.request.Request(url, headers=_auth_headers(parts))
    try:  # the TLS context inside: a missing certificate file is MLflow's to report
        status, body = _get(request, _tls_context(parts))
    except (OSError, ValueError, http.client.HTTPException):  # TLS, timeouts, not HTTP: MLflow decides
        return
    where = f"MLflow tracking store {redacted(uri)}"
    # 401: the credentials are wrong. 403: right, but not allowed this experiment; which says
    # nothing about the registry a command without an experiment (predict) reads
    if status == 401 or (status == 403 and experiment):
        access = f"write to experiment {experiment!r}" if experiment else "read its model registry"
        raise PipelineError(
            f"{where} rejected the credentials (HTTP {status}) — set MLFLOW_TRACKING_USERNAME and "
            f"MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an account that may {access} "
            "(checked before any work)")
    if status in (200, 404) and not _is_mlflow_answer(body):
        raise PipelineError(
            f"{where} answers, but not as an MLflow tracking server (HTTP {status} to "
            f"{parts.path.rstrip('/')}/api/2.0/mlflow/…) — set MLFLOW_TRACKING_URI to the server's "
            "root, e.g. http://host:5000 (checked before any work)")


def _get(request: urllib.request.Request, context: ssl.SSLContext | None) -> tuple[int, bytes]:
    """The status and the body (whole: a cut-off JSON answer would read as not MLflow's), of an
    error status too."""
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS, context=context) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def _auth_headers(parts: urllib.parse.SplitResult) -> dict[str, str]:
    """What MLflow's REST client sends: a bearer token, else basic auth from the environment,
    else (through requests) basic auth from the URI's user:password@."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not (user and password) and parts.username:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
    if not user:
        return {}
    pair = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


def _tls_context(parts: urllib.parse.SplitResult) -> ssl.SSLContext | None:
    """MLflow's TLS settings; a context that differs from requests' only makes the check give up."""
    if parts.scheme != "https":
        return None
    context = ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    client_cert = os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH")
    if client_cert:
        context.load_cert_chain(client_cert)
    return context


def _is_mlflow_answer(body: bytes) -> bool:
    """MLflow answers get-by-name with {"experiment": …} or, for a missing one, {"error_code": …}."""
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    return isinstance(answer, dict) and ("experiment" in answer or "error_code" in answer)
