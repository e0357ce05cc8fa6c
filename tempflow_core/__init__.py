"""TempFlow-GRPO core: the algorithm and its I/O, importable without Prefect or MLflow.

By concept, lowest layer first (a module imports only from its own layer or lower ones;
tests/core/test_layers.py checks it):
    config, families, batches, seeding, redaction, canonical, failpoints, executables
    storage/, shards/      the data plane: object stores and webdataset rollout shards
    shapes/, rewards/, prompts
    algorithm/schedule, algorithm/sde
    policies/              a flow transformer with its LoRA behind one interface
    algorithm/, pretrain/  the paper's method on a policy; pretraining the tiny base model
    run/                   a run on the store: stages, records, healing, pre-flight
    engines/               where the stages' work runs (here, or on Ray)
    reports/               curves, verdicts, figures

Shape letters used across the package:
    B  prompts in a rollout batch        K  children per branch point (group size when branching)
    G  trajectories per prompt (plain)   M  branch steps per prompt
    T  denoising steps                   C, H, W  latent channels and size
    L  prompt tokens                     D  token embedding width, Dp pooled width
    N  training units in a micro-batch (a branch point, or one step of one trajectory)
"""

__version__ = "0.1.0"
