"""Model families: which diffusers pipeline a model folder holds, and everything that follows
from it, in one registration per family (`FamilySpec`).

    sd3   StableDiffusion3Pipeline (SD3.5-M, the tiny SD3 models): CFG pairs, static shift 3.0,
          noise level a = 0.7, T5 256 tokens (when the model has T5)
    flux  FluxPipeline (FLUX.1-dev, the tiny FLUX model): guidance-distilled (the guidance value
          is a transformer input, one call per step), resolution-dependent shift, a = 0.9, T5 512 tokens
    qwen-image  QwenImagePipeline (Qwen-Image, the tiny Qwen-Image): true CFG (a conditional and a
          negative " " call per step, the combination rescaled to the conditional's norm), no pooled
          embedding, Qwen2.5-VL tokens of the prompt after the pipeline's template, masked;
          resolution-dependent shift with the scheduler's terminal stretch
    wan   WanPipeline (Wan2.1 text-to-video, the tiny Wan): clips [C, F', H, W] with a frame axis,
          CFG as two calls (negative ""), UMT5 512 tokens, static flow shift 3.0 (480p); a clip
          travels as a frame strip

A family's code (its policy, its tiny builder) is named by "module:attribute" and imported only
when used, so this module reads JSON only (no torch) and the config can resolve a family's
defaults. Adding a family is one `FamilySpec` in `FAMILIES` plus the family test suite; nothing
outside a spec asks which family it is. An installed package adds one without editing tempflow:
an entry point of the group "tempflow.families" naming its `FamilySpec` (`plugin_families`).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from tempflow_core.config import LoraSettings
    from tempflow_core.policies.base import FlowPolicy

ModelFamily = Literal["sd3", "flux", "qwen-image", "wan"]


# QwenImagePipeline.prompt_template_encode: the prompt goes where "{}" is; its first 34 tokens
# (Qwen2.5-VL's) are dropped from the conditioning
QWEN_IMAGE_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                       "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
                       "{}<|im_end|>\n<|im_start|>assistant\n")


@dataclass(frozen=True)
class FamilyDefaults:
    """What a family uses when the config leaves the setting unset."""

    guidance_scale: float  # SD3: CFG scale (paper: 4.5); FLUX.1-dev: its guidance input (3.5); Qwen-Image: true CFG (4.0)
    noise_level: float  # a of s_t = a sqrt(t / (1 - t)) (paper: 0.7 SD3.5-M, 0.9 FLUX)
    shift: float | None  # static flow shift; None: a resolution-dependent shift (FLUX's calculate_shift)
    text_tokens: int  # tokens of the long encoder (T5, Qwen2.5-VL) when model.max_sequence_length is unset
    pipeline_class: str  # the diffusers class in model_index.json


@dataclass(frozen=True)
class FamilySpec:
    """One model family: how it is recognised, loaded, sampled, counted and exported."""

    name: str
    defaults: FamilyDefaults
    policy: str  # "module:Class" of its FlowPolicy: Class(pipe, lora, device, max_sequence_length, resolution, checkpointing)
    tiny_builder: str  # "module:function": function(TinyModelConfig, workdir) -> a random tiny pipeline
    cfg_pair: bool  # guidance > 1 runs a conditional and an unconditional row per sample (CFG); False: guidance is an input
    long_tokenizer: str | None  # subfolder of the tokenizer of the encoder that reads the most of a prompt (T5, Qwen2.5-VL)
    long_required: bool  # False: the model may be saved without it (SD3 without T5: CLIP's `tokenizer` reads the most)
    optional_components: tuple[str, ...]  # components a folder may save as null (passed as None when loading)
    native_side: Literal["transformer", "vae"]  # where the unset resolution comes from: the transformer's sample_size
    #                                             x the VAE's downsampling, or the VAE's own sample_size
    guidance_note: str  # the exported README's line on what guidance_scale means for this family ("" for CFG)
    encoder_label: str = "T5"  # the long encoder's name in messages
    prompt_template: str | None = None  # the text the pipeline encodes around a prompt ("{}" marks it)
    template_tokens: int = 0  # tokens of the template before the prompt, which the pipeline drops
    negative_prompt: str | None = ""  # the CFG negative prompt (None: no CFG pair)
    guidance_kwarg: str = "guidance_scale"  # the pipeline's __call__ argument that takes the guidance value
    video: bool = False  # its samples are clips (latents with a frame axis, decoded to frame strips)
    tiny_tokens_factor: int = 1  # the tiny model's long tokenizer reads tiny.max_tokens x this (Qwen-Image: 2,
    #                               for the prompt and the template's closing tokens)
    lora_targets: tuple[str, ...] | None = None  # its LoRA targets when lora.target_modules is the default list
    #                                            (whose names are SD3's / FLUX's / Qwen-Image's joint attention)

    @property
    def pipeline_class(self) -> str:
        return self.defaults.pipeline_class

    def load(self, attr: str) -> Any:
        """The object a "module:attribute" field names (`policy` or `tiny_builder`)."""
        module, name = getattr(self, attr).split(":")
        return getattr(importlib.import_module(module), name)

    def rows_per_sample(self, guidance_scale: float) -> int:
        """Transformer rows one sample-step costs at this guidance."""
        return 2 if self.cfg_pair and guidance_scale > 1.0 else 1


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        name="sd3",
        defaults=FamilyDefaults(guidance_scale=4.5, noise_level=0.7, shift=3.0, text_tokens=256,
                                pipeline_class="StableDiffusion3Pipeline"),
        policy="tempflow_core.policies.sd3:SD3Policy",
        tiny_builder="tempflow_core.policies.models:build_tiny_pipeline",
        cfg_pair=True, long_tokenizer="tokenizer_3", long_required=False,
        optional_components=("text_encoder_3", "tokenizer_3"), native_side="transformer", guidance_note=""),
    FamilySpec(
        name="flux",
        defaults=FamilyDefaults(guidance_scale=3.5, noise_level=0.9, shift=None, text_tokens=512,
                                pipeline_class="FluxPipeline"),
        policy="tempflow_core.policies.flux:FluxPolicy",
        tiny_builder="tempflow_core.policies.tiny_flux:build_tiny_flux_pipeline",
        cfg_pair=False, long_tokenizer="tokenizer_2", long_required=True, optional_components=(), native_side="vae",
        guidance_note="FLUX.1-dev is guidance-distilled: guidance_scale is the transformer's guidance input, not CFG.",
        negative_prompt=None),
    FamilySpec(
        name="qwen-image",
        # true CFG 4.0 and the negative " " of the model card; a = 0.7 (Flow-GRPO's default noise level;
        # neither paper gives one for Qwen-Image); 256 tokens after the template (the pipeline cuts at 1024)
        defaults=FamilyDefaults(guidance_scale=4.0, noise_level=0.7, shift=None, text_tokens=256,
                                pipeline_class="QwenImagePipeline"),
        policy="tempflow_core.policies.qwen_image:QwenImagePolicy",
        tiny_builder="tempflow_core.policies.tiny_qwen_image:build_tiny_qwen_image_pipeline",
        cfg_pair=True, long_tokenizer="tokenizer", long_required=True, optional_components=(), native_side="vae",
        guidance_note="Qwen-Image takes true CFG: true_cfg_scale with the negative prompt \" \" (the combination "
                      "rescaled to the conditional prediction's norm).",
        encoder_label="Qwen2.5-VL", prompt_template=QWEN_IMAGE_TEMPLATE, template_tokens=34, negative_prompt=" ",
        guidance_kwarg="true_cfg_scale", tiny_tokens_factor=2),
    FamilySpec(
        name="wan",
        # Flow-GRPO's Wan2.1 recipe: CFG 4.5, a = 0.7 (its default); Wan2.1's flow shift 3.0 at 480p;
        # UMT5 512 tokens (WanPipeline's max_sequence_length)
        defaults=FamilyDefaults(guidance_scale=4.5, noise_level=0.7, shift=3.0, text_tokens=512,
                                pipeline_class="WanPipeline"),
        policy="tempflow_core.policies.wan:WanPolicy",
        tiny_builder="tempflow_core.policies.tiny_wan:build_tiny_wan_pipeline",
        cfg_pair=True, long_tokenizer="tokenizer", long_required=True, optional_components=("transformer_2",),
        native_side="vae", guidance_note="", encoder_label="UMT5", video=True,
        # self- and cross-attention of every block: the counterpart of the joint attention SD3 adapts
        lora_targets=tuple(f"attn{i}.{m}" for i in (1, 2) for m in ("to_q", "to_k", "to_v", "to_out.0"))),
)


PLUGIN_GROUP = "tempflow.families"  # the entry-point group an installed package registers a FamilySpec under


def plugin_families() -> tuple[FamilySpec, ...]:
    """The families installed packages register: each entry point of the group "tempflow.families"
    names a `FamilySpec` (pyproject: [project.entry-points."tempflow.families"] mine = "pkg.mod:SPEC").
    Read only when a name or class is not a built-in one, so built-in families never pay for it.

    Raises:
        ValueError: one line naming the entry point that cannot be loaded, is not a FamilySpec, or
            takes a name or pipeline class another family has.
    """
    from importlib.metadata import entry_points

    found: list[FamilySpec] = []
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        where = f"model family plugin {ep.name!r} ({ep.value})"
        try:
            spec = ep.load()
        except Exception as e:  # noqa: BLE001 - any import error of a third-party module: name it, one line
            raise ValueError(f"{where} cannot be loaded ({type(e).__name__}: {e})") from None
        if not isinstance(spec, FamilySpec):
            raise ValueError(f"{where} is a {type(spec).__name__}, not a tempflow_core.families.FamilySpec")
        for other in (*FAMILIES, *found):
            if spec.name == other.name or spec.pipeline_class == other.pipeline_class:
                raise ValueError(f"{where} registers family {spec.name!r} ({spec.pipeline_class}), which "
                                 f"{other.name!r} ({other.pipeline_class}) already is")
        found.append(spec)
    return tuple(found)


def family_spec(family: str) -> FamilySpec:
    """The registration of `family`, built in or from a plugin (ValueError naming the registered ones)."""
    for spec in FAMILIES:
        if spec.name == family:
            return spec
    plugins = plugin_families()
    for spec in plugins:
        if spec.name == family:
            return spec
    raise ValueError(f"unknown model family {family!r}; expected one of {[s.name for s in (*FAMILIES, *plugins)]}")


def family_defaults(family: str) -> FamilyDefaults:
    """The defaults of `family`."""
    return family_spec(family).defaults


def _by_class(name: Any, what: str) -> FamilySpec:
    for spec in FAMILIES:
        if name == spec.pipeline_class:
            return spec
    plugins = plugin_families()
    for spec in plugins:
        if name == spec.pipeline_class:
            return spec
    supported = ", ".join(s.pipeline_class for s in (*FAMILIES, *plugins))
    raise ValueError(f"{what} {name!r} is not supported; supported pipelines: {supported}")


def detect_family(path: str | Path) -> ModelFamily:
    """The family of a saved diffusers pipeline folder, from model_index.json `_class_name`.

    Raises:
        FileNotFoundError: the folder has no model_index.json.
        ValueError: one line naming the file, its class and the supported classes.
    """
    index_path = Path(path) / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"model folder {str(Path(path))!r} has no model_index.json (not a saved diffusers pipeline)")
    name = json.loads(index_path.read_text(encoding="utf-8")).get("_class_name")
    return _by_class(name, f"{str(index_path)!r}: _class_name").name  # type: ignore[return-value]


def pipeline_family(pipe: object) -> ModelFamily:
    """The family of a loaded pipeline object, by its class name."""
    return _by_class(type(pipe).__name__, "pipeline class").name  # type: ignore[return-value]


def lora_targets(target_modules: list[str], default: list[str], family: str) -> list[str]:
    """The modules a run's LoRA wraps: `target_modules` as configured, or, while it is the default
    list (`default`), the family's own targets where it registers some (Wan's attention is attn1/attn2)."""
    own = family_spec(family).lora_targets
    return list(own) if own is not None and list(target_modules) == list(default) else list(target_modules)


def make_policy(pipe: Any, lora: LoraSettings | None, device: str = "auto", max_sequence_length: int | None = None,
                resolution: int | None = None, gradient_checkpointing: bool = False,
                frames: int | None = None) -> FlowPolicy:
    """The policy of `pipe`'s family (its registration's `policy`: `SD3Policy` for a
    StableDiffusion3Pipeline, `FluxPolicy` for a FluxPipeline, ...); anything else is refused naming
    the supported classes. `frames` (model.num_frames) is for a video family; an image family refuses it."""
    spec = family_spec(pipeline_family(pipe))
    policy = spec.load("policy")
    if frames is None:
        return policy(pipe, lora, device, max_sequence_length, resolution, gradient_checkpointing)
    if not spec.video:
        raise ValueError(f"model.num_frames={frames}: {spec.pipeline_class} makes images, not clips; "
                         "leave model.num_frames unset")
    return policy(pipe, lora, device, max_sequence_length, resolution, gradient_checkpointing, frames=frames)
