"""The EMA of the LoRA follows Flow-GRPO's schedule: after optimizer step n (1-based) it takes
the weights when (n + 1) is a multiple of the interval, with the decay warmed up as
min((1 + n) / (10 + n), ema_decay); it starts from the initial adapter."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tempflow_core.algorithm.session import ema_decay_at, initial_ema, update_ema
from tempflow_core.config import RunConfig


def _session(decay: float, interval: int):
    cfg = RunConfig.model_validate({"train": {"ema_decay": decay, "ema_update_interval": interval}})
    weights = {"w": torch.zeros(2, dtype=torch.bfloat16)}
    s = SimpleNamespace(cfg=cfg, init_lora={"w": torch.full((2,), 4.0, dtype=torch.bfloat16)}, ema=None,
                        policy=SimpleNamespace(lora_state_dict=lambda: dict(weights)))
    s.ema = initial_ema(s)
    return s, weights


def test_the_decay_warms_up_to_its_cap():
    assert ema_decay_at(1, 0.9) == pytest.approx(2 / 11)
    assert ema_decay_at(7, 0.9) == pytest.approx(8 / 17)
    assert ema_decay_at(80, 0.9) == 0.9  # 81/90 = 0.9: the cap from here on
    assert ema_decay_at(1000, 0.9) == 0.9


def test_several_optimizer_steps_per_iteration_update_on_the_interval():
    s, weights = _session(0.5, interval=2)
    assert torch.equal(s.ema["w"], torch.full((2,), 4.0))  # the initial adapter, in float32
    expected = 4.0
    for n in range(1, 7):  # the LoRA after step n holds the value n
        weights["w"] = torch.full((2,), float(n), dtype=torch.bfloat16)
        update_ema(s, n)
        if n == 1:
            expected = 2 / 11 * expected + 9 / 11 * 1
        elif n == 3:
            expected = 4 / 13 * expected + 9 / 13 * 3
        elif n == 5:
            expected = 0.4 * expected + 0.6 * 5  # 6/15 = 0.4 < 0.5
        torch.testing.assert_close(s.ema["w"], torch.full((2,), expected), rtol=1e-6, atol=1e-6)
    assert s.ema["w"].dtype == torch.float32


def test_no_ema_when_off():
    s, weights = _session(0.0, interval=1)
    assert s.ema is None
    update_ema(s, 1)
    assert s.ema is None
