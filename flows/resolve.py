"""How a CLI command resolves its run config, and where the local state lives."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from flows.cli_errors import fail as _fail

# Local state of the embedded default lives in the checkout, so the UIs can be opened on it.
STATE = Path(os.environ.get("TEMPFLOW_HOME", "").strip() or ".tempflow").resolve()  # empty counts as unset
CHECKOUT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
ABLATION_CONFIG = Path(__file__).parent / "configs" / "ablation.yaml"  # the shipped ablation's settings
PAPER_VARIANTS = "flow_grpo,flow_grpo_fixed,reweight,branch,tempflow"  # the paper's five, in its order


def resolve(config: Optional[Path], overrides: list[str], base: Optional[dict] = None):
    """The run config of a command: --config over the code's defaults (the embedded demo default
    when no --config is given), then --set overrides; local state under TEMPFLOW_HOME. Exits 2
    with one line on a bad config."""
    import yaml

    from tempflow_core.config import ConfigError, load_config

    if base is None:
        # the demo's settings only when no --config is given: a config file stands alone over the
        # code's defaults (the paper's recipe), so a model config never inherits the demo's sizes
        base = yaml.safe_load(DEFAULT_CONFIG.read_text()) if config is None else {}
        model_path = base.get("model", {}).get("path")
        if model_path and not Path(model_path).is_absolute():  # the shipped model, wherever the CLI runs
            base["model"]["path"] = str(CHECKOUT / model_path)
        base.setdefault("output_dir", str(STATE / "runs"))
        base.setdefault("pipeline", {}).setdefault("store", str(STATE / "store"))
    try:
        cfg = load_config(config, overrides, base=base)
    except ConfigError as e:
        _fail(str(e))
    path = cfg.model.path
    if path and not Path(path).is_absolute() and not Path(path).exists() and (CHECKOUT / path).exists():
        # a config from the repository (the ablation bundle) names the shipped model relative to the checkout
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(CHECKOUT / path)})})
    return cfg
