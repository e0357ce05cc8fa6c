"""A run on the object store: its stages, where their outputs live, and what keeps it whole.

    stages.py          the pipeline's stages as functions over the store (manifests written last)
    layout.py          where a run's stage outputs live, which are finished
    runs.py            run records (run.json) and branching a new run from a finished one
    runlock.py         one writer per run; what a killed writer left is cleared
    healing.py         damaged or stale outputs quarantined and recomputed
    invalidation.py    which stages a changed setting invalidates
    fingerprints.py    the sha256 of every file a config points at
    preflight.py       every input checked before any work (exit 2 naming the field)
    rollout_slices.py  a rollout stage cut into slices (the unit of rollout work) and merged
    export.py          a checkpoint as a diffusers LoRA folder with its recipe

Imports: the base modules, the data plane, rewards, policies and algorithm; never engines or reports.
"""
