"""`tempflow plan`: a run's device memory, rows and minutes per iteration before it starts
(registered on the CLI's app in flows/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli_errors import fail as _fail
from flows.resolve import resolve


def plan(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML/JSON run config (as tempflow train)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override: section.field=value (repeatable)."),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", help="GiB of one GPU: exit 2 with one line "
                                               "naming the setting to change when a stage does not fit."),
    settings: bool = typer.Option(False, "--settings", help="Also print what each setting that cuts rows (and "
                                  "`--preset fast`) would cost on this config: rows and H200 minutes."),
) -> None:
    """Estimate a run before any weight is allocated: peak device memory per stage and worker
    (weights, LoRA and optimizer, activations, latents kept, decode), transformer rows per
    iteration and minutes per iteration on one H100 / H200.

        tempflow plan --config flows/configs/models/sd35m.yaml --gpu-memory 80
        tempflow plan --config flows/configs/models/sd35m.yaml --settings
    """
    from tempflow_core.memory import GIB, estimate, load_facts, probe
    from tempflow_core.rewards import RewardRegistry
    from tempflow_core.run.plan import (
        minutes, placements, refusal, rows_per_iteration, size, store_bytes, table, wall_minutes,
    )

    cfg = resolve(config, set_)
    if cfg.model.path and not (Path(cfg.model.path) / "model_index.json").is_file():
        _fail(f"model.path: {cfg.model.path!r} is not a saved diffusers pipeline (no model_index.json); fix: point "
              "it at the model folder (its config files are enough: no weights are read)")
    typer.echo(f"probing {cfg.model.path or 'the tiny model'} ({cfg.model.dtype}) on the CPU ...", err=True)
    facts, pipe = load_facts(cfg)
    sample = probe(pipe, cfg.lora, cfg.model.dtype, facts.pixels, cfg.model.max_sequence_length, cfg.guidance_scale(),
                   cfg.model.num_frames)
    memory = estimate(cfg, facts, sample)
    nfe, units = rows_per_iteration(cfg)
    rows = cfg.rows_per_sample()
    reward_gpus = RewardRegistry.for_config(cfg.reward).needs_gpu(cfg.reward.name, cfg.reward.weights)
    where = placements(cfg, reward_gpus)  # the run's placement first
    mine = where[0]
    workers = {"rollout": mine.rollout_workers, "learner": mine.learner_workers, "eval": 1}
    typer.echo(f"{cfg.algorithm} on {cfg.model.path or 'a tiny random model'}: {cfg.rollout.prompts_per_iter} prompts x "
               f"K {cfg.rollout.group_size}, T {cfg.sampling.num_steps}, {facts.pixels} px, {cfg.model.dtype}, "
               f"{cfg.train.iterations} iterations")
    typer.echo(f"peak device memory (estimated for a GPU; {sum(facts.component_params.values()) / 1e6:,.1f} M "
               f"parameters, LoRA {facts.lora_params / 1e6:.2f} M):")
    for line in table(memory, workers):
        typer.echo(line)
    typer.echo(f"rows per iteration: rollout {nfe:,.0f} NFE, learner {units:,.0f} units; "
               f"{(nfe + 2 * units) * rows:,.0f} transformer rows")
    tensors, images = store_bytes(cfg, facts)
    typer.echo(f"rollout shards per iteration: {size(tensors)} of learner inputs + at most {size(images)} of images "
               f"(PNG)")
    per_gpu = minutes(cfg, facts)  # H200, H100
    for m in per_gpu:
        wall = wall_minutes(cfg, m, mine)
        typer.echo(f"one {m.gpu}: {m.total:.2f} GPU-minutes per iteration (rollout {m.rollout:.2f}, learner "
                   f"{m.learner:.2f}), {wall:.2f} min wall on {mine.rollout_workers} rollout / {mine.learner_workers} "
                   f"learner GPUs, {wall * cfg.train.iterations / 60:.1f} h for the run "
                   f"({'per-row costs measured on this GPU' if m.measured else 'estimated'}; rewards and "
                   "orchestration not counted)")
    if cfg.pipeline.engine == "ray":
        h200 = per_gpu[0]
        peak = max(f.peak for f in memory.values())
        for i, p in enumerate(where):
            wall = wall_minutes(cfg, h200, p)
            hours = wall * cfg.train.iterations / 60
            held = f"the largest stage peak, {size(peak)}, per GPU" if p.name == "colocated" else "a model per GPU"
            gpus = f"{p.gpus} GPU{'s' if p.gpus != 1 else ''}"
            typer.echo(f"{'this run' if i == 0 else 'instead'}: {p.name} placement on Ray holds {gpus} "
                       f"({held}; the reward {'takes a GPU per actor' if reward_gpus else 'takes none'}): "
                       f"{wall:.2f} min wall per iteration on H200s, {hours * p.gpus:,.0f} GPU-hours for the run")
    if settings:
        _settings_table(cfg, facts)
    if gpu_memory is not None:
        why = refusal(memory, gpu_memory * GIB, f"a {gpu_memory:g} GiB GPU")
        if why:
            _fail(why)
        typer.echo(f"fits a {gpu_memory:g} GiB GPU")


def _settings_table(cfg, facts) -> None:
    """The rows and one H200's minutes of each cost setting applied to `cfg` (run.plan.setting_costs)."""
    from tempflow_core.run.plan import DRAWS, setting_costs

    costs = setting_costs(cfg, facts)
    first = costs[0]
    run = first.minutes.total * first.iterations
    typer.echo(f"\ncost settings on this config (one H200; rows averaged over {DRAWS:,} iterations where steps "
               "are drawn; rewards and orchestration not counted):\n")
    typer.echo("| setting | rollout NFEs | learner units | rows | rollout min | learner min | iteration min | "
               "of this config's | run min | of this config's |")
    typer.echo("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in costs:
        if isinstance(c, tuple):
            typer.echo(f"| {c[0]} | not for this config: {c[1]} |||||||||")
            continue
        m = c.minutes
        typer.echo(f"| {c.label} | {c.nfe:,.0f} | {c.units:,.0f} | {c.rows:,.0f} | {m.rollout:.1f} | {m.learner:.1f} | "
                   f"{m.total:.1f} | {m.total / first.minutes.total:.2f} | {m.total * c.iterations:,.0f} | "
                   f"{m.total * c.iterations / run:.2f} |")
    typer.echo("\nrows: transformer rows as the `rollout/rows` and `learner/rows` metrics count them: rollout NFEs and "
               "the learner's two forwards per unit (with grad, and the KL reference's), each x2 under CFG; "
               f"minutes {'measured' if first.minutes.measured else 'estimated'} from SD3.5-M's per-row costs")
