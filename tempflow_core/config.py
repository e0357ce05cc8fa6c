"""Typed, validated configuration of a TempFlow-GRPO run.

Every field carries its unit and scope in its description; the Prefect UI renders these
models as the run form, and `section.field=value` overrides (`apply_overrides`) write into them. Sizes are
global per iteration, never per device: the engine cuts work into micro-batches itself, so
group size, prompts per iteration and what fits in memory are independent settings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tempflow_core.families import ModelFamily, detect_family, family_defaults, family_spec

Algorithm = Literal["flow_grpo", "flow_grpo_fixed", "reweight", "branch", "tempflow"]

DEFAULT_LORA_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelConfig(_Section):
    """Sizes of the tiny pipeline (of model.tiny.family's pipeline class) built when no model path is given."""

    family: str = Field("sd3", description="Which tiny pipeline (a registered family, a plugin's too): 'sd3' (SD3 transformer, two CLIP encoders), 'flux' (FLUX transformer with guidance embedding, CLIP + T5), 'qwen-image' (Qwen-Image transformer, Qwen2.5-VL encoder, true CFG) or 'wan' (Wan2.1 text-to-video transformer, UMT5, clips of 5 frames); a model.path folder names its own family in model_index.json.")
    resolution: int = Field(32, ge=16, le=512, description="Image side in pixels.")
    vae_channels: list[int] = Field([8, 16, 16], min_length=1, description="AutoencoderKL block widths; the latent is resolution / 2**(len-1) pixels wide.")
    latent_channels: int = Field(4, ge=1)
    layers: int = Field(2, ge=1, description="Transformer blocks (FLUX: this many double-stream and this many single-stream blocks).")
    heads: int = Field(2, ge=1)
    head_dim: int = Field(16, ge=4)
    patch_size: int = Field(2, ge=1)
    text_width: int = Field(32, ge=8, description="Hidden width of each tiny text encoder (CLIP, and FLUX's T5).")
    text_layers: int = Field(1, ge=1)
    max_tokens: int = Field(16, ge=4, description="Tokenizer max length (CLIP position embeddings; FLUX: also the T5 tokens).")
    seed: int = Field(0, description="Seed of the random initialisation.")

    @field_validator("family")
    @classmethod
    def _registered(cls, v: str) -> str:
        family_spec(v)  # ValueError naming the registered families
        return v


class ModelConfig(_Section):
    path: str | None = Field(None, description="Local folder of a StableDiffusion3Pipeline (e.g. SD3.5-M or the shipped tiny base), a FluxPipeline (FLUX.1-dev), a QwenImagePipeline (Qwen-Image) or a WanPipeline (Wan2.1 text-to-video); model_index.json names the family. None builds a random tiny model of model.tiny.family.")
    tiny: TinyModelConfig = TinyModelConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype of the frozen weights; LoRA and the sampler math stay float32.")
    num_frames: int | None = Field(None, ge=1, le=257, description="Frames of a clip, for a video family (Wan2.1: 1 + 4k); unset: the model folder's own (the tiny Wan model: 5) or 33, Flow-GRPO's Wan2.1 clips. An image family refuses it.")
    max_sequence_length: int | None = Field(None, ge=0, le=512, description="T5 tokens; unset: 256 when an SD3 model has T5 (SD3.5), 0 without (no zero padding tokens are spent); FLUX: 512 (FLUX.1-dev), capped by the T5 tokenizer's model_max_length; Wan: UMT5's, 512. Qwen-Image: the Qwen2.5-VL tokens every prompt is padded to (masked) after the template, 256 unset; a longer prompt is refused.")
    resolution: int | None = Field(None, ge=16, description="Image side in pixels for rollouts and evaluation (512 as in the paper for SD3.5-M); unset: the model's native size.")
    device: str = Field("auto", description="'auto' (cuda when present, else cpu), 'cpu' or 'cuda[:i]'.")
    offload_text_encoders: bool = Field(False, description="Keep the text encoders on the host and move them to the device only while prompts are encoded (once per rollout and evaluation): SD3.5-M's three encoders are ~11 GiB in bf16. Changes memory, not what a run computes.")


class LoraSettings(_Section):
    rank: int = Field(32, ge=1, description="LoRA rank r.")
    alpha: float = Field(64.0, gt=0, description="LoRA alpha (scale alpha / r).")
    init: Literal["gaussian", "default"] = Field("gaussian", description="peft init_lora_weights: 'gaussian' (A normal, B zero) or 'default' (A Kaiming, B zero); both start equal to the base model.")
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), min_length=1)


class SamplingConfig(_Section):
    num_steps: int = Field(10, ge=1, le=1000, description="Denoising steps T of rollouts.")
    guidance_scale: float | None = Field(None, ge=1.0, description="SD3: CFG scale (1 = no CFG). FLUX: the guidance value fed to the guidance-distilled transformer; no CFG pair, one call per step. Qwen-Image: true CFG (the negative prompt ' ', the combination rescaled to the conditional's norm). Wan: CFG as two calls. Unset: the family's (SD3 4.5, as in the paper; FLUX 3.5, FLUX.1-dev's; Qwen-Image 4.0, its model card's; Wan 4.5, Flow-GRPO's Wan2.1 recipe).")
    shift: float | None = Field(None, gt=0, description="Flow shift of the timestep grid; unset: the family's (SD3 and Wan: 3.0; FLUX: resolution-dependent, diffusers' calculate_shift over the scheduler config's base/max shift and the image's token count). Set on FLUX: a fixed shift exp(mu) on FLUX's grid.")
    noise_level: float | None = Field(None, gt=0, description="a in s_t = a sqrt(t/(1-t)); unset: the family's (0.7 for SD3, as for SD3.5-M in the paper; 0.9 for FLUX; 0.7 for Qwen-Image and Wan, Flow-GRPO's default).")
    eval_num_steps: int = Field(20, ge=1, description="ODE steps for evaluation images.")
    sde_type: Literal["flow_grpo", "cps"] = Field("flow_grpo", description="The stochastic step rollouts take and the learner scores: 'flow_grpo' (the SDE of paper eq. 5, std s_t sqrt(dt)) or 'cps' (coefficients-preserving sampling: from the predicted data and noise with fresh noise of std t_next sin(a pi/2), as Flow-GRPO's sde_type='cps'; log-probs are the exact Gaussian's, noise-aware weights follow its std).")


class RolloutConfig(_Section):
    prompts_per_iter: int = Field(4, ge=1, description="Prompts per iteration (global).")
    group_size: int = Field(6, ge=2, description="K children per branch point (branching) or G trajectories per prompt (plain).")
    branch_steps: Literal["all"] | list[int] | int = Field("all", description="Branch points: 'all' = steps 0..T-2 (the last, nearly noise-free step is left out, as in the reference code), a fixed list of step indices (may name T-1), or an int m: m of 0..T-2 drawn per iteration.")
    branch_draw: Literal["uniform", "weighted", "window"] = Field("uniform", description="How branch_steps: m draws its m steps each iteration: 'uniform' (m distinct, equally likely), 'weighted' (m draws with replacement, probability proportional to the step's noise s_k sqrt(dt_k), importance-corrected so the expected loss is that of all steps), 'window' (m consecutive steps sliding one step per iteration, as MixGRPO's SDE window). Needs branch_steps to be a count.")
    completion_stride: int = Field(1, ge=1, description="Coarse completion of children: after its SDE step a child finishes with ODE steps over every s-th node of the rollout grid (always ending at t = 0). 1 = every node (paper). Fewer child rows; the log-probs and the learner are unchanged, only the children's rewards come from a coarser solve.")
    max_batch: int = Field(64, ge=1, description="Max samples per transformer forward (CFG doubles it internally).")
    decode_chunk: int = Field(64, ge=1, description="Images per VAE decode call (rollout and evaluation): the decoder's activations grow with it (~0.3 GiB an image at 512 px in bf16). Like max_batch it is part of the config's digest: a GPU's kernels may round another batch shape differently.")
    children_on_host: bool = Field(False, description="Keep each branch point's state and children (x_k, x_next) in host memory once spawned, not on the device: at the paper's batch (48 prompts x 9 branch points x K 24) ~2.6 GiB of float32 latents at 512 px. Changes memory, not what a run computes.")
    slices: int = Field(1, ge=1, description="Contiguous slices the iteration's prompts are cut into, each sampled as one batch and written as its own shards. The unit of work of rollout workers: with slices fixed, rollouts are the same whatever the worker count. 1: one batch.")
    workers: int = Field(1, ge=1, description="pipeline.engine=ray: rollout actors, each sampling whole slices (at most rollout.slices are busy). Does not change what a run computes.")

    @field_validator("branch_steps")
    @classmethod
    def _check_branch_steps(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("branch_steps list must not be empty")
            if any(k < 0 for k in v) or len(set(v)) != len(v):
                raise ValueError("branch_steps must be distinct, non-negative step indices")
        elif isinstance(v, int) and v < 1:
            raise ValueError("branch_steps as a count must be >= 1")
        return v


class LossConfig(_Section):
    clip_range: float = Field(1e-4, gt=0, description="PPO clip epsilon on the per-step likelihood ratio (Flow-GRPO uses 1e-4).")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantages are clipped to [-max, max].")
    beta: float = Field(0.004, ge=0, description="KL weight (paper: 0.004 GenEval, 0.001 PickScore).")
    kl_form: Literal["exact", "flow_grpo"] = Field("exact", description="KL to the reference per step: 'exact' is the Gaussian transitions' KL, |mean gap|^2 / (2 s_t^2 |dt|) (paper eq. 6); 'flow_grpo' divides by 2 s_t^2 as Flow-GRPO's code does (the exact KL times |dt|: weaker at the same beta).")
    weight_norm: Literal["mean1", "constant"] = Field("mean1", description="Noise-aware weight normalisation: mean 1 over the configured trainable steps (paper), or constant * s_k sqrt(dt_k) (authors' code).")
    weight_constant: float = Field(2.25, gt=0, description="Multiplier for weight_norm='constant'.")


class TrainConfig(_Section):
    iterations: int = Field(3, ge=1, description="RL iterations (rollout -> reward -> update).")
    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-4, ge=0)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, gt=0, description="Max global grad norm.")
    inner_epochs: int = Field(1, ge=1, description="Passes over one iteration's rollouts.")
    minibatches: int = Field(1, ge=1, description="Optimizer steps per inner epoch: units are split into this many minibatches.")
    micro_batch: int = Field(16, ge=1, description="Training units per forward/backward (gradient accumulation fills the minibatch). What fits in memory.")
    train_steps: Literal["all"] | list[int] = Field("all", description="Plain rollouts: which denoising steps are trained; 'all' = 0..T-2 (as Flow-GRPO's int(0.99 T)), a list may name T-1.")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the LoRA weights (0: off), as Flow-GRPO's: its decay warms up as min((1+n)/(10+n), ema_decay) at optimizer step n; evaluation and export use the EMA when on.")
    ema_update_interval: int = Field(8, ge=1, description="The EMA takes the weights every this many optimizer steps (Flow-GRPO: 8).")
    recompute_old_log_probs: bool = Field(False, description="Recompute the old log-probs with the learner's own micro-batches at the unchanged weights before the update, instead of reading the rollout's: the first minibatch's ratio is then exactly 1 even when the rollout ran other batch shapes or kernels (bf16). One extra forward per unit. Every run logs the first minibatch's ratio range (train/ratio_first_min, _max).")
    gradient_checkpointing: bool = Field(False, description="Recompute transformer activations in backward: less memory (SD3.5-M on one GPU), more compute.")
    seed: int = Field(0, description="Seed of prompts, noise and shuffling.")
    workers: int = Field(1, ge=1, description="pipeline.engine=ray: data-parallel learner ranks (Ray Train, gloo on CPU, NCCL on GPU); the global batch, minibatches and update do not depend on it (up to the all-reduce's float summation order).")
    sharding: Literal["none", "fsdp"] = Field("none", description="pipeline.engine=ray with train.workers >= 2: 'fsdp' shards the transformer (frozen weights, LoRA, AdamW moments) over the learner ranks with FSDP2, each rank holding 1/train.workers of it through the update, for a learner whose update does not fit one GPU (each rank still loads the whole model before sharding it); the update is the data-parallel one (up to float summation order). Takes the separate placement (sampling workers hold a whole model). 'none': every rank holds the whole model.")


class RewardConfig(_Section):
    name: str = Field("brightness", description="Reward name in the registry, or 'weighted' with `weights`.")
    weights: dict[str, float] = Field(default_factory=dict, description="For 'weighted': reward name -> weight.")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Per-reward keyword options, e.g. {'clipscore': {'model': '/path'}}.")
    plugins: list[str] = Field(default_factory=list, description="Modules that add rewards, each defining REWARDS = {name: factory} (a module of yours on the Python path); their names join the built-in ones.")
    workers: int = Field(1, ge=1, description="pipeline.engine=ray: reward actors, each loading the reward once and scoring whole shards. Does not change what a run computes.")
    stream: bool = Field(False, description="Score each rollout slice as soon as it is written, while the next slices are sampled, so an iteration waits for the last slice's reward only (needs rollout.slices >= 2). The scores and the update are the same as without; pays off when the reward is slow and runs elsewhere (a reward server, a GPU reward model, reward actors).")


class PromptsConfig(_Section):
    source: str = Field("builtin:colors", description="'builtin:<name>', a .txt file (one prompt a line) or a .jsonl file with a 'prompt' field.")
    test_source: str | None = Field(None, description="Held-out prompts for evaluation.")


class EvalConfig(_Section):
    every: int = Field(0, ge=0, description="Evaluate every N iterations (0: only after the last one).")
    prompts: str | None = Field(None, description="Held-out prompt source (default: prompts.test_source, else prompts.source).")
    max_prompts: int = Field(0, ge=0, description="Use at most this many eval prompts (0: all).")
    images_per_prompt: int = Field(1, ge=1, description="ODE samples per eval prompt (different seeds).")
    images_per_category: int = Field(0, ge=0, description="At least this many images per category (GenEval tag): a category of n prompts gets ceil(N / n) seeds per prompt (0: images_per_prompt for every prompt).")
    extra_reward: str | None = Field(None, description="A reward the learner is NOT trained on, scored at evaluation to spot reward hacking.")
    seed: int = Field(1234, description="Seed of the evaluation noise (fixed across iterations and runs).")
    guidance_scale: float | None = Field(None, ge=1.0, description="Guidance of the evaluation images; unset: the run's (sampling.guidance_scale). Lets a run trained without CFG (sampling.guidance_scale=1) be scored as it will be sampled, with CFG.")


class GuardConfig(_Section):
    max_bad_iterations: int = Field(3, ge=1, description="Stop the run when rewards are degenerate for more than this many consecutive iterations.")
    zero_spread_fraction: float = Field(1.0, gt=0, le=1, description="An iteration is degenerate when at least this share of groups has zero reward spread, or all rewards are 0.")


class PipelineConfig(_Section):
    """Where a run's results go and how it is run; none of it changes what a run computes
    (RunConfig.digest leaves the section out).

    The core reads `store`, `s3_endpoint_url` and `samples_per_shard`. The other fields are
    settings of the orchestration layer (flows/, tasks/: tracking and scheduling): they live
    here so that one config file and one run form hold a whole run, and the core passes them
    through without interpreting them.
    """

    # read by the core (stages, layout)
    store: str = Field(".tempflow/store", description="Object store for stage outputs: a local folder, file:///abs/path or s3://bucket/prefix (credentials from the boto3 chain, never from here).")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, ...); AWS_ENDPOINT_URL_S3 works too.")
    shared_store: bool = Field(False, description="The store root may hold things that are not tempflow runs (a folder or bucket prefix shared with other data); off: such a root is refused before a run writes, so a mistyped store never gets runs written among other files.")
    samples_per_shard: int = Field(32, ge=1, description="Rollout samples (branch points or trajectories) per webdataset shard.")
    engine: Literal["local", "ray"] = Field("local", description="Where stage work runs: 'local' (this process) or 'ray' (rollout and reward actors, a Ray Train learner; RAY_ADDRESS when set, else a local Ray started and stopped by the run). Stage outputs, URIs and resume are the same on both.")
    placement: Literal["auto", "colocated", "separate"] = Field("auto", description="pipeline.engine=ray: which workers hold the model. 'colocated': the train.workers learner ranks also sample the rollouts, write the initial adapter and evaluate, one copy of the model each (rollout.workers is not used; rewards that need no GPU take none; the run's own process builds no model); 'separate': rollout actors, reward actors and learner ranks each hold a GPU and a model (for large clusters); 'auto': colocated when the workers use GPUs and rollout.workers is 1 or train.workers, separate otherwise. Does not change what a run computes.")
    ray_gpus: float | None = Field(None, ge=0, description="pipeline.engine=ray: GPUs each model worker asks Ray for; unset: 1 when model.device is cuda (or auto on a machine with CUDA), else 0. Set it where Ray's GPUs are not the driver's (a head without GPUs), or to test placements on CPUs whose Ray pretends to have GPUs.")
    # read by the orchestration only (flows/, tasks/); opaque to the core
    mlflow_uri: str | None = Field(None, description="Orchestration: tracking server URI the flows log to (default: MLFLOW_TRACKING_URI, else sqlite in the run folder).")
    experiment: str = Field("tempflow", description="Orchestration: experiment name runs are tracked under.")
    registered_model: str = Field("tempflow-lora", description="Orchestration: registered model name for LoRA checkpoints.")
    grid_every: int = Field(1, ge=0, description="Orchestration: log per-group image grids every N iterations (0: never).")
    gpu_limit: str | None = Field(None, description="Orchestration: name of a concurrency limit the flows hold around rollout, learner and eval (e.g. 'tempflow-gpu'); None: no limit.")


class RunConfig(_Section):
    """A whole run. Sections group settings by the stage that reads them."""

    algorithm: Algorithm = Field("tempflow", description="flow_grpo (global std), flow_grpo_fixed (group std), reweight (plain rollouts + noise-aware weights), branch (branching only), tempflow (branching + noise-aware weights).")
    model: ModelConfig = ModelConfig()
    lora: LoraSettings = LoraSettings()
    sampling: SamplingConfig = SamplingConfig()
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    reward: RewardConfig = RewardConfig()
    prompts: PromptsConfig = PromptsConfig()
    eval: EvalConfig = EvalConfig()
    guard: GuardConfig = GuardConfig()
    pipeline: PipelineConfig = PipelineConfig()
    output_dir: str = Field("runs", description="Local folder for in-process runs.")

    @model_validator(mode="after")
    def _check_cross_fields(self) -> "RunConfig":
        T = self.sampling.num_steps
        if isinstance(self.rollout.branch_steps, list) and max(self.rollout.branch_steps) >= T:
            raise ValueError(f"rollout.branch_steps {self.rollout.branch_steps} must be < sampling.num_steps ({T})")
        if isinstance(self.rollout.branch_steps, int) and not isinstance(self.rollout.branch_steps, bool) \
                and self.rollout.branch_steps > T - 1:
            raise ValueError(f"rollout.branch_steps ({self.rollout.branch_steps}) cannot exceed the {T - 1} trainable "
                             f"steps 0..T-2 of sampling.num_steps ({T})")
        for name, spec in (("rollout.branch_steps", self.rollout.branch_steps), ("train.train_steps", self.train.train_steps)):
            if spec == "all" or (isinstance(spec, int) and not isinstance(spec, bool)):
                if T < 2:
                    raise ValueError(f"{name}={spec!r} trains steps 0..T-2, none at sampling.num_steps=1: "
                                     f"use sampling.num_steps >= 2 or an explicit list such as [0]")
        if self.rollout.slices > self.rollout.prompts_per_iter:
            raise ValueError(f"rollout.slices ({self.rollout.slices}) exceeds rollout.prompts_per_iter "
                             f"({self.rollout.prompts_per_iter}): a slice needs at least one prompt")
        if self.pipeline.engine == "ray" and self.pipeline.placement == "colocated" and self.rollout.workers not in (
                1, self.train.workers):
            raise ValueError(f"rollout.workers ({self.rollout.workers}) with pipeline.placement=colocated: the "
                             f"train.workers ({self.train.workers}) learner ranks sample the rollouts; set rollout.workers "
                             "to train.workers (or leave it unset), or pipeline.placement=separate for rollout actors")
        if self.train.sharding == "fsdp" and (self.pipeline.engine != "ray" or self.train.workers < 2):
            raise ValueError(f"train.sharding=fsdp shards the transformer over the learner's ranks, and this run has one "
                             f"(pipeline.engine={self.pipeline.engine}, train.workers={self.train.workers}): set "
                             "pipeline.engine=ray and train.workers to 2 or more, or train.sharding=none")
        if self.train.sharding == "fsdp" and self.pipeline.placement == "colocated":
            raise ValueError("train.sharding=fsdp with pipeline.placement=colocated: a colocated rank samples alone "
                             "with a whole model; set pipeline.placement=separate (or auto)")
        if self.pipeline.engine == "ray" and self.pipeline.placement != "colocated" and \
                self.rollout.workers > self.rollout.slices:
            raise ValueError(f"rollout.workers ({self.rollout.workers}) exceeds rollout.slices ({self.rollout.slices}): "
                             f"a worker samples whole slices, so set rollout.slices to a multiple of rollout.workers")
        if self.rollout.branch_draw != "uniform" and not (isinstance(self.rollout.branch_steps, int)
                                                          and not isinstance(self.rollout.branch_steps, bool)):
            raise ValueError(f"rollout.branch_draw={self.rollout.branch_draw!r} draws m steps per iteration, and "
                             f"rollout.branch_steps is {self.rollout.branch_steps!r}: set branch_steps to a count m")
        if self.reward.stream and self.rollout.slices < 2:
            raise ValueError(f"reward.stream scores each rollout slice while the next is sampled, and rollout.slices is "
                             f"{self.rollout.slices}: set rollout.slices to 2 or more, or turn reward.stream off")
        if self.sampling.sde_type == "cps":
            for name, spec in (("rollout.branch_steps", self.rollout.branch_steps), ("train.train_steps", self.train.train_steps)):
                if isinstance(spec, list) and T - 1 in spec:
                    raise ValueError(f"{name} {spec} names the last step {T - 1}, and sampling.sde_type=cps has no "
                                     f"noise there (its std is t_next sin(a pi/2) = 0 at t = 0): leave step {T - 1} out")
        if self.rollout.completion_stride > 1 and not self.branching:
            raise ValueError(f"rollout.completion_stride ({self.rollout.completion_stride}) finishes branched children, "
                             f"and algorithm {self.algorithm!r} does not branch: use 1, or algorithm tempflow or branch")
        if isinstance(self.train.train_steps, list) and (not self.train.train_steps or max(self.train.train_steps) >= T):
            raise ValueError(f"train.train_steps {self.train.train_steps} must be non-empty indices < sampling.num_steps ({T})")
        return self

    # Derived settings of the paper's ablation variants (one field selects them).
    @property
    def branching(self) -> bool:
        return self.algorithm in ("branch", "tempflow")

    @property
    def std_mode(self) -> Literal["group", "global"]:
        return "global" if self.algorithm == "flow_grpo" else "group"

    @property
    def noise_aware(self) -> bool:
        return self.algorithm in ("reweight", "tempflow")

    def family(self) -> ModelFamily:
        """The model family: model.tiny.family without a path, else the folder's model_index.json.

        Raises:
            FileNotFoundError, ValueError: the folder has no model_index.json, or an unsupported pipeline.
        """
        return detect_family(self.model.path) if self.model.path else self.model.tiny.family

    def guidance_scale(self) -> float:
        """sampling.guidance_scale, or the family's default when unset (SD3: CFG 4.5; FLUX: 3.5)."""
        if self.sampling.guidance_scale is not None:
            return self.sampling.guidance_scale
        return family_defaults(self.family()).guidance_scale

    def eval_guidance_scale(self) -> float:
        """eval.guidance_scale, or the run's guidance when unset."""
        return self.guidance_scale() if self.eval.guidance_scale is None else self.eval.guidance_scale

    def rows_per_sample(self) -> int:
        """Transformer rows one sample-step costs: 2 under SD3's classifier-free guidance (the
        conditional and unconditional rows of a CFG pair), 1 without it (guidance 1, or FLUX,
        whose guidance is an input)."""
        try:
            family = self.family()
        except (OSError, ValueError):
            family = "sd3"
        return family_spec(family).rows_per_sample(self.guidance_scale())

    def canonical_dump(self) -> dict[str, Any]:
        """The JSON dump with family defaults made explicit: an unset sampling.guidance_scale /
        shift / noise_level reads as the family's default number (FLUX's resolution-dependent
        shift stays null), and model.tiny.family is left out while it is 'sd3'. So an unset and
        an explicit default are one config, and dumps from before model families compare equal to
        today's (digests, branch plans). A model folder that cannot be read counts as SD3, the
        only family before FLUX."""
        data = self.model_dump(mode="json")
        try:
            family = self.family()
        except (OSError, ValueError):
            family = "sd3"
        defaults, sampling = family_defaults(family), data["sampling"]
        if sampling["guidance_scale"] is None:
            sampling["guidance_scale"] = defaults.guidance_scale
        if sampling["noise_level"] is None:
            sampling["noise_level"] = defaults.noise_level
        if sampling["shift"] is None and defaults.shift is not None:
            sampling["shift"] = defaults.shift
        if data["model"]["tiny"]["family"] == "sd3":
            del data["model"]["tiny"]["family"]
        if data["model"]["num_frames"] is None:  # images: the configs from before video families
            del data["model"]["num_frames"]
        for section in ("rollout", "reward", "train"):  # where work runs, not what it computes
            data[section].pop("workers")
        data["train"].pop("sharding")
        for section, key in (("model", "offload_text_encoders"), ("rollout", "children_on_host")):
            data[section].pop(key)  # where tensors live, not what is computed
        if data["rollout"]["decode_chunk"] == 64:  # the chunk every config had before the option
            del data["rollout"]["decode_chunk"]
        data["reward"].pop("stream")  # when scoring runs, not what it computes
        if data["rollout"]["slices"] == 1:  # one batch: the configs from before slices
            del data["rollout"]["slices"]
        if not data["reward"]["plugins"]:  # the built-in rewards: the configs from before plugins
            del data["reward"]["plugins"]
        if data["eval"]["guidance_scale"] is None:  # the run's guidance: the configs from before the option
            del data["eval"]["guidance_scale"]
        if data["sampling"]["sde_type"] == "flow_grpo":  # the step every config had before the option
            del data["sampling"]["sde_type"]
        if data["rollout"]["branch_draw"] == "uniform":  # the draw every config had before the option
            del data["rollout"]["branch_draw"]
        if data["rollout"]["completion_stride"] == 1:  # full completion: the configs from before the option
            del data["rollout"]["completion_stride"]
        if data["loss"]["kl_form"] == "exact":  # the KL every config had before the option
            del data["loss"]["kl_form"]
        if not data["train"]["recompute_old_log_probs"]:  # the rollout's log-probs: the configs from before the option
            del data["train"]["recompute_old_log_probs"]
        if data["train"]["ema_decay"] == 0:  # no EMA: its interval computes nothing
            del data["train"]["ema_update_interval"]
        return data

    def digest(self) -> str:
        """sha256 of what the run computes: names a config in manifests and lineage. Where
        results go (pipeline.*, output_dir) is left out, so a run can move stores or servers.
        Computed over `canonical_dump`, so SD3 configs keep the digests they had before families."""
        data = self.canonical_dump()
        data.pop("pipeline")
        data.pop("output_dir")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class ConfigError(ValueError):
    """A config that failed validation; the message names every bad field."""


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if not loc:  # a check across fields: its message names them; the whole config is no help
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            continue
        lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})" if e["type"] != "missing" else f"  {loc}: {e['msg']}")
    return "invalid run config:\n" + "\n".join(lines)


def _parse_value(raw: str, key: str = "") -> Any:
    """Parse an override's value as YAML (numbers, lists, bools) within the config files' limits,
    falling back to the raw string."""
    if len(raw.encode("utf-8", "surrogatepass")) > CONFIG_MAX_BYTES:
        raise ConfigError(f"override {key!r} is over the {CONFIG_MAX_BYTES:,} bytes a run config may take")
    try:
        return _bounded_load(raw, f"override {key!r}")
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.field=value` overrides to a nested dict (a copy)."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(raw, key.strip())
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML/JSON config file over `base`, apply overrides and validate.

    Raises:
        ConfigError: naming each invalid or unknown field, or an unreadable file.
    """
    data: dict[str, Any] = json.loads(json.dumps(base or {}))
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = _bounded_yaml(p) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"--config: file {str(p)!r} is not UTF-8 text (a binary file?); fix: pass a YAML or "
                              "JSON run config") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {' '.join(str(e).split())}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        data = _deep_merge(data, loaded)
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


CONFIG_MAX_BYTES = 1 << 20  # a run config is a few kB; anything near this is not one
CONFIG_MAX_DEPTH = 32
CONFIG_MAX_VALUES = 100_000  # scalars and containers, aliases counted each time they are used


def _bounded_yaml(path: Path) -> Any:
    """A YAML (or JSON) config file parsed within limits: its size, its nesting and the values it
    expands to (an alias counts its whole target each time it is used, so a 'billion laughs'
    file is refused before anything expands it). Raises ConfigError naming the file and the limit."""
    where = f"config file {str(path)!r}"
    if path.stat().st_size > CONFIG_MAX_BYTES:
        raise ConfigError(f"{where} is {path.stat().st_size:,} bytes, over the {CONFIG_MAX_BYTES:,} a run config may "
                          "take; fix: pass the run's settings, not data")
    return _bounded_load(path.read_text(encoding="utf-8"), where)


def _bounded_load(text: str, where: str) -> Any:
    """YAML `text` parsed within CONFIG_MAX_DEPTH levels and CONFIG_MAX_VALUES values, counted
    after aliases are resolved (a value that contains itself is refused as too deep)."""

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's hook
            self._depth = getattr(self, "_depth", 0) + 1
            try:
                if self._depth > CONFIG_MAX_DEPTH:
                    raise ConfigError(f"{where} nests deeper than {CONFIG_MAX_DEPTH} levels; fix: a run config is a "
                                      "mapping of sections")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    data = yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    budget, stack = CONFIG_MAX_VALUES, [(data, 1)]
    while stack:  # iterative: an alias may make a value contain itself
        node, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(f"{where} expands to more than {CONFIG_MAX_VALUES:,} values (YAML aliases repeat their "
                              "target each time they are used); fix: write the settings out")
        if depth > CONFIG_MAX_DEPTH:
            raise ConfigError(f"{where} nests deeper than {CONFIG_MAX_DEPTH} levels once its aliases are resolved; "
                              "fix: a run config is a mapping of sections")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return data


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
