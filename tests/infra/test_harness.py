"""benchmarks/harness.py, what the performance scripts share: variants run interleaved round by
round, warm-up rounds untimed, the hooks around each call untimed, and medians and ratios read
from the timed rounds only."""

from __future__ import annotations

from benchmarks import harness
from benchmarks.harness import interleaved, parser


def test_variants_run_interleaved_and_only_the_timed_rounds_count(monkeypatch):
    """On a clock of the test's own: a variant's call takes 20 (a) or 2 (b) ticks and each hook
    100, so what is timed is read exactly, whatever the machine's load."""
    clock = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])
    calls: list[str] = []

    def variant(name: str, ticks: float):
        def run():
            calls.append(name)
            clock[0] += ticks
            return len(calls)
        return run

    def hook(text: str, value=None):
        def run(name: str):
            calls.append(f"{text} {name}")
            clock[0] += 100
            return value(name) if value else None
        return run

    t = interleaved({"a": variant("a", 20), "b": variant("b", 2)}, repeats=3, warmup=1, before=hook("before"),
                    after=hook("after", lambda name: (name, sum(c == name for c in calls))))
    assert calls == ["before a", "a", "after a", "before b", "b", "after b"] * 4  # A, B, A, B, ...
    assert t.seconds == {"a": [20, 20, 20], "b": [2, 2, 2]}  # the warm-up round and the hooks are not timed
    assert t.results == {"a": ("a", 4), "b": ("b", 4)}  # `after`'s value, read after the last call
    assert t.median("a") == 20 and t.ratio("a", "b") == 10
    assert "n 3" in t.line("a")


def test_the_shared_options_appear_only_where_a_script_takes_them():
    assert parser("x", repeats=5).parse_args([]).repeats == 5
    assert not hasattr(parser("x").parse_args([]), "repeats")
    assert parser("x", threads=1).parse_args(["--threads", "2"]).threads == 2


def test_timed_stages_time_each_stage_of_the_controllers_context_and_pass_its_values_on(monkeypatch):
    """On the test's own clock: the wrapped context's rollout takes 5 ticks, its scoring 3, its
    update 7; each iteration's row holds them and their sum, and the controller gets the wrapped
    context's values and metrics unchanged."""
    from benchmarks.harness import TimedStages
    from tempflow_core.algorithm.controller import Hooks, train
    from tempflow_core.algorithm.schedule import make_schedule
    from tempflow_core.config import load_config

    clock = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])
    seen: list = []

    class Context:
        def init(self):
            seen.append("init")

        def schedule(self):
            return make_schedule(4, 3.0, 0.7)

        def rollout(self, plan):
            clock[0] += 5
            return f"r{plan.iteration}"

        def score(self, plan, rollouts):
            clock[0] += 3
            return f"s{plan.iteration}"

        def update(self, plan, rollouts, rewards):
            clock[0] += 7
            seen.append((rollouts, rewards))
            return {"reward/mean": 0.5, "iteration": plan.iteration}

        def evaluate(self, iteration):
            raise AssertionError("no evaluation asked for")

    timed = TimedStages(Context())
    result = train(load_config(None, ["train.iterations=2", "sampling.num_steps=4"]), timed,
                   Hooks(eval_at=lambda it: False))
    assert seen == ["init", ("r0", "s0"), ("r1", "s1")]
    assert [m["iteration"] for m in result.history] == [0, 1]
    assert timed.seconds == [{"rollout": 5, "reward": 3, "learner": 7, "iteration": 15}] * 2
