"""TempFlow-GRPO core: the algorithm and its I/O, importable without Prefect or MLflow.

Shape letters used across the package:
    B  prompts in a rollout batch        K  children per branch point (group size when branching)
    G  trajectories per prompt (plain)   M  branch steps per prompt
    T  denoising steps                   C, H, W  latent channels and size
    L  prompt tokens                     D  token embedding width, Dp pooled width
    N  training units in a micro-batch (a branch point, or one step of one trajectory)
"""

__version__ = "0.1.0"
