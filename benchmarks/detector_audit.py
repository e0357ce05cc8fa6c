"""Audit the shapes detector on trained images: how much of a run's measured gain holds under a
stricter reading of the images.

    python -m benchmarks.detector_audit --store STORE --run RUN [--run RUN ...] \\
        --eval-seed 4321 --out results/detector-audit

For each run: the base model (the run's initial adapter, which is the base) and the run's last
checkpoint (its EMA when EMA is on, as the evaluation uses) sample the run's evaluation
protocol (prompts, images per category, ODE steps, CFG) from other noise (`--eval-seed`), so
the images are none the run was evaluated on. Every image is scored by the detector's rules
before the audit (`RULES_V1`) and by the current ones (`RULES`). Writes to `--out`:

* `images.jsonl`: one line per image (model, run, prompt, category, noise seed, strict and
  partial score under each rule set, and why the current rules reject what the old passed);
* `summary.md`: the GenEval-style overall and per-category scores of base and trained under
  both rule sets, and how much of each run's gain over the base holds under the current rules;
* `rejected.png`: trained images the old rules passed and the current ones reject (the first 48);
* `accepted-iou-0.7-0.8.png`: trained images with an object the current rules accept at a
  template IoU of 0.7-0.8, which a threshold of 0.8 would reject (the first 48).

`--report-only` writes summary.md again from `images.jsonl` alone.

The images themselves are kept in `--cache` (default: `tempflow-detector-audit/` in the
system's temporary folder, outside the checkout), so a rescoring after a change of the rules
samples nothing again.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from tempflow_core.algorithm.checkpoint import load_checkpoint
from tempflow_core.algorithm.evaluation import category, eval_prompts, eval_samples, images_per_prompt
from tempflow_core.algorithm.rollout import sample_images
from tempflow_core.algorithm.session import restore, setup
from tempflow_core.config import RunConfig
from tempflow_core.run.layout import RunLayout
from tempflow_core.run.runs import read_run
from tempflow_core.reports.paired import compare
from tempflow_core.seeding import derive_seed
from tempflow_core.shapes import RULES, RULES_V1, DetectorRules, detect, image_grid, score_objects
from tempflow_core.shapes.world import TAGS

SENSITIVITY = [(c, s) for c in (0.5, 0.6, 0.7, 0.8) for s in (0.0, 0.6, 0.8, 0.9)]  # (min_confidence, min_color_share)


def run_config(store: str, run: str) -> tuple[RunConfig, RunLayout]:
    probe = RunConfig.model_validate({"pipeline": {"store": store}})
    record = read_run(RunLayout.open(probe, run))
    if record is None:
        print(f"run {run!r} not found in store {store}: pass the store the run lives in (--store)", file=sys.stderr)
        raise SystemExit(2)
    cfg = RunConfig.model_validate(record["config"])
    return cfg, RunLayout.open(cfg, run)


def sample(cfg: RunConfig, layout: RunLayout, iteration: int, eval_seed: int) -> tuple[np.ndarray, list[dict]]:
    """[N, H, W, 3] uint8 images of checkpoint `iteration` (-1: the initial adapter) on the run's
    evaluation protocol, from the noise of `eval_seed`; with one record per image."""
    s = setup(cfg)
    last = layout.last_finished(cfg.train.iterations) if iteration == -2 else iteration
    ck = load_checkpoint(layout.store, layout.prefix(last, "learner"))
    restore(s, ck, with_optimizer=False)
    if ck.ema is not None:
        s.policy.load_lora_state_dict(ck.ema)
    records = eval_prompts(cfg)
    samples = eval_samples(records, images_per_prompt(records, cfg.eval.images_per_prompt, cfg.eval.images_per_category))
    sched = s.policy.schedule(cfg.sampling.eval_num_steps, cfg.sampling.shift, cfg.sampling.noise_level)
    texts, ids = [r.text for r, _ in samples], [i for _, i in samples]
    with torch.no_grad():
        images = np.concatenate([sample_images(s.policy, texts[i:i + 64], ids[i:i + 64], sched, cfg.guidance_scale(),
                                               eval_seed, cfg.rollout.max_batch) for i in range(0, len(texts), 64)])
    meta = [{"iteration": last, "prompt": r.text, "category": category(r), "noise": i,
             "seed": derive_seed(eval_seed, "init", i), "metadata": r.metadata} for (r, _), i in zip(samples, ids)]
    return images, meta


def cached(cache: Path, key: str, make) -> tuple[np.ndarray, list[dict]]:
    img, rec = cache / f"{key}.npy", cache / f"{key}.json"
    if img.exists() and rec.exists():
        return np.load(img, allow_pickle=False), json.loads(rec.read_text())
    images, meta = make()
    cache.mkdir(parents=True, exist_ok=True)
    np.save(img, images, allow_pickle=False)
    rec.write_text(json.dumps(meta))
    return images, meta


def _key(conf: float, share: float) -> str:
    return f"{conf}/{share}"


def per_image(images: np.ndarray, meta: list[dict], model: str) -> list[dict]:
    """One record per image: its strict and partial scores under v1 and v2, what v2 drops of what
    v1 detected, and its strict score under every rule set of SENSITIVITY ("IoU/share": 0 or 1)."""
    old, new = detect(images, rules=RULES_V1), detect(images, rules=RULES)
    grid = {_key(c, sh): detect(images, rules=DetectorRules(c, sh)) for c, sh in SENSITIVITY}
    out = []
    for j, (m, a, b) in enumerate(zip(meta, old, new)):
        sa, sb = score_objects(a, m["metadata"]), score_objects(b, m["metadata"])
        kept = {(d.bbox, d.color) for d in b}
        dropped = [f"{d.color} {d.shape} (IoU {d.confidence:.2f}, colour share {d.color_share:.2f})"
                   for d in a if (d.bbox, d.color) not in kept]
        out.append({"model": model, **{k: m[k] for k in ("iteration", "prompt", "category", "noise", "seed")},
                    "v1_strict": int(sa.strict), "v1_partial": round(sa.partial, 4),
                    "v2_strict": int(sb.strict), "v2_partial": round(sb.partial, 4), "v2_dropped": dropped,
                    "strict_at": {k: int(score_objects(d[j], m["metadata"]).strict) for k, d in grid.items()}})
    return out


def _strict(records: list[dict], model: str, field: str) -> dict[str, dict[str, int]]:
    """{category: {noise id: strict 0/1}} of one model's images under `field` (v1_strict,
    v2_strict or a key of strict_at)."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        if r["model"] == model:
            v = r[field] if field in r else r["strict_at"][field]
            out.setdefault(r["category"], {})[r["noise"]] = v
    return out


def _overall(by_cat: dict[str, dict[str, float]]) -> float:
    return float(np.mean([np.mean(list(v.values())) for v in by_cat.values()]))


def _gain(records: list[dict], runs: list[str], field: str, minus: str | None = None) -> tuple[float, float]:
    """The runs' mean gain over the base under `field`, paired by image; with `minus`, the
    difference of that gain and the gain under `minus`."""
    def gain_of(f: str) -> dict[str, dict[str, float]]:
        base = _strict(records, "base", f)
        trained = [_strict(records, run, f) for run in runs]
        return {c: {i: float(np.mean([t[c][i] for t in trained])) - b for i, b in base[c].items()} for c in base}
    g = gain_of(field)
    if minus is not None:
        h = gain_of(minus)
        g = {c: {i: v - h[c][i] for i, v in g[c].items()} for c in g}
    groups = [c for c in g for _ in g[c]]
    r = compare(np.array([[v for c in g for v in g[c].values()]]), np.zeros((1, len(groups))), groups)
    return r.diff, r.se  # one row: the error is the evaluation set's, paired by image


def summarize(records: list[dict]) -> str:
    """summary.md from the per-image records alone: scores under both rule sets, each run's gain
    over the base with its error (paired by image), and the gain under other thresholds."""
    models = list(dict.fromkeys(r["model"] for r in records))
    runs = [m for m in models if m != "base"]
    cols = ["overall", *[t for t in TAGS if any(r["category"] == t for r in records)]]
    lines = ["| model | rules | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for model in models:
        for v in ("v1", "v2"):
            by = _strict(records, model, f"{v}_strict")
            cells = [_overall(by)] + [float(np.mean(list(by[c].values()))) for c in cols[1:]]
            lines.append(f"| {model} | {v} | " + " | ".join(f"{x:.3f}" for x in cells) + " |")
    gains = ["| run | gain over the base, v1 (SE) | gain, v2 (SE) | v2 gain - v1 gain (SE) |", "|---|---:|---:|---:|"]
    for label, rs in [*[(r, [r]) for r in runs], ("mean of the runs", runs)]:
        (g1, e1), (g2, e2), (d, ed) = (_gain(records, rs, "v1_strict"), _gain(records, rs, "v2_strict"),
                                       _gain(records, rs, "v2_strict", "v1_strict"))
        gains.append(f"| {label} | {g1:+.3f} ({e1:.3f}) | {g2:+.3f} ({e2:.3f}) | {d:+.3f} ({ed:.3f}) |")
    g1 = _gain(records, runs, "v1_strict")[0]
    sens = ["| min IoU | min colour share | base | trained (mean of the runs) | gain (SE) | of the v1 gain |",
            "|---:|---:|---:|---:|---:|---:|"]
    for conf, share in SENSITIVITY:
        k = _key(conf, share)
        b = _overall(_strict(records, "base", k))
        t = float(np.mean([_overall(_strict(records, run, k)) for run in runs]))
        g, e = _gain(records, runs, k)
        sens.append(f"| {conf} | {share} | {b:.3f} | {t:.3f} | {g:+.3f} ({e:.3f}) | {g / g1:.0%} |")
    return "\n".join([
        "# Detector audit", "",
        "GenEval-style overall and per-category strict accuracy of the base model and each run's last checkpoint "
        "on the evaluation protocol's prompts from other noise, under the detector's rules before the audit (v1: "
        "template IoU >= 0.5) and after it (v2, the default: IoU >= 0.7 and >= 80% of the blob's coloured pixels):",
        "", *lines, "",
        "Gains over the base model; errors are paired by image (the base and a run sample the same prompt from the "
        "same noise) and hold for this evaluation set, not for training seeds:", "", *gains, "",
        "The gain under other thresholds (v1 is IoU 0.5 with share 0, v2 IoU 0.7 with share 0.8):", "", *sens, ""])


def rejected_sheet(records: list[dict], sets: dict[str, tuple[np.ndarray, list[dict]]], path: Path, limit: int = 48) -> int:
    """A grid of trained images the old rules passed and the current ones reject."""
    picks = []
    for name, (im, _) in sets.items():
        if name != "base":
            mine = [r for r in records if r["model"] == name]
            picks += [im[i] for i, r in enumerate(mine) if r["v1_strict"] and not r["v2_strict"]]
    if picks:
        grid = image_grid(np.stack(picks[:limit]), ncols=8)
        grid.resize((grid.width * 2, grid.height * 2), resample=0).save(path)
    return len(picks)


def band_sheet(sets: dict[str, tuple[np.ndarray, list[dict]]], path: Path, band: tuple[float, float] = (0.7, 0.8),
               limit: int = 48) -> int:
    """A grid of trained images with an object the current rules accept at a template IoU in
    `band`: what a stricter IoU threshold would reject."""
    picks = []
    for name, (im, _) in sets.items():
        if name != "base":
            picks += [im[i] for i, ds in enumerate(detect(im)) if any(band[0] <= d.confidence < band[1] for d in ds)]
    if picks:
        grid = image_grid(np.stack(picks[:limit]), ncols=8)
        grid.resize((grid.width * 2, grid.height * 2), resample=0).save(path)
    return len(picks)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store")
    ap.add_argument("--run", action="append", default=[])
    ap.add_argument("--report-only", action="store_true", help="write summary.md from --out's images.jsonl alone")
    ap.add_argument("--iteration", type=int, default=-2, help="checkpoint to audit (default: the last finished)")
    ap.add_argument("--eval-seed", type=int, default=4321)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.report_only:
        (args.out / "summary.md").write_text(summarize(read_records(args.out / "images.jsonl")))
        return
    if not args.store or not args.run:
        ap.error("--store and at least one --run are needed (or --report-only)")
    torch.set_num_threads(args.threads)
    cache = args.cache or Path(tempfile.gettempdir()) / "tempflow-detector-audit"
    sets = {}
    for run in args.run:
        cfg, layout = run_config(args.store, run)
        if "base" not in sets:
            sets["base"] = cached(cache, f"base-{args.eval_seed}", lambda: sample(cfg, layout, -1, args.eval_seed))
        sets[run] = cached(cache, f"{run}-{args.iteration}-{args.eval_seed}",
                           lambda: sample(cfg, layout, args.iteration, args.eval_seed))
        print(f"{run}: {len(sets[run][0])} images", flush=True)
    records = [r for name, (im, meta) in sets.items() for r in per_image(im, meta, name)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = summarize(records)
    (args.out / "summary.md").write_text(summary)
    n = rejected_sheet(records, sets, args.out / "rejected.png")
    k = band_sheet(sets, args.out / "accepted-iou-0.7-0.8.png")
    print(summary)
    print(f"{n} trained images pass v1 and fail v2 ({args.out / 'rejected.png'} shows the first 48); "
          f"{k} hold an object v2 accepts at IoU 0.7-0.8 ({args.out / 'accepted-iou-0.7-0.8.png'})")


if __name__ == "__main__":
    main()
