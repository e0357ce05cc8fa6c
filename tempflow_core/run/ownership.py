"""Where a run may write: a run folder is new or holds a run, and a store root holds only runs.

A mistyped `pipeline.store` (`file:///etc`) or `--run-id` (the name of someone's folder) must
not get `run.json`, `init/` and `prompts/` written among files that are not a run's. Before a
run writes anything:

    {store}/{run}/        absent, empty, holding only a lock (a run that stopped before its
                          record), or holding run.json: a run. Anything else is refused.
    {store}/              every entry (the first 200 looked at) is such a run folder; loose
                          files or other folders are refused unless pipeline.shared_store is
                          set (a bucket or folder shared with other data). Hidden names
                          (".DS_Store") and the project's own `_baselines/` are not looked at.
"""

from __future__ import annotations

from tempflow_core.run.layout import LOCK_FILE, RUN_FILE  # a lock alone is no sign that a run exists
from tempflow_core.storage import ObjectStore, join_key

BASELINES = "_baselines"  # the base model's evaluations (baseline.py); never a run id (those start alphanumeric)
ROOT_ENTRIES_CHECKED = 200  # a store root's first entries looked at (a large store: one listing page)
RUN_FOLDER_FIX = "choose another run id"
STORE_ROOT_FIX = ("point pipeline.store at a folder or bucket prefix of its own, or set pipeline.shared_store=true "
                  "to write runs beside other data")


def is_run_folder(store: ObjectStore, name: str) -> bool:
    """Whether the folder `name` at the store root is absent, empty, a run's, or a run's lock alone."""
    if store.exists(join_key(name, RUN_FILE)):
        return True
    return store.entries(name, limit=2) in ([], [LOCK_FILE])


def run_folder_problem(store: ObjectStore, run_id: str) -> str | None:
    """What is wrong with writing run `run_id` (its folder holds things but no run); None: nothing."""
    if is_run_folder(store, run_id):
        return None
    seen = store.entries(run_id, limit=3)
    return (f"{store.uri_for(run_id)} already holds files that are not a tempflow run ({', '.join(seen[:2])}"
            f"{', ...' if len(seen) > 2 else ''}; no {RUN_FILE})")


def foreign_entries(store: ObjectStore, limit: int = ROOT_ENTRIES_CHECKED) -> list[str]:
    """The entries among the store root's first `limit` that are not run folders."""
    out = []
    for name in store.entries("", limit=limit):
        if name.startswith(".") or name == BASELINES + "/":
            continue
        if not name.endswith("/") or not is_run_folder(store, name.rstrip("/")):
            out.append(name)
    return out


def store_root_problem(store: ObjectStore, shared: bool) -> str | None:
    """What is wrong with writing runs at the store root (it holds other things and is not
    declared shared); None: nothing."""
    if shared:
        return None
    foreign = foreign_entries(store)
    if not foreign:
        return None
    return (f"{store.uri} holds things that are not tempflow runs ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''})")
