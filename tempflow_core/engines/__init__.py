"""Where a run's stage work runs: one interface (engine.py: Engine, and LocalEngine, here) and
the Ray engine (ray_engine.py: actors and a Ray Train group, the only module that imports Ray).

Imports: run (the stages) and everything below it; never reports.
"""
