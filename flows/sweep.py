"""`tempflow sweep`: variants x seeds as in-process training runs, several at a time.

Each run trains through the product's in-process loop (`train_in_process`: no Prefect, no
MLflow, no run store), evaluates the base model first, every `eval_every` iterations and
after the last, and appends each evaluated point to OUT/points.jsonl as it is measured, so a
run stopped at the deadline keeps its curve; a finished run also lands in OUT/runs.jsonl (its
curve, minutes and config, secrets scrubbed: tempflow_core/redaction.py). A point carries the cumulative rollout and learner NFEs (rows
through the transformer, a CFG pair counted once; the learner's include the KL reference's
forward) and the cumulative seconds of rollout, reward and learner up to it.

Runs go `jobs` at a time, each in a process of its own (one torch thread each when several
share the machine) bound to this one's life (flows/children.py), its config handed over in its
environment (never written to disk); a rerun skips the runs runs.jsonl already holds. The report (figures 2 and 5, summary.md, table.md) is then drawn
from the points into OUT, as `tempflow report OUT` redraws it.

    TEMPFLOW_SWEEP_CONFIG=JSON python -m flows.sweep NAME EVAL_EVERY OUT THREADS   # one run (the worker)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

POINTS, RUNS, LOG = "points.jsonl", "runs.jsonl", "log.txt"
CONFIG_ENV = "TEMPFLOW_SWEEP_CONFIG"  # a worker's run config (JSON)


def run_curve(name: str, cfg: Any, eval_every: int, log: Callable[[str], None],
              point: Callable[[str, dict], None] = lambda name, p: None, out_dir: str | None = None) -> dict:
    """The product's in-process training loop (train_in_process) with an evaluation of the base
    model first and every `eval_every` iterations and after the last, each a point of the curve."""
    from tempflow_core.algorithm.train import train_in_process
    from tempflow_core.reports.report import eval_score, eval_se

    curve: list[dict] = []
    cost = {"nfe": 0, "learner_nfe": 0, "rollout_s": 0.0, "reward_s": 0.0, "learner_s": 0.0}  # cumulative, training
    last_train: dict[str, float] = {}
    started: dict[str, float] = {}

    def scored(result: dict) -> dict[str, Any]:
        return {"score": eval_score(cfg.reward.name, result), "se": eval_se(cfg.reward.name, result),
                "reward": result["reward"], "reward_se": result["reward_se"], "categories": result.get("geneval", {})}

    def base(steps) -> None:
        curve.append({"iteration": 0, **scored(steps.evaluate(-1))})
        point(name, curve[-1])
        log(f"{name}: it 0 score {curve[-1]['score']:.3f} ± {curve[-1]['se']:.3f} reward {curve[-1]['reward']:.3f}")

    def iterated(it: int, m: dict[str, float]) -> None:
        for key, metric in (("rollout_s", "time/rollout_s"), ("reward_s", "time/reward_s"),
                            ("learner_s", "time/learner_s")):
            cost[key] += m[metric]
        cost["nfe"] += int(m["rollout/nfe"])
        cost["learner_nfe"] += int(m["learner/nfe"])
        last_train["reward"] = m["reward/mean"]
        log(f"{name}: it {it + 1} train reward {m['reward/mean']:.3f} ratio [{m['train/ratio_min']:.3f}, "
            f"{m['train/ratio_max']:.3f}] clip {m['train/clip_frac']:.3f} kl {m['train/kl']:.2e} "
            f"|g| {m['train/grad_norm']:.2e}")

    def due(it: int) -> bool:
        if (it + 1) % eval_every == 0 or it + 1 == cfg.train.iterations:
            started["eval"] = time.perf_counter()  # the evaluation runs next
            return True
        return False

    def evaluated(it: int, result: dict) -> None:
        curve.append({"iteration": it + 1, "train_reward": last_train["reward"], **cost, **scored(result),
                      "eval_s": time.perf_counter() - started["eval"]})
        point(name, curve[-1])
        log(f"{name}: it {it + 1} eval score {curve[-1]['score']:.3f} ± {curve[-1]['se']:.3f} "
            f"reward {curve[-1]['reward']:.3f}")

    t0 = time.perf_counter()
    train_in_process(cfg, out_dir or tempfile.mkdtemp(prefix=f"sweep-{name}-"), on_iteration=iterated, eval_at=due,
                     on_eval=evaluated, before=base)
    from tempflow_core.redaction import scrub_mapping

    return {"name": name, "curve": curve, "minutes": (time.perf_counter() - t0) / 60,
            "config": scrub_mapping(cfg.model_dump(mode="json"))}


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:  # one short append per line: the runs' processes share the file
        f.write(json.dumps(record) + "\n")


def finished(out: Path) -> set[str]:
    """The names of the runs OUT/runs.jsonl holds."""
    path = out / RUNS
    if not path.exists():
        return set()
    return {json.loads(line)["name"] for line in path.read_text().splitlines() if line.strip()}


def worker(argv: list[str]) -> None:
    """One run: NAME EVAL_EVERY OUT THREADS, its config in CONFIG_ENV (what `sweep` starts)."""
    import torch

    from tempflow_core.config import RunConfig

    name, eval_every, out, threads = argv
    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    cfg = RunConfig.model_validate(json.loads(os.environ.pop(CONFIG_ENV)))
    out_dir = Path(out)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def point(run: str, p: dict) -> None:
        _append(out_dir / POINTS, {"name": run, "device": device, "point": p})

    with tempfile.TemporaryDirectory(prefix=f"sweep-{name}-") as work:
        result = run_curve(name, cfg, int(eval_every), lambda msg: print(msg, flush=True), point, work)
    _append(out_dir / RUNS, result)


def sweep(configs: dict[str, Any], out: Path, eval_every: int, jobs: int, deadline_s: float,
          echo: Callable[[str], None]) -> list[str]:
    """Train every run of `configs` (name -> config) not yet in OUT/runs.jsonl, `jobs` at a time,
    stopping those still running after `deadline_s` seconds (0: no deadline); each run's output
    goes to OUT/log.txt. Returns the names of `configs` that runs.jsonl holds after."""
    from flows import children

    out.mkdir(parents=True, exist_ok=True)
    done = finished(out)
    todo = [n for n in configs if n not in done]
    if len(todo) < len(configs):
        echo(f"{len(configs) - len(todo)} of {len(configs)} runs already in {out / RUNS}: skipped")
    threads = "1" if jobs > 1 else "0"  # 0: torch's own count
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if jobs > 1 else {})}
    running: dict[str, Any] = {}
    started, t0 = 0, time.monotonic()
    with open(out / LOG, "a") as log:
        try:
            while todo or running:
                if deadline_s > 0 and time.monotonic() - t0 > deadline_s:
                    for name in running:
                        echo(f"{name}: stopped at the deadline ({deadline_s:g} s); its points are kept")
                    break
                while todo and len(running) < jobs:
                    name = todo.pop(0)
                    running[name] = children.spawn(
                        [sys.executable, "-m", "flows.sweep", name, str(eval_every), str(out), threads],
                        stdout=log, stderr=log, env={**env, CONFIG_ENV: configs[name].model_dump_json()})
                    started += 1
                    echo(f"{name}: started ({started} of {len(configs) - len(done)})")
                for name, proc in list(running.items()):
                    if proc.poll() is not None:
                        del running[name]
                        echo(f"{name}: finished" if proc.returncode == 0 else
                             f"{name}: failed (exit {proc.returncode}); its output is in {out / LOG}")
                time.sleep(0.5)
        finally:
            for proc in running.values():
                children.stop(proc)
    return [n for n in configs if n in finished(out)]


if __name__ == "__main__":
    worker(sys.argv[1:])
