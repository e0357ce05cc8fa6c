"""Fixtures of the FLUX tests: one tiny random FluxPipeline saved per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A random tiny FluxPipeline written with save_pretrained (built once)."""
    from tempflow_core.config import TinyModelConfig
    from tempflow_core.policies.models import save_pipeline
    from tempflow_core.policies.tiny_flux import build_tiny_flux_pipeline

    root = tmp_path_factory.mktemp("tiny-flux")
    return save_pipeline(build_tiny_flux_pipeline(TinyModelConfig(family="flux"), root / "tok"), root / "model")


@pytest.fixture
def flux_pipe(tiny_flux_dir):
    """A fresh FluxPipeline per test (the policy attaches its LoRA in place)."""
    from tempflow_core.policies.models import load_pipeline

    return load_pipeline(tiny_flux_dir)
