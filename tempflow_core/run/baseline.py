"""The base model's evaluation, kept once per store: what every final evaluation is shown beside.

    {store}/_baselines/{key}.json    the base model's evaluation result (evaluation.evaluate_policy)

`key` is the sha256 of everything that evaluation depends on: the sha256 of every input file
(model folder, evaluation prompts, reward models: fingerprints.py), the model settings that
change what it computes, the sampling, evaluation and reward sections, and the shapes
detector's rules. A run, `tempflow eval` of the base and `tempflow ablation` (also with
--report-only) read it instead of scoring the base again; anything that changes the base's
score changes the key, so a stale result is never shown. The folder's name cannot be a run id
(run ids start with a letter or digit) and the store-root check (ownership.py) expects it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Mapping

from tempflow_core.config import RunConfig
from tempflow_core.run.ownership import BASELINES
from tempflow_core.storage import ObjectNotFound, ObjectStore, join_key

_PLACEMENT = ("path", "device", "offload_text_encoders")  # where the model lives, not what it computes


def baseline_key(cfg: RunConfig, inputs: Mapping[str, str]) -> str:
    """The key of `cfg`'s base-model evaluation, given the sha256 of its input files (`inputs`,
    as run.json records them)."""
    from tempflow_core.algorithm.evaluation import detector_rules

    data = cfg.canonical_dump()
    model = {k: v for k, v in data["model"].items() if k not in _PLACEMENT}
    what = {"inputs": dict(sorted(inputs.items())), "model": model, "sampling": data["sampling"],
            "eval": data["eval"], "reward": data["reward"], "max_batch": data["rollout"]["max_batch"],
            "prompts": data["prompts"], "rules": repr(detector_rules(cfg)), "family": cfg.family()}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def read_baseline(store: ObjectStore, key: str) -> dict[str, Any] | None:
    """The cached result under `key`; None when absent or unreadable (it is recomputed)."""
    try:
        result = json.loads(store.get_bytes(join_key(BASELINES, f"{key}.json")))
    except (ObjectNotFound, ValueError):
        return None
    return result if isinstance(result, dict) else None


def write_baseline(store: ObjectStore, key: str, result: Mapping[str, Any]) -> None:
    store.put_bytes(join_key(BASELINES, f"{key}.json"), json.dumps(result, sort_keys=True).encode())


def base_evaluation(cfg: RunConfig, store: ObjectStore, session: Callable[[], Any],
                    inputs: Mapping[str, str] | None = None) -> tuple[dict[str, Any], bool]:
    """(the base model's evaluation, whether it came from the store). When absent, computed with
    the policy of `session()` (called then only: a stored result loads no model) at its initial
    (zero-effect) adapter, then stored; that session's adapter is left at the initial one."""
    from tempflow_core.algorithm import evaluation
    from tempflow_core.run.fingerprints import fingerprints

    key = baseline_key(cfg, inputs if inputs is not None else fingerprints(cfg))
    cached = read_baseline(store, key)
    if cached is not None:
        return cached, True
    s = session()
    s.policy.load_lora_state_dict(s.init_lora)
    result, _ = evaluation.evaluate_policy(cfg, s.policy, s.reward_fn, evaluation.eval_prompts(cfg))
    write_baseline(store, key, result)
    return result, False
