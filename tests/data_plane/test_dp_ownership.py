"""Where a run may write, on a local folder and on S3: a run folder is new or a run's, and a store
root holds only runs unless it is declared shared."""

from __future__ import annotations

from tempflow_core.run.ownership import foreign_entries, is_run_folder, run_folder_problem, store_root_problem


def test_entries_are_one_level_sorted_with_folders_marked(store):
    for key in ("b/x/deep.bin", "b/y.bin", "a.txt", "c/run.json"):
        store.put_bytes(key, b"1")
    assert store.entries() == ["a.txt", "b/", "c/"]
    assert store.entries("b") == ["x/", "y.bin"] and store.entries("b", limit=1) == ["x/"]
    assert store.entries("nope") == []


def test_a_run_folder_is_absent_empty_locked_or_recorded_and_nothing_else(store):
    store.put_bytes("recorded/run.json", b"{}")
    store.put_bytes("recorded/iter-000000/rollout/manifest.json", b"{}")
    store.put_bytes("locked/lock.json", b"{}")
    store.put_bytes("ssh/sshd_config", b"PermitRootLogin no")
    store.put_bytes("ssh/lock.json", b"{}")  # a lock beside other files does not make them a run
    assert [is_run_folder(store, n) for n in ("absent", "recorded", "locked", "ssh")] == [True, True, True, False]
    assert run_folder_problem(store, "recorded") is None
    problem = run_folder_problem(store, "ssh")
    assert problem and store.uri_for("ssh") in problem and "lock.json, sshd_config" in problem and "run.json" in problem


def test_a_store_root_of_other_things_is_refused_unless_declared_shared(store):
    assert store_root_problem(store, shared=False) is None  # empty
    store.put_bytes("run-a/run.json", b"{}")
    store.put_bytes("run-b/lock.json", b"{}")
    store.put_bytes(".DS_Store", b"x")  # hidden names are not looked at
    assert store_root_problem(store, shared=False) is None
    store.put_bytes("passwd", b"root:x:0:0")
    store.put_bytes("ssh/sshd_config", b"x")
    assert foreign_entries(store) == ["passwd", "ssh/"]
    problem = store_root_problem(store, shared=False)
    assert problem and store.uri in problem and "passwd, ssh/" in problem
    assert store_root_problem(store, shared=True) is None
