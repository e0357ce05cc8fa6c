"""Fixtures of the Qwen-Image tests (the saved tiny model, `tiny_qwen_dir`, is tests/conftest.py's)."""

from __future__ import annotations

import pytest


@pytest.fixture
def qwen_pipe(tiny_qwen_dir):
    """A fresh QwenImagePipeline per test (the policy attaches its LoRA in place)."""
    from tempflow_core.policies.models import load_pipeline

    return load_pipeline(tiny_qwen_dir)
