"""Where tracking goes: the tracking URI (configured > $MLFLOW_TRACKING_URI > sqlite in the run
folder, made absolute once), and the connection to it (an HTTP server is probed first, so a
wrong URI fails in seconds, not after MLflow's own minutes of retries)."""

from __future__ import annotations

import os
import pathlib
import re
import time
import urllib.error
import urllib.parse
import urllib.request

from tempflow_core.redaction import split_credentials

from .values import experiment_page, redact

# Health probe of an HTTP tracking server: attempts x (timeout + pause) stays well under 20 s.
_PROBE_ATTEMPTS = 3
_PROBE_TIMEOUT_S = 3.0
_PROBE_PAUSE_S = 1.0


class TrackingUnavailable(RuntimeError):
    """The tracking backend cannot be reached (the message names the tracking URI)."""


def absolute_sqlite(uri: str) -> str:
    """``sqlite:///rel.db`` depends on the cwd of whichever worker opens it: make it absolute."""
    rest = uri[len("sqlite:///"):]
    if not rest or rest.startswith("/") or rest.startswith(":memory:"):
        return uri
    path, sep, query = rest.partition("?")
    return f"sqlite:///{pathlib.Path(path).resolve()}{sep}{query}"


def check_not_file_store(uri: str) -> None:
    """ValueError for a file store (a path or file: URI), which MLflow 3.17 no longer serves."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("", "file") or re.match(r"^[A-Za-z]:[\\/]", uri):
        raise ValueError(
            f"tracking URI {redact(uri)!r} is an MLflow file store, which MLflow 3.17 no longer "
            "serves (maintenance mode); use sqlite:///<abs path>/mlflow.db or http://host:port"
        )


def resolve_tracking_uri(configured: str | None, run_root: pathlib.Path) -> str:
    """configured > $MLFLOW_TRACKING_URI > ``sqlite:///<abs run_root>/mlflow.db``.

    Never a file: store (ValueError); a relative sqlite path is made absolute."""
    uri = (configured or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        root = pathlib.Path(run_root).expanduser().resolve()
        return f"sqlite:///{root / 'mlflow.db'}"
    check_not_file_store(uri)
    if uri.startswith("sqlite:///"):
        uri = absolute_sqlite(uri)
    return uri


def sqlite_path(uri: str) -> pathlib.Path | None:
    """The database file of a sqlite URI (None for other URIs and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].partition("?")[0]
    return None if path.startswith(":memory:") or not path else pathlib.Path(path)


def _auth_headers(uri: str) -> tuple[str, dict[str, str]]:
    """(uri without user:password@, the Authorization header for the probe): the URI's user
    info, else MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN.
    urllib would take user info for part of the host name."""
    import base64

    plain, user, password = split_credentials(uri)
    if user is None:
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        return plain, {"Authorization": f"Basic {token}"}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return plain, {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    return plain, {}


def credentials_to_env(uri: str | None) -> str | None:
    """The tracking URI without its user info; the user and password go to MLflow's own
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of this process, so the config that
    Prefect stores as flow parameters, run.json and MLflow params never hold them."""
    if not uri:
        return uri
    plain, user, password = split_credentials(uri)
    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password or ""
    return plain


def probe_http(uri: str) -> None:
    """GET <uri>/health up to _PROBE_ATTEMPTS times; TrackingUnavailable unless one answers 200.
    The message names the URI with its credentials masked."""
    plain, headers = _auth_headers(uri.rstrip("/"))
    url = plain + "/health"
    last: BaseException | None = None
    for attempt in range(_PROBE_ATTEMPTS):
        try:
            request = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(request, timeout=_PROBE_TIMEOUT_S) as resp:  # noqa: S310
                if resp.status == 200:
                    return
                last = RuntimeError(f"HTTP {resp.status}")
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = e
        if attempt + 1 < _PROBE_ATTEMPTS:
            time.sleep(_PROBE_PAUSE_S)
    raise TrackingUnavailable(
        f"MLflow tracking server at {redact(uri)} is unreachable ({redact(str(last))}); fix: start it, "
        "correct the tracking URI (pipeline.mlflow_uri / $MLFLOW_TRACKING_URI), or leave both unset "
        "for a local sqlite store"
    )


def probe_configured(configured: str | None) -> None:
    """Probe the HTTP tracking server a run will use (configured, else $MLFLOW_TRACKING_URI)
    before the run writes anything; sqlite needs no probe. TrackingUnavailable naming it."""
    uri = (configured or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri.startswith(("http://", "https://")):
        probe_http(uri)


def connect(uri: str):
    """An MlflowClient (tracking and registry) on uri: an HTTP server must answer its health
    probe; a sqlite database gets its folder. TrackingUnavailable otherwise."""
    from mlflow import MlflowClient

    if uri.startswith(("http://", "https://")):
        probe_http(uri)
    db = sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingUnavailable(f"cannot create the directory of {uri}: {e}") from e
    try:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except Exception as e:  # noqa: BLE001 - store construction (sqlite open, migrations)
        raise TrackingUnavailable(f"MLflow tracking backend {redact(uri)} failed: {e}") from e


def is_connection_error(e: BaseException) -> bool:
    """True when e (or an exception in its chain) says the backend is unreachable."""
    import requests

    chain: BaseException | None = e
    while chain is not None:
        if isinstance(chain, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                              ConnectionError)):
            return True
        msg = str(chain)
        if any(m in msg for m in ("Max retries exceeded", "Connection refused",
                                  "unable to open database file")):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def experiment_ui_page(uri: str, experiment: str, server: str) -> str:
    """The page at `server` (an MLflow UI on the tracking store `uri`) of `experiment`'s training
    runs, or of the experiment list while nothing has been tracked (a sqlite database is not
    created here: `mlflow ui` does, and a second creator beside it kept its UI from coming up)."""
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return experiment_page(server)
    try:
        from mlflow import MlflowClient

        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 - a server that does not answer: the list
        exp = None
    return experiment_page(server, exp.experiment_id if exp else None)
