"""The session of a run: everything that lives across its iterations, owned by one caller.

A `Session` holds the loaded model with its LoRA (a `FlowPolicy`: SD3 or FLUX), the schedule, the optimizer,
the reward, the prompt stream, the minibatch-shuffle RNG and the EMA of the LoRA. Both
drivers are built from it:

    train.train_in_process     owns one Session for the whole loop (`setup`)
    stages.*_stage             take a `SessionCache` from their caller and restore the
                               state they need from the previous checkpoint (`restore`)

There is no module-level cache: whoever runs stages (a Prefect flow, a worker of a
distributed engine, a notebook) creates a `SessionCache` and passes it in, so the model's
lifetime is the owner's. A cache holds one model at a time: a new config replaces the old one.
"""

from __future__ import annotations


import contextlib
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tempflow_core.algorithm.checkpoint import CheckpointState
from tempflow_core.config import RunConfig
from tempflow_core.algorithm.learner import make_optimizer
from tempflow_core.policies.models import load_model, resolve_device
from tempflow_core.families import make_policy
from tempflow_core.policies.base import FlowPolicy
from tempflow_core.prompts import PromptStream, load_prompts
from tempflow_core.rewards import RewardFn, RewardRegistry
from tempflow_core.algorithm.schedule import Schedule
from tempflow_core.algorithm.sharding import sharded_optimizer_state
from tempflow_core.seeding import derive_seed


@dataclass
class Session:
    """Everything that lives across iterations of one run."""

    cfg: RunConfig
    policy: FlowPolicy  # SD3 or FLUX: the family of the model folder (or of model.tiny.family)
    schedule: Schedule
    optimizer: torch.optim.Optimizer
    reward_fn: RewardFn
    stream: PromptStream
    generator: torch.Generator  # minibatch shuffling
    init_lora: dict[str, torch.Tensor] = field(default_factory=dict)  # the adapter before any update
    ema: dict[str, torch.Tensor] | None = None  # EMA of the LoRA (train.ema_decay > 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup(cfg: RunConfig, workdir: str | Path | None = None, pipe: Any = None, sharded: bool = False) -> Session:
    """Load the model, attach the LoRA, build reward, prompts, schedule and optimizer.

    Args:
        workdir: where a tiny random model writes its tokenizer files (cfg.model.path unset).
        pipe: an already-loaded pipeline (tests reuse one); loaded from cfg.model otherwise.
        sharded: a learner rank of train.sharding=fsdp: the model is loaded on the host and the
            transformer sharded onto the device block by block (FlowPolicy.shard_onto), so a
            transformer larger than one device loads; needs torch.distributed initialised.
    """
    seed_everything(cfg.train.seed)
    pipe = pipe if pipe is not None else load_model(cfg.model, workdir)
    # LoRA init draws from the global RNG: seed it here so that a built and a loaded model
    # start from the same adapter
    torch.manual_seed(derive_seed(cfg.train.seed, "lora-init"))
    policy = make_policy(pipe, cfg.lora, "cpu" if sharded else cfg.model.device, cfg.model.max_sequence_length,
                         cfg.model.resolution, cfg.train.gradient_checkpointing, frames=cfg.model.num_frames)
    if sharded:
        policy.shard_onto(resolve_device(cfg.model.device))
    policy.decode_chunk = cfg.rollout.decode_chunk
    if cfg.model.offload_text_encoders:
        policy.offload_text_encoders()
    # the family's grid: unset shift / noise level take its defaults (SD3 3.0 / 0.7; FLUX
    # resolution-dependent / 0.9)
    schedule = replace(policy.schedule(cfg.sampling.num_steps, cfg.sampling.shift, cfg.sampling.noise_level),
                                   sde_type=cfg.sampling.sde_type)
    reward_fn = RewardRegistry.for_config(cfg.reward).build(cfg.reward.name, cfg.reward.weights, cfg.reward.options)
    stream = PromptStream(load_prompts(cfg.prompts.source), cfg.train.seed)
    gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, "minibatch-shuffle"))
    s = Session(cfg, policy, schedule, make_optimizer(policy, cfg.train), reward_fn, stream, gen,
                policy.lora_state_dict())
    s.ema = initial_ema(s)
    return s


def initial_ema(s: Session) -> dict[str, torch.Tensor] | None:
    """The EMA before any update: the initial adapter in float32 (as Flow-GRPO's starts as a copy
    of the trained weights), so evaluation and export use the EMA from the first iteration;
    None when EMA is off."""
    if s.cfg.train.ema_decay <= 0:
        return None
    return {k: v.float().clone() for k, v in s.init_lora.items()}


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """How many steps the optimizer has taken (AdamW keeps the count per parameter; resumed
    with its state)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def ema_decay_at(n: int, max_decay: float) -> float:
    """The EMA's decay at optimizer step n (1-based), warmed up as Flow-GRPO's:
    min((1 + n) / (10 + n), max_decay)."""
    return min((1 + n) / (10 + n), max_decay)


def update_ema(s: Session, n: int) -> None:
    """After optimizer step n (1-based): ema <- d ema + (1 - d) lora with d = ema_decay_at(n),
    in float32, on the steps where (n + 1) is a multiple of train.ema_update_interval (the
    reference's schedule). The EMA starts from the initial adapter."""
    t = s.cfg.train
    if t.ema_decay <= 0 or (n + 1) % t.ema_update_interval:
        return
    d = ema_decay_at(n, t.ema_decay)
    cur = s.policy.lora_state_dict()
    ema = s.ema if s.ema is not None else initial_ema(s)
    s.ema = {k: d * ema[k] + (1.0 - d) * cur[k].float() for k in cur}


@contextlib.contextmanager
def evaluated_weights(s: Session) -> Iterator[None]:
    """The session's policy holding the weights evaluations and exports use (the EMA when EMA is
    on), its trained LoRA put back after."""
    if s.ema is None:
        yield
        return
    raw = s.policy.lora_state_dict()
    s.policy.load_lora_state_dict(s.ema)
    try:
        yield
    finally:
        s.policy.load_lora_state_dict(raw)


def restore(s: Session, ck: CheckpointState, with_optimizer: bool) -> None:
    """Put the session in the state of checkpoint `ck`: LoRA and EMA; with_optimizer also a
    fresh AdamW loaded with the checkpoint's moments and the shuffling RNG (the learner's state).
    The prompt stream position is the caller's (the rollout stage sets it)."""
    s.policy.load_lora_state_dict(ck.lora)
    s.ema = ck.ema if ck.ema is not None else initial_ema(s)
    if not with_optimizer:
        return
    s.optimizer = make_optimizer(s.policy, s.cfg.train)
    if ck.optimizer is not None:
        s.optimizer.load_state_dict(sharded_optimizer_state(ck.optimizer, s.optimizer))
        # load_state_dict also restores the old hyperparameters; the config decides them
        # (a run branched from another with a new train.lr must train with the new rate)
        t = s.cfg.train
        for group in s.optimizer.param_groups:
            group.update(lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    s.generator.set_state(ck.generator_state)


class SessionCache:
    """Owns at most one Session: the one of the config last asked for.

    A plain object (not a dataclass) so that orchestration layers can pass it to their tasks
    by reference. Not thread-safe: one owner drives its stages one at a time.
    """

    def __init__(self) -> None:
        self._key: tuple[str, bool] | None = None
        self._session: Session | None = None

    def get(self, cfg: RunConfig, sharded: bool = False) -> Session:
        """The session of `cfg`, set up on first use; stages of one run share it. `sharded`: a
        learner rank's session with its transformer sharded (setup)."""
        key = (cfg.digest(), sharded)
        if self._session is None or self._key != key:
            self.clear()  # one model at a time: a new config replaces the old one
            self._session = setup(cfg, sharded=sharded)
            self._key = key
        return self._session

    def clear(self) -> None:
        """Drop the session (and with it the model)."""
        self._session, self._key = None, None
