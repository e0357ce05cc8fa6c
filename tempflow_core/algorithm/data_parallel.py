"""Data-parallel learner: one GRPO update split over `world` ranks, equal to the one-rank update.

Rank r reads only the shards r, r+world, ... of the rollout stage (webdataset split by
node) and builds the training units of those samples. Every rank draws the same global
permutation of all units (same seeded generator), so minibatch m is the same set of units
as in one process; each rank runs the units of minibatch m that it holds, with the loss
divided by the global number of terms, and the LoRA gradients are summed over ranks (one
all-reduce per optimizer step) before clipping and the AdamW step. Every rank therefore
takes the same step, holds the same LoRA and optimizer state, and the result equals the
one-rank update up to the float summation order of the all-reduce and of micro-batches
made of other units. Statistics are summed (min / max for the ratio range) over ranks.

Every collective takes tensors on the group's device (`collective_device`): the rank's CUDA
device under NCCL, which takes CUDA tensors only, the CPU under gloo. Each collective checks
it and refuses another device with one line (`CollectiveError`): such a failure is a fault of
the setup, not a lost peer, and is not retried.

Advantages need every reward of a group (and, for flow_grpo, of the batch): each rank
computes them over all keys from the reward scores, which are small.

Shapes: S sample keys (children or trajectories) of the whole stage, N units globally,
n_r units on rank r.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from tempflow_core import failpoints
from tempflow_core.batches import RolloutBatch
from tempflow_core.shards import Manifest, iter_samples, read_embeds


class CollectiveError(RuntimeError):
    """A collective that cannot run for a reason of the setup (a tensor on a device the process
    group has no backend for): not a lost peer, so the stage fails without a retry."""


# What a surviving rank raises when a peer died under a collective: gloo and NCCL errors
# (torch.distributed's DistError family, or their text where a backend raises RuntimeError) and
# Ray's own actor-death errors. Such a failure restarts the group; any other error fails the stage.
PEER_LOST = ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError", "gloo", "NCCL",
             "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout", "Timed out",
             "ActorDiedError", "RayActorError", "ActorUnavailableError")


def peer_lost(exc: BaseException) -> bool:
    """Whether `exc` (or an exception in its chain) is what a rank raises when a peer died
    (never a CollectiveError: a fault of the setup, whatever backend its text names)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, CollectiveError):
            return False
        text = f"{type(e).__name__}: {e}"
        if any(p in text for p in PEER_LOST):
            return True
        e = e.__cause__ or e.__context__
    return False


def collective_device(backend_config: str, param_device: torch.device) -> torch.device:
    """The device the learner's collectives use: the device of its LoRA parameters when the
    process group has a backend for that device type (NCCL: cuda; gloo: cpu, and cuda too),
    else the CPU where the group has a CPU backend.

    `backend_config` is torch.distributed.get_backend_config(): 'nccl', 'gloo', 'cuda:nccl',
    'cpu:gloo,cuda:nccl', ... (a bare backend name: NCCL serves cuda, gloo cpu and cuda)."""
    param_device = torch.device(param_device)
    types: set[str] = set()
    for part in backend_config.replace(" ", "").split(","):
        if ":" in part:
            types.add(part.split(":", 1)[0])
        else:
            types.update({"nccl": ["cuda"], "gloo": ["cpu", "cuda"], "mpi": ["cpu", "cuda"]}.get(part.lower(), []))
    if param_device.type in types:
        return param_device
    if "cpu" in types:
        return torch.device("cpu")
    raise CollectiveError(
        f"the learner's process group ({backend_config}) takes {' / '.join(sorted(types)) or 'no'} tensors and this "
        f"rank's LoRA is on {param_device}; fix: set model.device to the group's device (cuda for a GPU group) or "
        "run the learner group with a CPU backend")


@dataclass(frozen=True)
class DataParallel:
    """This rank's place in a data-parallel update."""

    rank: int
    world: int
    total: int  # N: units of the whole stage
    owned: torch.Tensor  # [n_r] long: global index of each of this rank's units, in local order
    device: torch.device = torch.device("cpu")  # where every collective's tensors live (collective_device)
    sharded: bool = False  # the transformer is FSDP-sharded (sharding.py): FSDP reduces the gradients

    @functools.cached_property
    def _position(self) -> torch.Tensor:
        """[N] long: each global unit's position among this rank's units, -1 where another rank holds it."""
        where = torch.full((self.total,), -1, dtype=torch.long)
        where[self.owned] = torch.arange(self.owned.numel())
        return where

    def local(self, global_index: torch.Tensor) -> torch.Tensor:
        """Positions in this rank's units of those of `global_index` (a minibatch) it holds, in that order."""
        failpoints.hit(f"learner.minibatch/rank{self.rank}")
        pos = self._position[global_index]
        return pos[pos >= 0]

    def pads(self, calls: int) -> int:
        """How many pad calls this rank adds to its `calls` micro-batches so that every rank makes
        as many transformer calls (a sharded transformer's forward is a collective); 0 unsharded."""
        if not self.sharded:
            return 0
        return int(self.reduce([float(calls)], "max")[0]) - calls

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over ranks (a rank without units adds zeros). A parameter
        no rank has a gradient for (an adapter on an output the model never uses: the last
        Qwen-Image block's text stream) keeps `grad = None`, as in one process, so that AdamW
        leaves it alone (no state, no weight decay) on every world size."""
        import torch.distributed as dist

        failpoints.hit(f"learner.allreduce/rank{self.rank}")
        has = [p.grad is not None for p in params]
        grads = torch.cat([(p.grad if g else torch.zeros_like(p)).reshape(-1) for p, g in zip(params, has)])
        flat = torch.cat([grads, torch.tensor(has, dtype=grads.dtype, device=grads.device)])
        self._all_reduce(flat, dist.ReduceOp.SUM, "the LoRA gradients")  # the flags ride in the same call
        flags = flat[-len(params):]
        o = 0
        for i, p in enumerate(params):
            n = p.numel()
            p.grad = flat[o:o + n].view_as(p).clone() if flags[i] > 0 else None
            o += n

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """`values` summed (or min / max) over ranks, in float64."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._all_reduce(t, {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op],
                         "the update's statistics")
        return t.cpu().tolist()

    def _all_reduce(self, t: torch.Tensor, op: Any, what: str) -> None:
        """All-reduce `t` in place, after checking that it is on the group's device."""
        import torch.distributed as dist

        if t.device != self.device:
            raise CollectiveError(f"learner rank {self.rank}: {what} are on {t.device} where the process group's "
                                  f"collectives take {self.device} tensors; fix: keep the LoRA on the rank's device")
        dist.all_reduce(t, op=op)


def sample_keys_of(m: Manifest, group_size: int) -> list[str]:
    """[S] the stage's sample keys in `RolloutBatch.sample_keys()` order, from its manifest:
    a branch point's K child keys, or one key per trajectory."""
    keys = [k for shard in m.shards for k in shard.keys]
    if m.rollout_kind == "branch":
        return [f"{k}_c{j:02d}" for k in keys for j in range(group_size)]
    return keys


def _every(rank: int, world: int):
    def split(src: Iterable[Any]) -> Iterable[Any]:
        return itertools.islice(src, rank, None, world)
    return split


def read_share(store: Any, prefix: str, m: Manifest, rank: int, world: int,
               images: bool = False) -> tuple[RolloutBatch, list[int]]:
    """Rank r's share of a rollout stage: the samples of shards r, r+world, ... (images only
    when asked) with the stage's embeddings, and the global position of each of those samples."""
    offsets = list(itertools.accumulate([s.samples for s in m.shards], initial=0))
    positions = [p for j in range(rank, len(m.shards), world) for p in range(offsets[j], offsets[j + 1])]
    items = list(iter_samples(store, prefix, manifest=m, nodesplitter=_every(rank, world), workersplitter=None,
                              images=images, as_dataclass=True))
    expected = [k for j in range(rank, len(m.shards), world) for k in m.shards[j].keys]
    got = [it.group_id if m.rollout_kind == "branch" else it.key for it in items]
    if got != expected:
        raise ValueError(f"rank {rank}: read samples {got[:3]}... where the manifest lists {expected[:3]}...")
    emb, sigmas = read_embeds(store, prefix, m)
    kind = m.rollout_kind or "branch"
    batch = RolloutBatch(kind, [], [], emb, sigmas, branch_points=items if kind == "branch" else [],
                         trajectories=items if kind == "plain" else [])
    return batch, positions
