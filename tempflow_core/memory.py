"""Device memory of a run's stages on one worker, estimated before any weight is allocated.

A stage's peak is the largest sum, over its phases, of what it holds on the device (bytes):

    weights      every component on the device at model.dtype; the text encoders only while
                 prompts are encoded when model.offload_text_encoders is on. Counted from the
                 model folder's configs on the meta device.
    lora         the float32 LoRA (4 B a parameter); the learner adds its gradient and AdamW's two
                 moments (16 B a parameter).
    sharding     with train.sharding=fsdp the learner holds 1/train.workers of the transformer and
                 of the LoRA, gradient and moments, plus two whole blocks (the one computing and
                 the next one gathered ahead). Its model is loaded on the host and the transformer
                 sharded onto the device one block at a time (FlowPolicy.shard_onto), so loading
                 holds less than the update: the other modules, the shards so far and one block.
    latents      a branched rollout keeps x_k and the K children x_next of every branch point
                 (in the model's half precision, else float32; on the host with
                 rollout.children_on_host) and solves a wavefront of live float32 samples (the
                 backbones and every unfinished child): the states, their concatenation, the
                 velocities and the next states, 4 copies. Plain rollouts keep each trajectory's
                 T + 1 states.
    activations  of one transformer call: the rollout's rollout.max_batch samples without grad;
                 the learner's train.micro_batch units with grad, forward and backward (all
                 saved, or with gradient checkpointing). Measured on 1 and 2 samples by `probe`:
                 the model's own transformer class at its real depth, tokens and head size with
                 2 attention heads, through the policy's `velocity` on the CPU in model.dtype,
                 then scaled by width / probed width.
    decode       rollout.decode_chunk images through the VAE decoder, measured on 1 and 2 images
                 of the model's own VAE class at the run's pixels (above 128 px: at 128 px,
                 scaled by the pixel count).

What the probe counts is the bytes of the tensors that ops create and keep alive (`LiveBytes`),
what an allocator holds for them without rounding or fragmentation; a GPU's attention kernels
(flash) keep what the CPU's do, linear in tokens.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PROBE_HEADS = 2  # attention heads of the probed transformer (the real head size and depth)
PROBE_FRAMES = 2  # latent frames of a probed clip; its activations are scaled to the clip's tokens
# A GPU holds more for the same activations than the CPU probe counts (kernel workspaces, the
# caching allocator's rounding): on one H200 the peaks of results/gpu/smoke (SD3.5-M, bf16,
# 512 px) were 1.14-1.32x the probe's activations and decode (learner at micro-batch 2 and 8,
# with and without checkpointing; the decode-bound rollout 1.27x). Activations and decode of a
# GPU estimate are scaled by the largest, so that the estimate errs high
# (tests/algorithm/test_memory.py checks the four records).
GPU_FACTOR = 1.32


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors that ops create while the mode is on: a storage counts once,
    from the op that made it until it is freed. Tensors made before the mode are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak, self._sizes = 0, 0, {}

    def _free(self, ptr: int) -> None:
        self.live -= self._sizes.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                ptr, n = st.data_ptr(), st.nbytes()
                if n and ptr not in self._sizes and ptr not in inputs:  # not a view of (or in place on) an input
                    self._sizes[ptr] = n
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, ptr)
        return out


@dataclass(frozen=True)
class Affine:
    """Bytes of a call on n samples: fixed + n * per_sample."""

    fixed: float
    per_sample: float

    def at(self, n: int) -> float:
        return self.fixed + n * self.per_sample if n > 0 else 0.0


@dataclass(frozen=True)
class SampleBytes:
    """Activation bytes of a transformer call on n samples (a CFG pair each under CFG) at the
    model's full width, tokens and depth, and of decoding n images."""

    no_grad: Affine  # a forward without grad: rollout, reference, evaluation
    grad: Affine  # forward with grad and backward, every activation saved
    checkpointed: Affine  # the same with gradient checkpointing
    decode: Affine  # the VAE decoder on n images at the run's pixels


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs from a model folder (its configs, on the meta device)."""

    component_params: dict[str, int]  # component -> parameters (transformer, text_encoder*, vae)
    lora_params: int
    latent: tuple[int, ...]  # (C, H, W) of one latent at the run's resolution; (C, F', H, W) of a clip's
    pixels: int  # image (frame) side
    tokens: int  # the transformer's sequence: image tokens (2x2 patches of each latent frame) + text tokens
    frames: int = 1  # images a sample decodes to (a clip's frames)
    block_params: int = 0  # the transformer's largest block: what FSDP gathers at once


@dataclass(frozen=True)
class Footprint:
    """One stage on one worker: its phases, each a mapping part -> bytes; the peak is the largest phase."""

    stage: str
    phases: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def peak(self) -> float:
        return max(sum(p.values()) for p in self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: sum(self.phases[k].values()))


def dtype_bytes(dtype: str) -> int:
    return _DTYPE_BYTES[dtype]


def _small_pipeline(meta_pipe: Any, heads: int, dtype: torch.dtype, vae: Any) -> Any:
    """The pipeline class with a transformer of its own class at `heads` attention heads and the
    given VAE, random weights, on the CPU (no text encoders)."""
    config = dict(meta_pipe.transformer.config)
    width = heads * int(config["attention_head_dim"])
    config["num_attention_heads"] = heads
    if "caption_projection_dim" in config:  # SD3: the text stream's width equals the image stream's
        config["caption_projection_dim"] = width
    torch.manual_seed(0)
    transformer = type(meta_pipe.transformer).from_config(config).to(dtype)
    parts = {name: (module if "tokenizer" in name or name == "scheduler" else None)
             for name, module in meta_pipe.components.items()}
    parts["transformer"], parts["vae"] = transformer, vae
    return type(meta_pipe)(**parts)


def _tokens(shape: tuple[int, ...], text: int) -> int:
    """The transformer's sequence for one latent of `shape`: 2x2 patches of every latent frame, and the text."""
    return math.prod(shape[1:-2]) * (shape[-2] // 2) * (shape[-1] // 2) + text


def _width(config: Any, heads: int | None = None) -> int:
    return int(heads or config["num_attention_heads"]) * int(config["attention_head_dim"])


def probe(meta_pipe: Any, lora: Any, dtype: str, resolution: int, max_sequence_length: int | None,
          guidance_scale: float, frames: int | None = None) -> SampleBytes:
    """Activation bytes of n samples, measured on the CPU (see the module docstring); the random
    weights it builds leave the global RNG as it was. `frames`: a clip's (model.num_frames)."""
    with torch.random.fork_rng(devices=[]):
        return _probe(meta_pipe, lora, dtype, resolution, max_sequence_length, guidance_scale, frames)


def _probe(meta_pipe: Any, lora: Any, dtype: str, resolution: int, max_sequence_length: int | None,
           guidance_scale: float, frames: int | None) -> SampleBytes:
    from tempflow_core.families import make_policy

    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    vae = type(meta_pipe.vae).from_config(dict(meta_pipe.vae.config)).to(torch_dtype)  # the model's own VAE class
    small = _small_pipeline(meta_pipe, PROBE_HEADS, torch_dtype, vae)
    policy = make_policy(small, lora, "cpu", max_sequence_length, resolution, frames=frames)
    config = meta_pipe.transformer.config
    scale = _width(config) / _width(config, PROBE_HEADS)
    full = policy.latent_shape()  # (C, H, W), or (C, F', H, W) for a clip
    # a clip is probed at PROBE_FRAMES latent frames and scaled by its tokens, as the activations
    # of a GPU's attention kernels grow (the CPU's quadratic attention at a clip's full length
    # would not fit a host: Wan2.1 at 480 px x 33 frames is 8,612 tokens a row)
    shape = (full[0], *(min(f, PROBE_FRAMES) for f in full[1:-2]), *full[-2:])
    scale *= _tokens(full, policy.text_tokens()) / _tokens(shape, policy.text_tokens())
    emb = policy.blank_conditioning(1)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.5])

    def measured(n: int, grad: bool) -> float:
        xs, ts = x.expand(n, *shape), t.expand(n)
        with torch.set_grad_enabled(grad), LiveBytes() as m:
            v = policy.velocity(xs, ts, emb.select(torch.zeros(n, dtype=torch.long)), guidance_scale)
            if grad:
                v.square().mean().backward()
        policy.transformer.zero_grad(set_to_none=True)
        return m.peak * scale

    def affine(grad: bool) -> Affine:
        one, two = measured(1, grad), measured(2, grad)
        return Affine(max(0.0, 2 * one - two), two - one)

    no_grad, with_grad = affine(False), affine(True)
    policy.transformer.enable_gradient_checkpointing()
    return SampleBytes(no_grad, with_grad, affine(True), _decode(policy, torch_dtype, resolution))


def _decode(policy: Any, dtype: torch.dtype, pixels: int, largest: int = 128) -> Affine:
    """The VAE decoder's peak on n samples (images, or clips of all their frames) of `pixels`,
    through the policy's own decoding: measured at that size up to `largest` pixels, above it at
    `largest` and scaled by the pixel count (the decoder's activations grow with the pixels; its
    attention, at the latent's size, is counted linear as a GPU's is)."""
    px = min(pixels, largest)
    shape = policy.latent_shape(px)
    peaks = []
    for n in (1, 2):
        z = torch.randn(n, *shape, dtype=dtype)
        with torch.no_grad(), LiveBytes() as m:
            policy._vae_decode(z)
        peaks.append(m.peak * (pixels / px) ** 2)
    return Affine(max(0.0, 2 * peaks[0] - peaks[1]), peaks[1] - peaks[0])


def estimate(cfg: Any, facts: ModelFacts, sample: SampleBytes, prompts: int | None = None,
             gpu: bool = True) -> dict[str, Footprint]:
    """Peak device memory of the rollout, learner and evaluation stages of one worker.

    `prompts`: the prompts one rollout worker samples at once (default: one of the rollout.slices
    that rollout.prompts_per_iter is cut into). `gpu`: activations and decode times GPU_FACTOR
    (False: what the CPU holds, as the probe measured it)."""
    if gpu:
        sample = SampleBytes(*(Affine(a.fixed * GPU_FACTOR, a.per_sample * GPU_FACTOR)
                               for a in (sample.no_grad, sample.grad, sample.checkpointed, sample.decode)))
    b = dtype_bytes(cfg.model.dtype)
    params = facts.component_params
    text = sum(v for k, v in params.items() if k.startswith("text_encoder")) * b
    core = (params.get("transformer", 0) + params.get("vae", 0)) * b
    held = {"weights": core, "text encoders": 0.0 if cfg.model.offload_text_encoders else text}
    encode = {"weights": core, "text encoders": text}
    lora4 = 4.0 * facts.lora_params
    elements = math.prod(facts.latent)
    latent = 4.0 * elements  # one float32 latent
    kept_latent = elements * b  # as the rollout keeps it: the model's precision
    B = prompts or -(-cfg.rollout.prompts_per_iter // cfg.rollout.slices)
    K, T = cfg.rollout.group_size, cfg.sampling.num_steps
    if cfg.branching:
        bs = cfg.rollout.branch_steps
        n_b = len(bs) if isinstance(bs, list) else (bs if isinstance(bs, int) else max(1, T - 1))
        kept = B * n_b * (1 + K) * kept_latent  # x_k and x_next of every branch point
        live = B * (1 + K * n_b)  # backbones and unfinished children at the last branch step
        images = B * n_b * K
    else:
        kept = B * K * (T + 1) * kept_latent  # every trajectory's states
        live = images = B * K
    kept_here = 0.0 if cfg.rollout.children_on_host else kept
    decode = sample.decode.at(min(cfg.rollout.decode_chunk, images))
    rollout = Footprint("rollout", {
        "encode prompts": {**encode, "lora": lora4},
        "sample": {**held, "lora": lora4, "latents kept": kept_here, "wavefront": 4 * live * latent,
                   "activations": sample.no_grad.at(min(cfg.rollout.max_batch, live))},
        "decode": {**held, "lora": lora4, "latents kept": kept_here, "final latents": images * latent,
                   "decode": decode},
    })
    units = cfg.train.micro_batch
    per = sample.checkpointed if cfg.train.gradient_checkpointing else sample.grad
    learner_held, adapter = dict(held), 16.0 * facts.lora_params
    if cfg.train.sharding == "fsdp":
        W, transformer = cfg.train.workers, params.get("transformer", 0) * b
        learner_held["weights"] = core - transformer + transformer / W + 2 * facts.block_params * b
        adapter /= W
    learner = Footprint("learner", {
        "update": {**learner_held, "lora + grad + AdamW": adapter,
                   "units": units * (1 + 2 * (K if cfg.branching else 1)) * latent, "activations": per.at(units)},
    })
    n_eval = cfg.rollout.max_batch  # evaluation samples its prompts max_batch at a time
    evaluation = Footprint("eval", {
        "encode prompts": {**encode, "lora": lora4},
        "sample": {**held, "lora": lora4, "wavefront": 4 * n_eval * latent, "activations": sample.no_grad.at(n_eval)},
        "decode": {**held, "lora": lora4, "decode": sample.decode.at(min(cfg.rollout.decode_chunk, n_eval))},
    })
    return {f.stage: f for f in (rollout, learner, evaluation)}


def load_facts(cfg: Any) -> tuple[ModelFacts, Any]:
    """The model's facts and its pipeline with meta weights (a model folder's configs only; the
    tiny random model of model.tiny when model.path is unset). The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return _load_facts(cfg)


def _load_facts(cfg: Any) -> tuple[ModelFacts, Any]:
    from tempflow_core.algorithm.sharding import transformer_blocks
    from tempflow_core.families import family_spec, make_policy
    from tempflow_core.policies.models import load_pipeline_meta

    if cfg.model.path:
        pipe = load_pipeline_meta(cfg.model.path)
    else:
        pipe = family_spec(cfg.model.tiny.family).load("tiny_builder")(cfg.model.tiny, None)
    params = {name: sum(p.numel() for p in module.parameters()) for name, module in pipe.components.items()
              if isinstance(module, torch.nn.Module)}
    policy = make_policy(pipe, cfg.lora, "meta" if cfg.model.path else "cpu", cfg.model.max_sequence_length,
                         cfg.model.resolution, frames=cfg.model.num_frames)
    lora = sum(p.numel() for p in policy.lora_parameters())
    shape = policy.latent_shape()  # (C, H, W), or (C, F', H, W) for a clip
    tokens = _tokens(shape, policy.text_tokens())
    blocks = [sum(p.numel() for p in b.parameters()) for b in transformer_blocks(pipe.transformer)]
    return ModelFacts(params, lora, shape, policy.pixels(), tokens, int(getattr(policy, "frames", 1)),
                      max(blocks, default=0)), pipe


def plan_memory(cfg: Any, prompts: int | None = None, gpu: bool = True) -> dict[str, Footprint]:
    """`estimate` for cfg's model: facts from its configs, per-sample activations probed on the CPU."""
    facts, pipe = load_facts(cfg)
    sample = probe(pipe, cfg.lora, cfg.model.dtype, facts.pixels, cfg.model.max_sequence_length, cfg.guidance_scale(),
                   cfg.model.num_frames)
    return estimate(cfg, facts, sample, prompts, gpu)
