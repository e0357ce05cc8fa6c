"""The `tempflow` command line.

    tempflow train                      # the embedded default (tiny model, CPU, minutes)
    tempflow train --config my.yaml --set train.iterations=50 --set algorithm=flow_grpo_fixed
    tempflow show-config                # the resolved config, with every default
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="TempFlow-GRPO for flow-matching text-to-image models.")

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def _resolve(config: Optional[Path], overrides: list[str]):
    import yaml

    from tempflow_core.config import ConfigError, load_config

    base = yaml.safe_load(DEFAULT_CONFIG.read_text())
    try:
        return load_config(config, overrides, base=base)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML/JSON run config over the embedded default."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override: section.field=value (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default runs/<algorithm>-<config hash>)."),
) -> None:
    """Train with TempFlow-GRPO (or an ablation variant) in this process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = _resolve(config, set_)
    from tempflow_core.train import train_in_process

    out = out or Path(cfg.output_dir) / f"{cfg.algorithm}-{cfg.digest()[:8]}"
    typer.echo(f"tempflow: {cfg.algorithm}, {cfg.train.iterations} iterations, reward {cfg.reward.name!r}, "
               f"model {cfg.model.path or 'tiny (random init)'} -> {out}")

    def report(it: int, m: dict) -> None:
        typer.echo(f"iter {it:3d}  reward {m['reward/mean']:.4f} ± {m['reward/std']:.4f}  "
                   f"loss {m['train/loss']:+.4f}  kl {m['train/approx_kl']:.2e}  clip {m['train/clip_frac']:.2f}  "
                   f"nfe {m['rollout/nfe']}  ({m['time/rollout_s'] + m['time/learner_s']:.1f}s)")

    result = train_in_process(cfg, out, progress=sys.stderr.isatty(), on_iteration=report)
    typer.echo(f"done: metrics {out / 'metrics.jsonl'}, LoRA {result.lora_path}")
    typer.echo("load it with diffusers: StableDiffusion3Pipeline.from_pretrained(<model>).load_lora_weights("
               f"{str(result.lora_path.parent)!r})")


@app.command("show-config")
def show_config(
    config: Optional[Path] = typer.Option(None, "--config", "-c"),
    set_: list[str] = typer.Option([], "--set", "-s"),
) -> None:
    """Print the resolved run config as JSON."""
    typer.echo(json.dumps(_resolve(config, set_).model_dump(mode="json"), indent=2))


if __name__ == "__main__":
    app()
