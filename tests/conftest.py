"""Shared fixtures: offline hub settings and one tiny SD3 pipeline saved per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Ray (pipeline.engine=ray tests): every server on 127.0.0.1, read when Ray is imported (flows/ray_head.py)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# up to two threads over all of pytest-xdist's workers (two workers: one thread each)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_addoption(parser):
    parser.addoption("--screenshots", default=None, metavar="DIR",
                     help="also save the browser tests' screenshots as DIR/<name>.png (the docs' images)")


@pytest.fixture(scope="session")
def moto_s3():
    """The session's moto S3 endpoint URL (tests/moto_s3.py)."""
    from moto_s3 import moto_server

    with moto_server() as url:
        yield url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny StableDiffusion3Pipeline written with save_pretrained (built once)."""
    from tempflow_core.policies.models import build_tiny_pipeline, save_pipeline

    root = tmp_path_factory.mktemp("tiny-sd3")
    return save_pipeline(build_tiny_pipeline(workdir=root / "tok"), root / "model")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A random tiny FluxPipeline written with save_pretrained (built once)."""
    from tempflow_core.config import TinyModelConfig
    from tempflow_core.policies.models import save_pipeline
    from tempflow_core.policies.tiny_flux import build_tiny_flux_pipeline

    root = tmp_path_factory.mktemp("tiny-flux")
    return save_pipeline(build_tiny_flux_pipeline(TinyModelConfig(family="flux"), root / "tok"), root / "model")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """A random tiny QwenImagePipeline written with save_pretrained (built once)."""
    from tempflow_core.config import TinyModelConfig
    from tempflow_core.policies.models import save_pipeline
    from tempflow_core.policies.tiny_qwen_image import build_tiny_qwen_image_pipeline

    root = tmp_path_factory.mktemp("tiny-qwen-image")
    return save_pipeline(build_tiny_qwen_image_pipeline(TinyModelConfig(family="qwen-image")), root / "model")


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    """A random tiny WanPipeline (text-to-video) written with save_pretrained (built once)."""
    from tempflow_core.config import TinyModelConfig
    from tempflow_core.policies.models import save_pipeline
    from tempflow_core.policies.tiny_wan import build_tiny_wan_pipeline

    root = tmp_path_factory.mktemp("tiny-wan")
    return save_pipeline(build_tiny_wan_pipeline(TinyModelConfig(family="wan")), root / "model")


@pytest.fixture
def tiny_pipe(tiny_model_dir):
    """A fresh pipeline per test (a policy attaches its LoRA in place)."""
    from tempflow_core.policies.models import load_pipeline

    return load_pipeline(tiny_model_dir)
