"""One writer per run: the run lock over both stores, and clearing what a killed writer left."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tempflow_core.run.layout import RunLayout
from tempflow_core.run.runlock import RunLocked, acquire, clean_after_kill, release, run_lock


def test_put_if_absent_creates_once(store):
    assert store.put_if_absent("r/lock.json", b"first") is True
    assert store.put_if_absent("r/lock.json", b"second") is False
    assert store.get_bytes("r/lock.json") == b"first"
    assert store.list("r") == ["r/lock.json"]  # no temp file left beside it


def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_is_released(store):
    lay = RunLayout(store, "run1")
    with run_lock(lay):
        holder = json.loads(store.get_bytes("run1/lock.json"))
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunLocked, match=f"run 'run1' is being written by pid {os.getpid()} on host "):
            acquire(lay)
    assert not store.exists("run1/lock.json")
    token = acquire(lay)  # free again
    release(lay, token)


def test_a_lock_of_a_live_process_holds_and_of_a_dead_one_is_taken_over(store):
    lay = RunLayout(store, "run2")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        store.put_bytes("run2/lock.json", json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                      "token": "t", "since": "then"}).encode())
        with pytest.raises(RunLocked, match=f"pid {other.pid} on host"):
            acquire(lay)
    finally:
        other.kill()
        other.wait()
    token = acquire(lay)  # its holder is gone (SIGKILL): stale, taken over
    assert json.loads(store.get_bytes("run2/lock.json"))["token"] == token
    release(lay, token)
    # a holder on another host cannot be checked from here: refused, naming the lock to delete
    store.put_bytes("run2/lock.json", json.dumps({"pid": 1, "host": "elsewhere", "token": "t"}).encode())
    with pytest.raises(RunLocked, match="on host elsewhere .*delete .*run2/lock.json"):
        acquire(lay)


def test_leftovers_of_a_killed_writer_are_removed_on_the_next_start(tmp_path):
    from tempflow_core.storage import open_store

    store = open_store(tmp_path / "store")
    store.put_bytes("run3/iter-000000/rollout/shard-000000.tar", b"kept")
    leftover = tmp_path / "store" / "run3" / "iter-000000" / "rollout" / ".shard-000001.tar.tmp-0123456789ab"
    leftover.write_bytes(b"half")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = tmp_path / "tmp"
    for name in (f"tempflow-shards-{dead.pid}-abc", f"tempflow-shards-{os.getpid()}-def", "tempflow-shards-old"):
        (tmp / name).mkdir(parents=True)
    assert clean_after_kill(RunLayout(store, "run3"), str(tmp)) == {"temp_objects": 1, "shard_folders": 1}
    assert not leftover.exists() and store.list("run3") == ["run3/iter-000000/rollout/shard-000000.tar"]
    assert sorted(p.name for p in tmp.iterdir()) == [f"tempflow-shards-{os.getpid()}-def", "tempflow-shards-old"]


def test_unfinished_multipart_uploads_are_aborted(s3_store):
    c = s3_store.client
    up = c.create_multipart_upload(Bucket=s3_store.bucket, Key=s3_store.full_key("run4/iter-000000/rollout/big.tar"))
    assert clean_after_kill(RunLayout(s3_store, "run4"))["temp_objects"] == 1
    assert c.list_multipart_uploads(Bucket=s3_store.bucket).get("Uploads", []) == []
    assert up["UploadId"]
