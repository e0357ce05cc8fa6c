"""The scaling model's row counts against counts worked out by hand."""


import pytest

from benchmarks.scaling_model import main, rows_per_iteration


def test_row_counts_by_hand(capsys):
    T, K, B = 10, 24, 48
    # every branch point: T-1 backbone steps + K children finishing 9+8+...+1 steps
    assert rows_per_iteration(T, K, B, {}) == (B * (9 + K * 45), B * 9)
    # 3 of the 9 steps drawn uniformly: E[max] + 1 = 3 * 10 / 4 = 7.5 backbone steps, 3 * E[9 - k] = 15 child steps
    nfe, units = rows_per_iteration(T, K, B, {"m": 3, "draw": "uniform"})
    assert nfe == pytest.approx(B * (7.5 + K * 15), rel=0.02) and units == B * 3
    # stride 2: children from step k visit range(k+1, 10, 2) + [10]
    assert rows_per_iteration(T, K, B, {"stride": 2})[0] == B * (9 + K * sum(len(range(k + 1, 10, 2)) for k in range(9)))
    # branching at step 0 only: one backbone step, K children of 9 steps
    assert rows_per_iteration(T, K, B, {"steps": [0]}) == (B * (1 + K * 9), B)
    # the four noisiest steps: four backbone steps, K children of 9 + 8 + 7 + 6 steps
    assert rows_per_iteration(T, K, B, {"steps": [0, 1, 2, 3]}) == (B * (4 + K * 30), B * 4)
    assert rows_per_iteration(T, K, B, {"plain": True}) == (B * K * T, B * K * 9)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "| tempflow (all branch points) | 52,272 | 432 |" in out
    # half the iterations at (34,752 x 26.6 ms + 192 x 96.5 ms) / (52,272 x 26.6 ms + 432 x 96.5 ms) each
    assert "over a run 0.33 of tempflow's minutes" in out
