"""Fixtures of the FLUX tests (the saved tiny model, `tiny_flux_dir`, is tests/conftest.py's)."""

from __future__ import annotations

import pytest


@pytest.fixture
def flux_pipe(tiny_flux_dir):
    """A fresh FluxPipeline per test (the policy attaches its LoRA in place)."""
    from tempflow_core.policies.models import load_pipeline

    return load_pipeline(tiny_flux_dir)
