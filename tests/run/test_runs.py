"""Run records and branching: the invalidation table, idempotent branches, input fingerprints."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from tempflow_core.config import RunConfig, load_config
from tempflow_core.run.invalidation import AFFECTS, affected, plan_branch
from tempflow_core.run.layout import RunLayout
from tempflow_core.run.runs import RunError, branch_run, open_run, read_run
from tempflow_core.storage import open_store


def _leaves(model: BaseModel, prefix: str = ""):
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_every_setting_is_in_the_invalidation_table():
    leaves = set(_leaves(RunConfig()))
    assert leaves == set(AFFECTS)  # a new setting must say what it invalidates
    assert affected("reward.options.clipscore.model") == {"reward", "eval"}


def _dump(**changes) -> dict:
    data = RunConfig().model_dump(mode="json")
    for path, value in changes.items():
        section, field = path.split("__")
        data[section][field] = value
    return data


@pytest.mark.parametrize("stage, iteration, change, outcome", [
    # train.seed: the initial LoRA and RNG; from rollout at 0 nothing else is reused, so init is made anew
    ("rollout", 0, {"train__seed": 1}, "recompute init"),
    ("rollout", 1, {"train__seed": 1}, "refuse: init, rollout, learner"),
    ("reward", 0, {"train__seed": 1}, "refuse: init, rollout"),
    # CFG: the rollouts' log-probs were sampled at the old scale
    ("learner", 0, {"sampling__guidance_scale": 7.0}, "refuse: rollout"),
    ("rollout", 0, {"sampling__guidance_scale": 7.0}, "copy, recompute eval"),
    # a new reward re-scores stored rollouts; evaluations (which score it) are recomputed
    ("reward", 0, {"reward__name": "jpeg_compressibility"}, "copy, recompute eval"),
    ("reward", 2, {"reward__name": "jpeg_compressibility"}, "refuse: reward"),  # and learner 0, 1 from them
    ("learner", 0, {"loss__beta": 0.1}, "copy"),
    ("learner", 1, {"train__lr": 0.1}, "refuse: learner"),
    ("eval", 3, {"eval__max_prompts": 4}, "copy, recompute eval"),
    ("eval", 3, {"train__iterations": 9}, "copy"),
    ("eval", 3, {"pipeline__mlflow_uri": "sqlite:///x.db"}, "copy"),
])
def test_a_branch_reuses_only_what_the_changed_settings_leave_valid(stage, iteration, change, outcome):
    plan = plan_branch(_dump(), _dump(**change), stage, iteration)
    if outcome.startswith("refuse: "):
        assert plan.refusal is not None
        assert f"would reuse {outcome[len('refuse: '):]} outputs (and" in plan.refusal
        assert next(iter(change)).replace("__", ".") in plan.refusal
    else:
        assert plan.refusal is None
        assert plan.copy_init == (outcome != "recompute init")
        assert plan.copy_eval == ("recompute eval" not in outcome)


def _fake_run(lay: RunLayout, cfg: RunConfig, iterations: int) -> None:
    """A run record and stage outputs (manifests last), without a model."""
    open_run(cfg, lay)
    lay.store.put_bytes(f"{lay.run_id}/init/learner/a.bin", b"init")
    lay.store.put_bytes(f"{lay.run_id}/init/learner/manifest.json", b"{}")
    for it in range(iterations):
        for stage in ("rollout", "reward", "learner", "eval"):
            lay.store.put_bytes(f"{lay.prefix(it, stage)}/x.bin", f"{stage}{it}".encode())
            lay.store.put_bytes(f"{lay.prefix(it, stage)}/manifest.json", json.dumps({"schema_version": 1, "kind": stage}).encode())


def test_a_branch_is_idempotent_and_refuses_anything_else(tmp_path):
    store = open_store(tmp_path / "store")
    cfg = RunConfig()
    src = RunLayout(store, "src")
    _fake_run(src, cfg, 2)
    cfg2 = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"name": "jpeg_compressibility"})})
    dst = RunLayout(store, "dst")
    n = branch_run(src, dst, "reward", 0, cfg2)
    assert n == 4  # the initial adapter and rollout 0, each an object and its manifest
    assert store.list("dst") == ["dst/init/learner/a.bin", "dst/init/learner/manifest.json",
                                 "dst/iter-000000/rollout/manifest.json", "dst/iter-000000/rollout/x.bin",
                                 "dst/run.json"]
    assert store.get_bytes("dst/iter-000000/rollout/x.bin") == b"rollout0"
    assert not store.exists("dst/iter-000000/reward/x.bin")
    # the same branch again (Prefect's Retry): continues
    assert branch_run(src, dst, "reward", 0, cfg2) == 0
    # killed during the copy: the record is there, the copy is not finished; the same branch completes it
    store.delete("dst/iter-000000/rollout/manifest.json")
    record = read_run(dst)
    record.pop("branch_copied")
    store.put_bytes("dst/run.json", json.dumps(record).encode())
    assert branch_run(src, dst, "reward", 0, cfg2) > 0
    assert store.exists("dst/iter-000000/rollout/manifest.json")
    # anything else on that run id: refused, saying what it is
    with pytest.raises(RunError, match="already exists .*branched from .*needs a new run id"):
        branch_run(src, dst, "learner", 0, cfg2)
    cfg3 = cfg2.model_copy(update={"loss": cfg2.loss.model_copy(update={"beta": 0.5})})
    with pytest.raises(RunError, match="needs a new run id"):
        branch_run(src, dst, "reward", 0, cfg3)


def test_a_branch_whose_settings_invalidate_reused_outputs_is_refused_before_copying(tmp_path):
    store = open_store(tmp_path / "store")
    cfg = RunConfig()
    src = RunLayout(store, "src")
    _fake_run(src, cfg, 1)
    cfg2 = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"guidance_scale": 7.0})})
    with pytest.raises(RunError, match="would reuse rollout outputs .*sampling.guidance_scale"):
        branch_run(src, RunLayout(store, "cfg7"), "learner", 0, cfg2)
    assert store.list("cfg7") == []
    # a new seed from rollout 0: the initial adapter is made anew, not copied
    cfg3 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 1})})
    assert branch_run(src, RunLayout(store, "seed1"), "rollout", 0, cfg3) == 0
    assert store.list("seed1") == ["seed1/run.json"]


def test_a_resume_whose_input_files_changed_is_refused_naming_the_file(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    cfg = load_config(overrides=[f"prompts.source={prompts}", f"pipeline.store={tmp_path / 'store'}"])
    lay = RunLayout.open(cfg, "r")
    record = open_run(cfg, lay)
    assert list(record["inputs"]) == [str(prompts.resolve())]
    assert open_run(cfg, lay)["run_id"] == "r"  # unchanged: resumes
    prompts.write_text("a red circle\na green square\n")
    with pytest.raises(RunError, match=f"{prompts.resolve()} changed \\(sha256 "):
        open_run(cfg, lay)


def test_folder_sha256_names_the_bytes_of_a_model_folder(tmp_path):
    """The exported recipe's base_model_sha256: every loaded file's content counts (a weight
    byte changed at the same size changes it), documentation and hidden files do not, and a
    run's recorded file digests are reused instead of reading the weights again."""
    import hashlib

    from tempflow_core.run.fingerprints import fingerprints, folder_sha256

    (tmp_path / "m" / "transformer").mkdir(parents=True)
    (tmp_path / "m" / ".cache").mkdir()
    files = {"model_index.json": b'{"_class_name": "StableDiffusion3Pipeline"}',
             "transformer/diffusion_pytorch_model.safetensors": bytes(range(256)) * 64}
    for rel, data in files.items():
        (tmp_path / "m" / rel).write_bytes(data)
    (tmp_path / "m" / "README.md").write_text("a model card")
    (tmp_path / "m" / ".cache" / "x").write_text("hidden")

    def by_hand(contents: dict[str, bytes]) -> str:
        h = hashlib.sha256()
        for rel in sorted(contents):
            h.update(rel.encode() + b"\0" + hashlib.sha256(contents[rel]).hexdigest().encode() + b"\n")
        return h.hexdigest()

    first = folder_sha256(tmp_path / "m")
    assert first == by_hand(files)
    cfg = load_config(None, [f"model.path={tmp_path / 'm'}"])
    assert folder_sha256(tmp_path / "m", fingerprints(cfg)) == first  # the run record's digests, same name
    weights = tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors"
    recorded = {str(weights.resolve()): "0" * 64}  # a recorded digest is used, not recomputed
    assert folder_sha256(tmp_path / "m", recorded) != first
    changed = bytearray(files["transformer/diffusion_pytorch_model.safetensors"])
    changed[100] ^= 1  # one bit, same size
    weights.write_bytes(bytes(changed))
    assert folder_sha256(tmp_path / "m") == by_hand({**files, "transformer/diffusion_pytorch_model.safetensors":
                                                     bytes(changed)}) != first
    (tmp_path / "m" / "README.md").write_text("another card")
    assert folder_sha256(tmp_path / "m") == by_hand({**files, "transformer/diffusion_pytorch_model.safetensors":
                                                     bytes(changed)})


def test_a_run_is_never_opened_in_a_folder_that_holds_something_else(tmp_path):
    """A run started from the UI or API with the id of someone's folder: refused before run.json
    is written, the folder left as it was."""
    folder = tmp_path / "store" / "ssh"
    folder.mkdir(parents=True)
    (folder / "sshd_config").write_text("PermitRootLogin no\n")
    cfg = RunConfig(pipeline={"store": str(tmp_path / "store")})
    with pytest.raises(RunError, match="already holds files that are not a tempflow run"):
        open_run(cfg, RunLayout.open(cfg, "ssh"))
    assert sorted(p.name for p in folder.iterdir()) == ["sshd_config"]
    assert open_run(cfg, RunLayout.open(cfg, "fresh"))["run_id"] == "fresh"  # a new folder is fine
