"""Model families in the config: per-family defaults, detection, and compatibility with runs
made before FLUX existed (digests and branch plans of SD3 configs do not move)."""

import json
from pathlib import Path

import pytest

from tempflow_core.config import RunConfig, load_config
from tempflow_core.families import detect_family, family_defaults
from tempflow_core.run.invalidation import plan_branch

ROOT = Path(__file__).resolve().parents[2]

# digests written by the code before model families (sampling.shift / noise_level were 3.0 / 0.7)
PRE_FAMILY_DIGESTS = {
    (): "2a002a27331e080c6f2d0e07e4bffce790d5cd681d2d94ea7fcff120beccbea5",
    ("sampling.noise_level=0.5", "model.tiny.layers=3"): "3280b2ded24f1f512775d63aaf7ddd73a8243d5b2859466ae82003b25ddf2e01",
}


@pytest.mark.parametrize("overrides", list(PRE_FAMILY_DIGESTS))
def test_sd3_digests_are_those_of_before_families(overrides):
    cfg = load_config(None, list(overrides))
    assert cfg.digest() == PRE_FAMILY_DIGESTS[overrides]
    # an explicit default is the same run as an unset one
    explicit = load_config(None, list(overrides) + ["sampling.shift=3.0"] +
                           ([] if "sampling.noise_level=0.5" in overrides else ["sampling.noise_level=0.7"]))
    assert explicit.digest() == cfg.digest()


def test_flux_defaults_and_digests(tmp_path):
    sd3, flux = RunConfig(), load_config(None, ["model.tiny.family=flux"])
    assert sd3.family() == "sd3" and flux.family() == "flux" and flux.digest() != sd3.digest()
    # unset a on FLUX is 0.9: the same run as an explicit 0.9, not as an explicit 0.7
    assert flux.digest() == load_config(None, ["model.tiny.family=flux", "sampling.noise_level=0.9"]).digest()
    assert flux.digest() != load_config(None, ["model.tiny.family=flux", "sampling.noise_level=0.7"]).digest()
    assert flux.canonical_dump()["sampling"]["shift"] is None  # resolution-dependent: no number to write
    # guidance unset: the family's (SD3 CFG 4.5 as in the paper, FLUX.1-dev's guidance input 3.5)
    assert (sd3.guidance_scale(), flux.guidance_scale()) == (4.5, 3.5)
    assert flux.digest() == load_config(None, ["model.tiny.family=flux", "sampling.guidance_scale=3.5"]).digest()
    assert flux.digest() != load_config(None, ["model.tiny.family=flux", "sampling.guidance_scale=4.5"]).digest()
    assert sd3.digest() == load_config(None, ["sampling.guidance_scale=4.5"]).digest()
    assert load_config(None, ["sampling.guidance_scale=2"]).guidance_scale() == 2.0
    assert family_defaults("flux").noise_level == 0.9 and family_defaults("sd3").shift == 3.0


def test_branch_from_a_pre_family_record_is_not_refused():
    old = json.loads(json.dumps(RunConfig().model_dump(mode="json")))
    old["sampling"].update(shift=3.0, noise_level=0.7)  # how records were written before families
    del old["model"]["tiny"]["family"]
    new = RunConfig()
    assert plan_branch(RunConfig.model_validate(old).canonical_dump(), new.canonical_dump(), "learner", 1).refusal is None
    # a real change is still seen: the family changes everything the model computes
    other = load_config(None, ["model.tiny.family=flux"])
    assert plan_branch(new.canonical_dump(), other.canonical_dump(), "learner", 1).refusal is not None


def test_unsupported_pipeline_is_refused_in_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError) as e:
        detect_family(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "model_index.json") in msg and "StableDiffusionXLPipeline" in msg
    assert "StableDiffusion3Pipeline, FluxPipeline" in msg
    cfg = load_config(None, [f"model.path={tmp_path}"])
    with pytest.raises(ValueError, match="not supported"):
        cfg.family()


def test_a_prompt_longer_than_the_t5_tokens_the_model_reads_is_refused(tiny_flux_dir, tmp_path):
    """FLUX reads a prompt through T5 at model.max_sequence_length (capped by the tokenizer: 16 for
    the tiny model); a longer prompt would be cut, so pre-flight names it, its count and the limit."""
    from tempflow_core.run.preflight import PreflightError, check_prompt_tokens, prompt_token_limit

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n" + "a red circle and a blue square " * 3 + "\n")
    cfg = RunConfig(model={"path": str(tiny_flux_dir)}, prompts={"source": str(prompts)})
    assert prompt_token_limit(cfg) == ("tokenizer_2", 512, "T5")
    with pytest.raises(PreflightError, match=r"record 2 \(000001\) is 2\d T5 tokens, over the 16 the model reads"):
        check_prompt_tokens(cfg, [("prompts.source", str(prompts))])
    short = cfg.model_copy(update={"model": cfg.model.model_copy(update={"max_sequence_length": 3})})
    with pytest.raises(PreflightError, match=r"record 1 \(000000\) is 4 T5 tokens, over the 3 .*raise "
                                             r"model.max_sequence_length \(the tokenizer reads up to 16\)"):
        check_prompt_tokens(short, [("prompts.source", str(prompts))])
    prompts.write_text("a red circle\n")
    check_prompt_tokens(cfg, [("prompts.source", str(prompts))])


def test_a_family_is_one_registration_and_no_code_asks_which_family_it_is():
    """Every family is a FamilySpec whose policy and tiny builder resolve; the config's family
    names are the registry's; and no module outside families.py compares a value with a family's
    name (the one exception: canonical_dump keeps pre-family SD3 digests)."""
    import ast
    import typing

    from tempflow_core.families import FAMILIES, ModelFamily, family_spec
    from tempflow_core.policies.base import FlowPolicy

    names = [s.name for s in FAMILIES]
    assert sorted(typing.get_args(ModelFamily)) == sorted(names)
    for spec in FAMILIES:
        assert issubclass(spec.load("policy"), FlowPolicy) and callable(spec.load("tiny_builder"))
        assert family_spec(spec.name) is spec and spec.rows_per_sample(1.0) == 1
    assert [family_spec(n).rows_per_sample(4.5) for n in ("sd3", "flux")] == [2, 1]
    allowed = {("tempflow_core/config.py", 'data["model"]["tiny"]["family"] == "sd3"')}
    found = []
    for package in ("tempflow_core", "flows", "tasks", "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "families.py":
                continue
            source = path.read_text()
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Compare) and any(
                        isinstance(c, ast.Constant) and c.value in names for c in [node.left, *node.comparators]):
                    where = (str(path.relative_to(ROOT)), ast.get_source_segment(source, node))
                    if where not in allowed:
                        found.append(f"{where[0]}:{node.lineno}: {where[1]}")
    assert found == []
