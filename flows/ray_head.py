"""The Ray cluster a run with pipeline.engine=ray drives: RAY_ADDRESS, or a local head.

Without RAY_ADDRESS, `ray_cluster()` starts `ray start --head --block` for the block, as a
child that ends with this process (flows.children.spawn: its own process group, ended when
this process dies, also by SIGKILL; Ray's agents would otherwise outlive a killed driver).
Every server of that head listens on 127.0.0.1 only: Ray binds its servers to the node IP,
and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes the node IP the loopback address (Ray's own
single-machine mode of macOS and Windows). This process gets the same setting before it
imports Ray, so its driver binds there too.

The head requires Ray's token authentication (RAY_AUTH_MODE=token), so other local users
cannot submit work to it. The token is the user's when one is configured (RAY_AUTH_TOKEN or
RAY_AUTH_TOKEN_PATH); otherwise the head gets a new random one, written to a file that only
this user can read (a private temporary folder), named to the head and to this process's
driver by RAY_AUTH_TOKEN_PATH, never printed, and deleted when the head ends. Nothing of the
user's home folder is read or written (Ray's own default would be ~/.ray/auth_token).

With RAY_ADDRESS the run joins that cluster. `check_access(address)` asks its GCS, in a child
process (Ray aborts a process whose token mode has no token), whether this process's token
(or the lack of one) is accepted: a cluster that refuses it is named in one line with the fix
before any work.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping

from flows.children import free_port, spawn, stop
from tempflow_core.config import RunConfig
from tempflow_core.run.preflight import PreflightError
from tempflow_core.redaction import redact_text

LOCAL_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
TOKEN_VARS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # where a user configures a cluster's token
PROBE_TIMEOUT_S = 30.0


class RayAccessError(PreflightError):
    """The cluster of RAY_ADDRESS cannot be used as configured. `str()` is one line with the fix."""

    def __init__(self, problem: str, fix: str):
        super().__init__("RAY_ADDRESS", problem, fix)


def token_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether the user named a Ray token (an empty variable counts as unset)."""
    env = os.environ if env is None else env
    return any(env.get(k, "").strip() for k in TOKEN_VARS)


def _refresh_ray_auth() -> None:
    """Make an already imported Ray read RAY_AUTH_* again (its config and token are cached)."""
    if "ray" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `values` set for the block, restored after it."""
    if not values:
        yield
        return
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    _refresh_ray_auth()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _refresh_ray_auth()


@contextlib.contextmanager
def head_token() -> Iterator[dict[str, str]]:
    """The RAY_AUTH_* variables of a local head and its driver: the user's configured token, or
    a new random one in a file readable by this user only, deleted when the block ends."""
    if token_configured():
        yield {"RAY_AUTH_MODE": "token"}
        return
    folder = tempfile.mkdtemp(prefix="tempflow-ray-auth-")  # mode 0700
    path = os.path.join(folder, "auth_token")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        yield {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": path}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the local Ray head on 127.0.0.1:{port} did not start (exit code {proc.poll()}); "
                               "set RAY_ADDRESS to use a running cluster")
        time.sleep(0.2)


_PROBE = r"""
import socket, sys
host, _, port = sys.argv[1].rpartition(":")
try:
    socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
except OSError:
    sys.exit(4)
try:
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError
except ImportError as e:
    sys.exit(f"Ray is not installed ({e}): pip install -e '.[ray]'")
try:
    GcsClient(address=sys.argv[1]).internal_kv_get(b"tempflow-probe", None, timeout=10)
except AuthenticationError:
    sys.exit(3)
except Exception as e:
    sys.exit(f"{type(e).__name__}: {e}")
"""


def check_access(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise RayAccessError when the cluster at `address` (host:port of its GCS) does not answer
    or refuses this process's token. `auto` and ray:// (Ray Client) addresses are not probed."""
    if address == "auto" or "://" in address or ":" not in address:
        return
    env = {**os.environ, **LOCAL_ONLY}
    if token_configured(env):
        env.setdefault("RAY_AUTH_MODE", "token")
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE, address], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, timeout=timeout)
        code, said = probe.returncode, (probe.stderr.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        code, said = 4, ""
    if code == 4:
        raise RayAccessError(f"no Ray cluster answers at {address}",
                             "start the cluster or correct RAY_ADDRESS (unset, a run starts a local head of its own)")
    if code == 1:  # the probe's own message (Ray missing, another error of the GCS call)
        raise RayAccessError(f"the Ray cluster at {address} could not be asked: {redact_text(said)[:300]}",
                             "install the ray extra and check RAY_ADDRESS")
    if code != 0:  # 3: refused; < 0: Ray aborted (token mode without a token)
        given = "refused the token this process gave" if token_configured(env) else "requires a token"
        raise RayAccessError(f"the Ray cluster at {address} {given}",
                             "set RAY_AUTH_TOKEN to the cluster's token (or RAY_AUTH_TOKEN_PATH to a file holding it)")


def ray_preflight(cfg: RunConfig) -> None:
    """With pipeline.engine=ray and RAY_ADDRESS set: check_access (a RayAccessError names
    RAY_ADDRESS); nothing otherwise. (That every node sees the config's local paths is checked
    when the engine connects: tempflow_core.engines.ray_engine.check_nodes_see.)"""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if cfg.pipeline.engine == "ray" and address:
        check_access(address)


@contextlib.contextmanager
def ray_cluster(num_cpus: int | None = None, num_gpus: int | None = None) -> Iterator[str]:
    """The address of the Ray cluster to drive: RAY_ADDRESS when set (nothing started; with a
    configured token this process's driver uses token mode), else a local head on 127.0.0.1
    with `num_cpus` logical CPUs (and `num_gpus` GPUs, else the ones Ray finds; tests give a CPU
    machine pretend GPUs to check placements) and a token of its own (head_token), stopped when
    the block ends."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        auth = {"RAY_AUTH_MODE": "token"} if token_configured() and "RAY_AUTH_MODE" not in os.environ else {}
        with _environ(auth):
            yield address
        return
    if "ray" not in sys.modules:  # the driver's own servers: 127.0.0.1 too (read when Ray is imported)
        for k, v in LOCAL_ONLY.items():
            os.environ.setdefault(k, v)
    port = free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    cmd = [str(ray_cli) if ray_cli.exists() else "ray", "start", "--head", f"--port={port}",
           "--include-dashboard=false", "--disable-usage-stats", "--block"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    with head_token() as auth, _environ(auth):
        proc = spawn(cmd, grace=5.0, env={**os.environ, **LOCAL_ONLY}, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
        try:
            _wait_listening(port, proc, timeout=120)
            yield f"127.0.0.1:{port}"
        finally:
            stop(proc, timeout=15)
