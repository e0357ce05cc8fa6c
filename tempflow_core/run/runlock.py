"""One writer per run: a lock object on the store, and clearing what a killed writer left.

`run_lock(layout)` creates `{run}/lock.json` with a conditional write (local store: a hard
link, which fails when the file exists; S3: a PUT with If-None-Match: *) holding the
holder's pid, host and a random token. A second process on the same run id is refused with
a message naming the holder. A lock whose holder is gone (same host, pid no longer alive:
a SIGKILLed run) is stale and taken over; a lock held from another host cannot be checked
from here and is refused, naming the object to delete once that host's run is known dead.

Holding the lock, a run clears what a killed writer left: hidden temp files and unfinished
multipart uploads under the run, and shard temp folders of dead processes on this machine.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

from tempflow_core.run.layout import RunLayout
from tempflow_core.shards.writing import SHARD_TMP
from tempflow_core.storage import ObjectNotFound

log = logging.getLogger("tempflow.runlock")



class RunLocked(RuntimeError):
    """Another live process writes this run."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(layout: RunLayout, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(layout.store.get_bytes(key))
    except ObjectNotFound:
        return None
    except ValueError:  # a torn or foreign file: treat as held by nobody we know
        return {}


def _stale(holder: dict[str, Any]) -> bool:
    return holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
        and holder["pid"] != os.getpid() and not pid_alive(holder["pid"])


def held_by_another(layout: RunLayout) -> str | None:
    """Why `layout`'s run cannot be written now (a live holder of its lock, or one on another
    host), in one line; None when it is free or its holder is gone. Reads only: the check a
    command makes before it creates any state (`acquire` still decides)."""
    holder = _read(layout, layout.lock_key)
    if holder is None or _stale(holder):
        return None
    return (f"run {layout.run_id!r} is being written by pid {holder.get('pid')} on host {holder.get('host')} "
            f"(since {holder.get('since')}); wait for that run to end, or if it is dead delete "
            f"{layout.store.uri_for(layout.lock_key)}")


def acquire(layout: RunLayout) -> str:
    """Take the run's lock; returns its token. Raises RunLocked naming the live holder."""
    key = layout.lock_key
    me = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex,
          "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):
        if layout.store.put_if_absent(key, json.dumps(me, sort_keys=True).encode()):
            return me["token"]
        holder = _read(layout, key)
        if holder is None:  # released meanwhile
            continue
        if _stale(holder) and _read(layout, key) == holder:
            log.warning("run %s: taking over the lock of pid %s on %s, which is gone", layout.run_id,
                        holder["pid"], holder["host"])
            layout.store.delete(key)
            continue
        raise RunLocked(
            f"run {layout.run_id!r} is being written by pid {holder.get('pid')} on host {holder.get('host')} "
            f"(since {holder.get('since')}); two writers would corrupt it. Wait for that run to end; if it is dead "
            f"(another host cannot be checked from here), delete {layout.store.uri_for(key)}")
    raise RunLocked(f"run {layout.run_id!r}: could not take its lock {layout.store.uri_for(key)} (contended)")


def release(layout: RunLayout, token: str) -> None:
    """Delete the lock if it is still ours."""
    key = layout.lock_key
    holder = _read(layout, key)
    if holder and holder.get("token") == token:
        layout.store.delete(key)


def clean_after_kill(layout: RunLayout, tmp_dir: str | None = None) -> dict[str, int]:
    """Remove what killed writers left: temp files / unfinished uploads under the run (call it
    holding the run's lock) and shard temp folders of dead processes in `tmp_dir`."""
    files = layout.store.clean_temporary(layout.run_id)
    folders = 0
    root = Path(tmp_dir or tempfile.gettempdir())
    for folder in root.glob(f"{SHARD_TMP}*"):
        pid = folder.name[len(SHARD_TMP):].split("-", 1)[0]
        if folder.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            folders += 1
    if files or folders:
        log.info("run %s: removed %d temp objects and %d shard temp folders a killed run left", layout.run_id,
                 files, folders)
    return {"temp_objects": files, "shard_folders": folders}


@contextlib.contextmanager
def run_lock(layout: RunLayout) -> Iterator[dict[str, int]]:
    """Hold the run's lock for the block, after clearing what a killed writer left."""
    token = acquire(layout)
    try:
        yield clean_after_kill(layout)
    finally:
        release(layout, token)
