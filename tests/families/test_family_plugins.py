"""A model family added by an installed package, without editing tempflow: an entry point of the
group "tempflow.families" naming a FamilySpec. The package is a real distribution on sys.path
(a module and its .dist-info with entry_points.txt), run in a fresh interpreter so that no other
test sees it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN = '''
from tempflow_core.families import FamilyDefaults, FamilySpec
from tempflow_core.policies.sd3 import SD3Policy


class Img2ImgPolicy(SD3Policy):
    family = "sd3-img2img"


def build(cfg, workdir):
    from diffusers import StableDiffusion3Img2ImgPipeline

    from tempflow_core.policies.models import build_tiny_pipeline

    sd3 = build_tiny_pipeline(cfg.model_copy(update={"family": "sd3"}), workdir)
    return StableDiffusion3Img2ImgPipeline(**sd3.components)


SPEC = FamilySpec(
    name="sd3-img2img",
    defaults=FamilyDefaults(guidance_scale=4.5, noise_level=0.8, shift=3.0, text_tokens=256,
                            pipeline_class="StableDiffusion3Img2ImgPipeline"),
    policy="tfplug:Img2ImgPolicy", tiny_builder="tfplug:build", cfg_pair=True, long_tokenizer="tokenizer_3",
    long_required=False, optional_components=("text_encoder_3", "tokenizer_3"), native_side="transformer",
    guidance_note="")
NOT_A_SPEC = {"name": "broken"}
'''


def _site(root: Path, entry_points: str) -> Path:
    site = root / "site"
    (site / "tfplug-0.1.dist-info").mkdir(parents=True)
    (site / "tfplug.py").write_text(PLUGIN)
    (site / "tfplug-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: tfplug\nVersion: 0.1\n")
    (site / "tfplug-0.1.dist-info" / "entry_points.txt").write_text(entry_points)
    return site


def _run(site: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=Path(__file__).resolve().parents[2])


def test_an_installed_package_registers_a_family_that_trains_end_to_end(tmp_path):
    site = _site(tmp_path, "[tempflow.families]\nsd3-img2img = tfplug:SPEC\n")
    out = _run(site, f"""
        from tempflow_core.algorithm.train import train_in_process
        from tempflow_core.config import load_config
        from tempflow_core.families import detect_family, family_spec, plugin_families
        from tempflow_core.policies.models import load_model, save_pipeline

        assert [s.name for s in plugin_families()] == ["sd3-img2img"]
        cfg = load_config(overrides=["model.tiny.family=sd3-img2img", "train.iterations=1", "rollout.prompts_per_iter=2",
                                     "rollout.group_size=3", "lora.rank=4", "lora.alpha=8", "sampling.num_steps=3",
                                     "sampling.eval_num_steps=3", "eval.max_prompts=2", "prompts.source=builtin:colors",
                                     "output_dir={tmp_path / 'runs'}", "pipeline.store={tmp_path / 'store'}"])
        assert cfg.family() == "sd3-img2img" and cfg.rows_per_sample() == 2
        assert cfg.canonical_dump()["sampling"]["noise_level"] == 0.8  # the plugin's default
        folder = save_pipeline(load_model(cfg.model), "{tmp_path / 'model'}")
        assert detect_family(folder) == "sd3-img2img"
        res = train_in_process(cfg, "{tmp_path / 'run'}")
        print("trained", res.lora_path.name)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trained pytorch_lora_weights.safetensors" in out.stdout


def test_a_broken_or_colliding_plugin_is_named_in_one_line(tmp_path):
    for i, (line, message) in enumerate([
            ("broken = tfplug:NOT_A_SPEC", "model family plugin 'broken' (tfplug:NOT_A_SPEC) is a dict, not a "
                                           "tempflow_core.families.FamilySpec"),
            ("missing = tfplug_gone:SPEC", "model family plugin 'missing' (tfplug_gone:SPEC) cannot be loaded "
                                           "(ModuleNotFoundError"),
            ("sd3 = tempflow_core.families:FAMILIES", "is a tuple, not a"),
            ("a = tfplug:SPEC\nb = tfplug:SPEC", "model family plugin 'b' (tfplug:SPEC) registers family 'sd3-img2img' "
                                                 "(StableDiffusion3Img2ImgPipeline), which 'sd3-img2img' "
                                                 "(StableDiffusion3Img2ImgPipeline) already is"),
    ]):
        site = _site(tmp_path / str(i), f"[tempflow.families]\n{line}\n")
        out = _run(site, """
            from tempflow_core.families import family_spec
            assert family_spec("sd3").name == "sd3"  # a built-in family never reads the plugins
            try:
                family_spec("elsewhere")
            except ValueError as e:
                print(e)
        """)
        assert out.returncode == 0, out.stderr[-2000:]
        assert message in out.stdout and len(out.stdout.strip().splitlines()) == 1, out.stdout
