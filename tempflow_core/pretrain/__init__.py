"""Pretrain the tiny StableDiffusion3Pipeline on rendered shape scenes: the shipped base model.

The latent route of the project notes, deterministic given a seed, one module per phase:

1. render ``images`` captioned scenes (``shapes.generate_dataset``, all six GenEval tags): data.py;
2. train the AutoencoderKL (MSE + small KL; the first ``vae_crop_fraction`` of the steps on
   random ``vae_crop`` crops), then store the latent mean / 1/std as ``shift_factor`` /
   ``scaling_factor`` in its config: vae.py;
3. encode every scene once (posterior mean) and cache the normalised latents: vae.py, data.py;
4. train the SD3 transformer and both tiny CLIP text encoders jointly with the rectified-flow
   loss, prompts through the pipeline's own ``encode_prompt``: transformer.py;
5. every ``eval_every`` steps sample the test prompts with the fixed protocol (ODE) and score
   them with the shapes detector (evaluation.py); stop once the overall strict score reaches
   ``stop_at`` (inside ``band``), or at the step/time budget (transformer.py);
6. score the final report, save with ``save_pipeline`` (safetensors) plus curve.json/png and a
   sample grid (record.py). ``pretrain()`` (run.py) composes the phases; the flow adds
   MODEL_CARD.md and README.md (flows/model_card.py).

Determinism: every random draw comes from a generator seeded by ``seed`` (numpy Generators
for data order, crops and caption dropout; torch Generators for init, KL sampling, t and
noise), and evaluation draws its own seeded noise, so it does not perturb training. Two runs
with the same config, torch build, thread count and CPU give bit-identical weights. Caveats:
different ``torch.set_num_threads`` values or CPUs (SIMD paths) can change float reduction
order; the wall-clock budget ``max_minutes`` (and hence the stopping step) depends on the
machine's speed; ``stop_at`` stopping is deterministic because evaluation is.

Run it with ``tempflow pretrain --out models/tiny-shapes-sd3 [--seed 0] [--minutes N] [--images N]``
(flows/pretrain.py: a Prefect flow with an MLflow run). On shared cores run it with
``OMP_WAIT_POLICY=PASSIVE`` (set before torch starts): with the default spinning OpenMP
threads, a second busy process on the same 2 cores slowed training 5-10x in our measurements
(benchmarks/pretrain_throughput.py).
"""

from __future__ import annotations

from tempflow_core.pretrain.config import SHIPPED_MODEL, PretrainConfig
from tempflow_core.pretrain.data import render_scenes, to_pixels
from tempflow_core.pretrain.evaluation import evaluate_pipeline, sample_split
from tempflow_core.pretrain.progress import LogFn
from tempflow_core.pretrain.record import PretrainResult
from tempflow_core.pretrain.run import pretrain
from tempflow_core.pretrain.transformer import encode_text, flow_loss
from tempflow_core.pretrain.vae import encode_latents, train_vae

__all__ = [
    "SHIPPED_MODEL", "LogFn", "PretrainConfig", "PretrainResult", "encode_latents", "encode_text", "evaluate_pipeline",
    "flow_loss", "pretrain", "render_scenes", "sample_split", "to_pixels", "train_vae",
]
