"""Fixtures of the Wan tests (the saved tiny model, `tiny_wan_dir`, is tests/conftest.py's)."""

from __future__ import annotations

import pytest


@pytest.fixture
def wan_pipe(tiny_wan_dir):
    """A fresh WanPipeline per test (the policy attaches its LoRA in place)."""
    from tempflow_core.policies.models import load_pipeline

    return load_pipeline(tiny_wan_dir)
