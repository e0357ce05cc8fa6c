"""benchmarks/harness.py, what the performance scripts share: variants run interleaved round by
round, warm-up rounds untimed, the hooks around each call untimed, and medians and ratios read
from the timed rounds only."""

from __future__ import annotations

import time

import pytest

from benchmarks.harness import interleaved, parser


def test_variants_run_interleaved_and_only_the_timed_rounds_count():
    calls: list[str] = []

    def variant(name: str, seconds: float):
        def run():
            calls.append(name)
            time.sleep(seconds)
            return len(calls)
        return run

    t = interleaved({"a": variant("a", 0.02), "b": variant("b", 0.002)}, repeats=3, warmup=1,
                    before=lambda name: calls.append(f"before {name}"),
                    after=lambda name: (name, sum(c == name for c in calls)))
    assert calls == ["before a", "a", "before b", "b"] * 4  # A, B, A, B, ...: a busy machine biases both alike
    assert [len(v) for v in t.seconds.values()] == [3, 3]  # the warm-up round is not timed
    assert t.results == {"a": ("a", 4), "b": ("b", 4)}  # `after`'s value, read after the last call
    assert all(s >= 0.02 for s in t.seconds["a"]) and all(s < 0.02 for s in t.seconds["b"])
    assert t.ratio("a", "b") == pytest.approx(t.median("a") / t.median("b")) and t.ratio("a", "b") > 1
    assert "n 3" in t.line("a")


def test_the_shared_options_appear_only_where_a_script_takes_them():
    assert parser("x", repeats=5).parse_args([]).repeats == 5
    assert not hasattr(parser("x").parse_args([]), "repeats")
    assert parser("x", threads=1).parse_args(["--threads", "2"]).threads == 2
