"""Compare two variants image by image: per-image records from a run store, and the paired
comparison of `tempflow_core.reports.paired` at every evaluated iteration.

    tempflow report results/<experiment> --store STORE --kind paired   # records + summary
    tempflow report results/<experiment>                                # summary from the records

Records (`images.jsonl`): one line per evaluated image of every run in the store (variant,
training seed, iteration, prompt, category, noise seed, strict score, reward, the detector's
rules). `summary.md`: for every iteration both variants evaluated, a - b of the GenEval-style
overall paired by training seed and by image, its standard error (seeds and the shared
evaluation set), p and the verdict ("beyond the noise" from 4 seeds and p < 0.05 only).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tempflow_core.reports.paired import compare
from tempflow_core.reports.records import RecordsError
from tempflow_core.reports.report import write_text
from tempflow_core.run.layout import RunLayout
from tempflow_core.storage import join_key, open_store


def collect(store_uri: str) -> list[dict]:
    """Every evaluated image of every run in the store, as records."""
    store = open_store(store_uri)
    out = []
    for run in RunLayout.runs(store):
        lay = RunLayout(store, run)
        cfg = json.loads(store.get_bytes(lay.record_key))["config"]
        for key in sorted(k for k in store.list(run) if k.endswith("/eval/eval.json")):
            it = lay.iteration_of(key)
            if it is None or key != join_key(lay.prefix(it, "eval"), "eval.json"):
                continue  # not an iteration's evaluation (one moved aside under quarantine/)
            ev = json.loads(store.get_bytes(key))
            if not all("strict" in s for s in ev.get("samples", [])):
                continue  # an evaluation made before per-image scores were recorded
            for s in ev["samples"]:
                out.append({"variant": cfg["algorithm"], "seed": cfg["train"]["seed"], "iteration": it + 1,
                            "prompt": s["prompt"], "category": s["category"], "noise_seed": s["seed"],
                            "strict": s["strict"], "reward": round(s["reward"], 6),
                            "detector": ev.get("detector_rules", "v1"), "run": run})
    return out


def _matrix(records: list[dict], variant: str, iteration: int, seeds: list[int], items: list[tuple]) -> np.ndarray:
    by = {(r["seed"], r["prompt"], r["noise_seed"]): r["strict"] for r in records
          if r["variant"] == variant and r["iteration"] == iteration}
    return np.array([[by[(s, *i)] for i in items] for s in seeds], dtype=float)  # [S, I]


def summarize(records: list[dict], a: str, b: str) -> str:
    lines = [f"# {a} - {b}, paired by training seed and image", "",
             "GenEval-style overall (strict), difference of the seed means; the standard error holds the seeds' "
             "spread and the shared evaluation set's; p from a t-test (Welch-Satterthwaite degrees of freedom); "
             "beyond the noise only from 4 seeds and p < 0.05 (`tempflow_core/reports/paired.py`).", "",
             f"| iteration | seeds | {a} | {b} | difference | SE (seeds, items) | p | seeds won | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for it in sorted({r["iteration"] for r in records}):
        seeds = sorted({r["seed"] for r in records if r["iteration"] == it and r["variant"] == a}
                       & {r["seed"] for r in records if r["iteration"] == it and r["variant"] == b})
        if not seeds:
            continue
        first = [r for r in records if r["iteration"] == it and r["variant"] == a and r["seed"] == seeds[0]]
        items = [(r["prompt"], r["noise_seed"]) for r in first]
        groups = [r["category"] for r in first]
        ma, mb = _matrix(records, a, it, seeds, items), _matrix(records, b, it, seeds, items)
        res = compare(ma, mb, groups)
        mean = lambda m: float(np.mean([np.mean([m[s][np.array(groups) == c].mean() for c in sorted(set(groups))])
                                        for s in range(len(seeds))]))
        verdict = "beyond the noise" if res.beyond else "within the noise"
        lines.append(f"| {it} | {len(seeds)} | {mean(ma):.3f} | {mean(mb):.3f} | {res.diff:+.4f} | {res.se:.4f} "
                     f"({res.se_seeds:.4f}, {res.se_items:.4f}) | {res.p:.3f} | {res.won}/{res.seeds} | {verdict} |")
    return "\n".join(lines) + "\n"


IMAGES = "images.jsonl"


def is_pairs_folder(folder: Path) -> bool:
    return (folder / IMAGES).is_file()


def report(out: Path, store: str | None = None, a: str = "tempflow", b: str = "flow_grpo_fixed") -> str:
    """Collect the per-image records from `store` into `out` (or read `out`'s), write summary.md
    (a - b at every iteration both evaluated) and return it."""
    path = out / IMAGES
    if store:
        records = collect(store)
        if not records:
            raise RecordsError(f"no evaluated image in store {store}: pass the store the runs wrote to (--store)")
        out.mkdir(parents=True, exist_ok=True)
        write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    elif not path.is_file():
        raise RecordsError(f"{path} does not exist: collect the records with --store first")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    variants = sorted({r["variant"] for r in records})
    missing = [v for v in (a, b) if v not in variants]
    if missing:
        raise RecordsError(f"--pair: {missing[0]!r} is not a variant of these records: use two of {variants}")
    summary = summarize(records, a, b)
    write_text(out / "summary.md", summary)
    return summary
