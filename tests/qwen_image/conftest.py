"""Fixtures of the Qwen-Image tests: one tiny random QwenImagePipeline saved per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """A random tiny QwenImagePipeline written with save_pretrained (built once)."""
    from tempflow_core.config import TinyModelConfig
    from tempflow_core.policies.models import save_pipeline
    from tempflow_core.policies.tiny_qwen_image import build_tiny_qwen_image_pipeline

    root = tmp_path_factory.mktemp("tiny-qwen-image")
    return save_pipeline(build_tiny_qwen_image_pipeline(TinyModelConfig(family="qwen-image")), root / "model")


@pytest.fixture
def qwen_pipe(tiny_qwen_dir):
    """A fresh QwenImagePipeline per test (the policy attaches its LoRA in place)."""
    from tempflow_core.policies.models import load_pipeline

    return load_pipeline(tiny_qwen_dir)
