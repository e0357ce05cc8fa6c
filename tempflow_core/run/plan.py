"""What a run will cost before it starts: device memory per stage and worker, transformer rows
per iteration, minutes per iteration on one H100 / H200, and the pre-flight check that refuses
a run that does not fit its device.

Rows per iteration are the rollout's and the learner's arithmetic (the counts the rollout/nfe
metrics report). Minutes come from per-row costs measured on one H200 for SD3.5-M at 512 px in
bf16 (results/gpu/smoke/sd35m_mb8.json); another model's rows are scaled by its transformer's
parameters x tokens against SD3.5-M's (an estimate, marked so). The H100 has the H200's dense
bf16 peak: its minutes are the H200's, marked estimated (its lower memory bandwidth makes them
a lower bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tempflow_core.algorithm.iteration import IterationPlan, plan_iteration
from tempflow_core.algorithm.schedule import make_schedule
from tempflow_core.config import ConfigError, load_config
from tempflow_core.memory import GIB, Footprint, ModelFacts, dtype_bytes
from tempflow_core.presets import apply_preset

# One H200, SD3.5-M, 512 px, bf16, 4 prompts x K 6, T 10 (results/gpu/smoke/sd35m_mb8.json and
# sd35m_mb8_checkpointing.json; tests/algorithm/test_memory.py checks these against the records)
H200_S_PER_NFE = 29.69050747899996 / 1116  # rollout seconds per NFE (a CFG pair)
H200_S_PER_UNIT = 3.4735760539999774 / 36  # learner seconds per unit (x with its K children)
H200_S_PER_UNIT_CHECKPOINTED = 4.729 / 36
SD35M_WORK = 2_243_171_520 * 1357  # transformer parameters x tokens (1024 image + 333 text) of the records

# the largest part of a peak -> how to shrink it
LEVERS = {
    "activations": {"rollout": "lower rollout.max_batch", "eval": "lower rollout.max_batch",
                    "learner": "lower train.micro_batch or set train.gradient_checkpointing=true"},
    "decode": "lower rollout.decode_chunk",
    "wavefront": "raise rollout.slices (fewer prompts per rollout call)",
    "latents kept": "set rollout.children_on_host=true",
    "final latents": "raise rollout.slices",
    "text encoders": "set model.offload_text_encoders=true",
    "weights": "set model.dtype=bfloat16 or use a GPU with more memory",
    "lora + grad + AdamW": "lower lora.rank",
    "units": "lower train.micro_batch",
    "lora": "lower lora.rank",
}


def iteration_plans(cfg: Any, iterations: int | None = None) -> list[IterationPlan]:
    """The plans of iterations 0..n-1 (n: the run's train.iterations unless given), on the grid of
    the config's sampling settings (SD3's static shift; a FLUX run's grid differs only in which
    steps a weighted draw favours)."""
    s = cfg.sampling
    schedule = make_schedule(s.num_steps, s.shift, s.noise_level)
    n = cfg.train.iterations if iterations is None else iterations
    fixed = not cfg.branching or not isinstance(cfg.rollout.branch_steps, int)  # every iteration alike
    return [plan_iteration(cfg, schedule, it) for it in range(1 if fixed else n)]


def rows_per_iteration(cfg: Any, iterations: int | None = None) -> tuple[float, float]:
    """Rollout NFEs (a CFG pair counts once) and learner units of one iteration (IterationPlan's
    counts), averaged over the run's iterations (or `iterations` of them) where the branch steps are drawn."""
    plans = iteration_plans(cfg, iterations)
    return float(np.mean([p.rollout_nfe for p in plans])), float(np.mean([p.learner_units for p in plans]))


@dataclass(frozen=True)
class Minutes:
    """Minutes of one iteration's rollout and learner on one GPU of a kind (all workers' work)."""

    gpu: str
    rollout: float
    learner: float
    measured: bool  # False: scaled from SD3.5-M's measured rows, or the H100 from the H200

    @property
    def total(self) -> float:
        return self.rollout + self.learner


def minutes(cfg: Any, facts: ModelFacts, rows_per_it: tuple[float, float] | None = None) -> list[Minutes]:
    """Minutes per iteration on one H200 and one H100 (see the module docstring) of `rows_per_it`
    (rollout NFEs, learner units), the run's own (rows_per_iteration) when not given."""
    nfe, units = rows_per_it or rows_per_iteration(cfg)
    rows = cfg.rows_per_sample()
    work = facts.component_params.get("transformer", 0) * facts.tokens * rows / 2 / SD35M_WORK  # SD3.5-M's rows: 2
    unit_s = H200_S_PER_UNIT_CHECKPOINTED if cfg.train.gradient_checkpointing else H200_S_PER_UNIT
    roll, learn = nfe * H200_S_PER_NFE * work / 60, units * unit_s * work / 60
    measured = abs(work - 1.0) < 1e-6 and cfg.model.dtype == "bfloat16"
    return [Minutes("H200", roll, learn, measured), Minutes("H100", roll, learn, False)]


# Settings that cut a run's transformer rows, as overrides of its config (`tempflow plan --settings`;
# what each was measured to give, and on which world: docs/experiments/cost.md)
COST_SETTINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("rollout.branch_steps=3 (uniform draw)", ("rollout.branch_steps=3", "rollout.branch_draw=uniform")),
    ("rollout.branch_steps=3, branch_draw=weighted", ("rollout.branch_steps=3", "rollout.branch_draw=weighted")),
    ("rollout.branch_steps=3, branch_draw=window", ("rollout.branch_steps=3", "rollout.branch_draw=window")),
    ("rollout.branch_steps=[0,1] (an ODE after two branch points)", ("rollout.branch_steps=[0, 1]",)),
    ("rollout.branch_steps=[0] (an ODE after the noisiest step)", ("rollout.branch_steps=[0]",)),
    ("rollout.completion_stride=2", ("rollout.completion_stride=2",)),
    ("sampling.guidance_scale=1 (no CFG)", ("sampling.guidance_scale=1",)),
    ("algorithm=flow_grpo_fixed (plain SDE trajectories)", ("algorithm=flow_grpo_fixed",)),
)
DRAWS = 2000  # iterations a drawn setting's rows are averaged over


@dataclass(frozen=True)
class SettingCost:
    """One row of `tempflow plan --settings`: a setting applied to the run's config, per iteration
    on one H200 and over the run's iterations (a preset changes their number)."""

    label: str
    nfe: float  # rollout NFEs (a CFG pair once)
    units: float  # learner units
    rows: float  # transformer rows (rollout NFEs and the learner's two forwards per unit, x2 under CFG)
    minutes: Minutes  # one H200, per iteration
    iterations: int


def setting_costs(cfg: Any, facts: ModelFacts) -> list[SettingCost | tuple[str, str]]:
    """The config as given, `--preset fast`, then each of COST_SETTINGS applied to it; a setting
    that does not apply to the config is (label, why)."""
    def cost(label: str, c: Any) -> SettingCost:
        nfe, units = rows_per_iteration(c, DRAWS)
        h200 = minutes(c, facts, (nfe, units))[0]
        return SettingCost(label, nfe, units, (nfe + 2 * units) * c.rows_per_sample(), h200, c.train.iterations)

    out: list[SettingCost | tuple[str, str]] = [cost("this config", cfg)]
    try:
        out.append(cost("`--preset fast` (branch points [0,1,2,3], half the iterations)", apply_preset(cfg, "fast")))
    except ValueError as e:
        out.append(("`--preset fast`", str(e)))
    base = cfg.model_dump(mode="json")
    for label, overrides in COST_SETTINGS:
        if not cfg.branching and "rollout.branch_steps" in overrides[0]:
            out.append((label, f"algorithm {cfg.algorithm!r} does not branch"))
            continue
        try:
            out.append(cost(label, load_config(None, list(overrides), base=base)))
        except ConfigError as e:
            out.append((label, " ".join(str(e).split())))
    return out


def placement_on_gpus(cfg: Any) -> str:
    """The Ray placement a run takes on GPUs (pipeline.placement; 'auto': colocated unless
    rollout.workers asks for rollout actors of their own or the learner is sharded)."""
    p = cfg.pipeline.placement
    if p != "auto":
        return p
    return "colocated" if cfg.rollout.workers in (1, cfg.train.workers) and cfg.train.sharding == "none" \
        else "separate"


@dataclass(frozen=True)
class Placement:
    """Where a run's stages run on GPUs, and what that holds."""

    name: str  # "one GPU" (the local engine), "colocated" or "separate"
    gpus: int  # GPUs held for the whole run
    rollout_workers: int  # workers sampling at once
    learner_workers: int


def placements(cfg: Any, reward_gpus: bool) -> list[Placement]:
    """The run's placement first: one GPU on the local engine; on Ray the configured one and the
    other (colocated: train.workers ranks sample and train; separate: rollout actors, learner ranks
    and, for a reward that runs a model, reward actors each hold a GPU). A sharded learner
    (train.sharding=fsdp) has no colocated alternative."""
    if cfg.pipeline.engine != "ray":
        return [Placement("one GPU", 1, 1, 1)]
    W, S = cfg.train.workers, cfg.rollout.slices
    mine = placement_on_gpus(cfg)
    # the rollout actors: the run's own count; as the alternative to colocated ranks, one actor per rank
    rollout = cfg.rollout.workers if mine == "separate" or cfg.rollout.workers != 1 else W
    reward = cfg.reward.workers if reward_gpus else 0
    both = {"colocated": Placement("colocated", W + reward, min(W, S), W),
            "separate": Placement("separate", rollout + reward + W, min(rollout, S), W)}
    return [both[mine]] + [p for k, p in both.items() if k != mine and cfg.train.sharding == "none"]


def wall_minutes(cfg: Any, m: Minutes, p: Placement) -> float:
    """Minutes of one iteration on `p`'s workers: the busiest rollout worker's prompts (whole slices)
    and the learner's units split over its ranks."""
    B, S = cfg.rollout.prompts_per_iter, cfg.rollout.slices
    calls = -(-S // p.rollout_workers) * -(-B // S)  # prompts the busiest rollout worker samples
    return m.rollout * calls / B + m.learner / p.learner_workers


def refusal(memory: dict[str, Footprint], capacity: float, where: str = "the device") -> str | None:
    """None when every stage fits `capacity` bytes; else one line naming the stage, its estimate,
    the largest part of it and the setting that shrinks that part."""
    for f in memory.values():
        if f.peak > capacity:
            parts = f.phases[f.peak_phase]
            part = max(parts, key=parts.get)
            lever = LEVERS.get(part, "or use a GPU with more memory")
            lever = lever.get(f.stage, "") if isinstance(lever, dict) else lever
            return (f"{f.stage} stage needs ~{size(f.peak)} ({f.peak_phase}: {part} {size(parts[part])}) where {where} "
                    f"has {size(capacity)}; fix: {lever} (tempflow plan shows every part)")
    return None


def size(n: float) -> str:
    """Bytes as GiB (MiB below 1 GiB)."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def table(memory: dict[str, Footprint], workers: dict[str, int]) -> list[str]:
    """Lines: per stage, the peak per worker, the phase it is reached in and its parts."""
    out = []
    for f in memory.values():
        parts = f.phases[f.peak_phase]
        detail = ", ".join(f"{k} {size(v)}" for k, v in parts.items() if v > 0)
        n = workers.get(f.stage, 1)
        out.append(f"  {f.stage:<8} {size(f.peak):>10} per worker ({n} worker{'s' if n > 1 else ''}), "
                   f"peak while {f.peak_phase}: {detail}")
    return out


def device_refusal(cfg: Any) -> str | None:
    """The pre-flight memory check of a run on this machine's GPU (`refusal` against the device's
    memory); on the CPU `host_refusal`; None with pipeline.engine=ray, whose workers' GPUs the
    driver does not see."""
    import torch

    from tempflow_core.memory import plan_memory
    from tempflow_core.policies.models import resolve_device

    if cfg.pipeline.engine != "local":
        return None
    device = resolve_device(cfg.model.device)
    if device.type != "cuda":
        return host_refusal(cfg)
    capacity = torch.cuda.get_device_properties(device).total_memory
    why = refusal(plan_memory(cfg), capacity, f"{torch.cuda.get_device_name(device)} ({device})")
    return f"model.device: {why}" if why else None


def host_memory() -> int:
    """Bytes of memory this process may use: the cgroup's limit when one is set, else the machine's."""
    import os
    from pathlib import Path

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for f in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            raw = f.read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            return min(total, int(raw))
    return total


def host_refusal(cfg: Any, capacity: int | None = None) -> str | None:
    """On the CPU, a stated bound only (activations are not counted): the weights of every
    component of model.path, in model.dtype, fit in this machine's memory. Counted from the
    folder's configs on the meta device, before any weight is allocated. None without a folder
    (the tiny random model)."""
    if not cfg.model.path:
        return None
    from tempflow_core.memory import load_facts

    facts, _ = load_facts(cfg)
    per = {k: n * dtype_bytes(cfg.model.dtype) for k, n in facts.component_params.items()}
    need, have = sum(per.values()), host_memory() if capacity is None else capacity
    if need <= have:
        return None
    big = max(per, key=per.get)
    return (f"model.path: the weights of {cfg.model.path} alone take {size(need)} in {cfg.model.dtype} ({big} "
            f"{size(per[big])}), more than this machine's {size(have)} of memory; fix: check the folder's "
            "config.json files, or run it on a machine with a GPU (tempflow plan estimates one)")


def store_bytes(cfg: Any, facts: ModelFacts) -> tuple[float, float]:
    """(tensors, images): bytes one iteration's rollout shards hold, by the schema's arithmetic
    (tempflow_core/shards/schema.py): the learner's inputs in the dtype the rollout kept them
    (the model's half precision, else float32) and, at most, the raw pixels of every image (PNG
    stores noise-like images raw and deflates real ones)."""
    latent = math.prod(facts.latent) * dtype_bytes(cfg.model.dtype)
    K, T = cfg.rollout.group_size, cfg.sampling.num_steps
    image = facts.pixels ** 2 * 3 * facts.frames  # a clip: its frames' pixels
    if cfg.branching:
        points = float(np.mean([p.samples for p in iteration_plans(cfg)]))  # branch points
        return points * ((1 + K) * latent + K * (4 + 8)), points * K * image
    n = cfg.rollout.prompts_per_iter * K
    return n * ((T + 1) * latent + T * 4), n * image
