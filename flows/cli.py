"""The `tempflow` command line.

    tempflow train                                  # the embedded default through the Prefect flow
    tempflow train --config my.yaml --set train.iterations=50 --set algorithm=flow_grpo_fixed
    tempflow train --resume RUN                     # continue a failed run; finished stages are skipped
    tempflow train --resume RUN --from reward --set reward.name=jpeg_compressibility   # new run from a stage
    tempflow show-config                            # the resolved config, with every default
    tempflow ui                                     # Prefect and MLflow UIs on the local state
    tempflow reward-server --reward ocr --port 8701 # a reward for reward.name=remote
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from flows import children
from flows.cli_errors import fail as _fail
from flows.reward_server_cli import reward_server

from flows.checks import check_not_locked as _check_not_locked, check_run_ids as _check_run_ids, preflight as _preflight
from flows.plan_cli import plan
from flows.sweep_cli import sweep
from flows.report_cli import report
from flows.resolve import ABLATION_CONFIG, CHECKOUT, PAPER_VARIANTS, STATE, resolve as _resolve

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # third-party telemetry off unless turned on


def _local_state() -> None:
    """Point Prefect at the local state (PREFECT_HOME under TEMPFLOW_HOME) and create it. Called
    by each command only once its input passed the pre-flight check, before Prefect is
    imported: a rejected command leaves nothing behind."""
    for name, value in (("PREFECT_HOME", str(STATE / "prefect")), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                        ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")):
        if not os.environ.get(name, "").strip():  # an empty variable counts as unset
            os.environ[name] = value
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)

app = typer.Typer(add_completion=False, no_args_is_help=True, help="TempFlow-GRPO for flow-matching text-to-image models.")


@app.callback()
def _scratch() -> None:
    """Before every command: torch's compile cache (which importing diffusers creates as
    $TMPDIR/torchinductor_<user>) in a scratch folder of this process, removed when it ends."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR", "").strip():
        import atexit
        import shutil
        import tempfile

        scratch = tempfile.mkdtemp(prefix="tempflow-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = scratch
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)



def _interrupted(e: BaseException) -> bool:
    """Whether a KeyboardInterrupt (Ctrl-C) is in `e`'s chain of causes and contexts."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _stored_config(run: str, config: Optional[Path], overrides: list[str]):
    """The config a run was made with (from its run.json), with any new overrides."""
    from tempflow_core.run.layout import RunLayout
    from tempflow_core.run.runs import read_run

    from tempflow_core.run.preflight import PreflightError, check_store_access

    probe = _resolve(config, [o for o in overrides if o.startswith("pipeline.")])
    try:
        check_store_access(probe)  # reading run.json is the first thing that touches the store
    except PreflightError as e:
        _fail(str(e))
    record = read_run(RunLayout.open(probe, run))
    if record is None:
        _fail(f"run {run!r} not found in store {probe.pipeline.store} (set pipeline.store to where it ran)")
    return _resolve(config, overrides, base=record["config"])


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML/JSON run config over the code's defaults (the embedded default applies only without --config)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override: section.field=value (repeatable)."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Name of a new run (default: algorithm-time-hash)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue run RUN; finished stages are not redone."),
    from_stage: Optional[str] = typer.Option(None, "--from", help="With --resume: start a NEW run that reuses RUN up to this stage (rollout, reward, learner, eval)."),
    from_iteration: int = typer.Option(0, "--from-iteration", help="With --from: the iteration of that stage."),
    in_process: bool = typer.Option(False, "--in-process", help="Run the loop without Prefect/MLflow (baseline)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A measured cheaper setting over --config/--set: fast (a third of the rows; it reached default's score on the categories it trains on, on 8 seeds, and was not shown to on 10 more: docs/experiments/cost.md)."),
) -> None:
    """Train with TempFlow-GRPO (or an ablation variant)."""
    if preset and resume:
        _fail("--preset rewrites a new run's config, and --resume continues or branches a run with its own: "
              "drop --preset")
    if from_stage and not resume:
        _fail("--from needs --resume RUN (the run whose stages are reused)")
    if resume and run_id and not from_stage:
        _fail("--run-id names a new run; with --resume RUN alone the run keeps its id (add --from STAGE to branch)")
    if resume and in_process:
        _fail("--in-process runs cannot be resumed; resume runs of the pipeline (without --in-process)")
    _check_run_ids(run_id, resume)
    cfg = _stored_config(resume, config, set_) if resume else _resolve(config, set_)
    if preset:
        cfg = _with_preset(cfg, preset)
    if resume and not from_stage:
        stored = _stored_config(resume, None, [o for o in set_ if o.startswith("pipeline.")])
        if stored.digest() != cfg.digest():
            changed = _diff(stored.model_dump(mode="json"), cfg.model_dump(mode="json"))
            _fail(f"--resume continues run {resume!r} with its own config, but these settings differ: "
                  f"{', '.join(changed)}; start a new run from it instead: --resume {resume} --from STAGE "
                  "[--from-iteration N]")
    _preflight(cfg)
    _check_not_locked(cfg, run_id or (resume if not from_stage else None))
    typer.echo(f"tempflow: {cfg.algorithm}, {cfg.train.iterations} iterations, reward {cfg.reward.name!r}, "
               f"model {cfg.model.path or 'tiny (random init)'}")
    if in_process:
        from tempflow_core.algorithm.train import train_in_process

        out = Path(cfg.output_dir) / (run_id or f"{cfg.algorithm}-{cfg.digest()[:8]}")
        result = train_in_process(cfg, out, progress=sys.stderr.isatty(), on_iteration=_report)
        typer.echo(f"done: metrics {out / 'metrics.jsonl'}, LoRA {result.lora_path}")
        return
    _local_state()
    from flows.train import reward_credentials_to_env, tracking_credentials_to_env, train_flow
    from tempflow_core.algorithm.controller import DegenerateRewardError

    try:  # never into the flow parameters Prefect stores
        cfg = reward_credentials_to_env(tracking_credentials_to_env(cfg))
    except ValueError as e:
        _fail(str(e))
    from tempflow_core.reports import report
    from tempflow_core.run.preflight import PreflightError
    from tempflow_core.rewards import RewardError
    from flows.local_api import local_api
    from tempflow_core.run.runlock import RunLocked
    from tempflow_core.run.runs import RunError

    try:
        with local_api():  # Prefect's temporary server, ended with this process even by kill -9
            if resume and not from_stage:
                result = train_flow(config=cfg, run_id=resume)
            else:
                result = train_flow(config=cfg, run_id=run_id, resume_from=resume, from_stage=from_stage,
                                    from_iteration=from_iteration)
    except RunLocked as e:  # another live process took this run since the check above
        _fail(str(e))
    except RunError as e:  # a run id or branch request the store cannot honour; the core names no flags
        _fail(f"{e}\n  a new run from a stage of run RUN: tempflow train --resume RUN --from STAGE "
              "[--from-iteration N] [--run-id NEW]", 1)
    except PreflightError as e:  # the flow's own check (the CLI's passed: an input changed meanwhile)
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 - the flow logged the traceback; say what failed and how to go on
        from tempflow_core.redaction import redact_text

        if _interrupted(e):  # Prefect can turn a Ctrl-C into another error while it starts a task run
            typer.echo("interrupted: resume it with `tempflow train --resume <run id>` (the run id is in the log "
                       "above)", err=True)
            raise typer.Exit(130) from None
        typer.echo(f"error: the run failed: {type(e).__name__}: {redact_text(str(e))}", err=True)
        if isinstance(e, (DegenerateRewardError, RewardError)):
            typer.echo("resuming repeats this failure: change the reward setup and start a new run (or branch one: "
                       "tempflow train --resume RUN --from reward --set reward....)", err=True)
        else:
            typer.echo("resume it with `tempflow train --resume <run id>` (the run id is in the log above), or retry "
                       "the flow run from the Prefect UI", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"\nrun {result['run_id']} finished")
    typer.echo(f"  final checkpoint : {result['checkpoint']}")
    if result.get("base_eval"):
        typer.echo(f"  base model       : {report.eval_summary(result['base_eval'])} (before training)")
    for it, e in sorted(result["evals"].items()):
        typer.echo(f"  eval (iter {it})   : {report.eval_summary(e)}")
    typer.echo(f"  export the LoRA  : tempflow export-lora {result['run_id']} --out lora-{result['run_id']}")
    import shlex

    prefect_cli, tempflow_cli = (shlex.quote(children.executable(n)) for n in ("prefect", "tempflow"))
    home = shlex.quote(os.environ["PREFECT_HOME"])
    typer.echo(f"  Prefect UI       : PREFECT_HOME={home} {prefect_cli} server start --host 127.0.0.1")
    typer.echo(f"  MLflow UI        : {result['mlflow_ui']}")
    if not result["mlflow_ui"].startswith("python -m webbrowser"):
        typer.echo(f"    then open      : {result['mlflow_page']}")
    typer.echo(f"  (or both at once: {tempflow_cli} ui)")


def _with_preset(cfg, name: str):
    from tempflow_core.presets import apply_preset

    try:
        out = apply_preset(cfg, name)
    except ValueError as e:
        _fail(f"--preset {name}: {' '.join(str(e).split())}")
    before, after = cfg.model_dump(mode="json"), out.model_dump(mode="json")
    changes = [f"{k} {_at(before, k)} -> {_at(after, k)}" for k in _diff(before, after)]
    typer.echo(f"preset {name}: {', '.join(changes) or 'nothing to change'}")
    return out


def _at(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _report(it: int, m: dict) -> None:
    typer.echo(f"iter {it:3d}  reward {m['reward/mean']:.4f} ± {m['reward/std']:.4f}  "
               f"loss {m['train/loss']:+.4f}  kl {m['train/approx_kl']:.2e}  clip {m['train/clip_frac']:.2f}  "
               f"nfe {m['rollout/nfe']}  ({m['time/rollout_s'] + m['time/learner_s']:.1f}s)")


def _run_config(run: str, store: Optional[str]):
    from tempflow_core.config import RunConfig
    from tempflow_core.run.layout import RunLayout
    from tempflow_core.run.runs import read_run

    probe = _resolve(None, [f"pipeline.store={store}"] if store else [])
    lay = RunLayout.open(probe, run)
    record = read_run(lay)
    if record is None:
        _fail(f"run {run!r} not found in store {probe.pipeline.store} (pass --store)")
    cfg = RunConfig.model_validate(record["config"])
    return cfg, RunLayout.open(cfg, run)


@app.command("eval")
def eval_cmd(
    run: Optional[str] = typer.Option(None, "--run", help="Run whose checkpoint to score (default: the base model)."),
    iteration: int = typer.Option(-1, "--iteration", help="Checkpoint iteration (-1: the last finished)."),
    store: Optional[str] = typer.Option(None, "--store", help="Store the run lives in (default: the local one)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c"),
    set_: list[str] = typer.Option([], "--set", "-s", help="Settings; with --run, eval.* only (e.g. "
                                   "eval.guidance_scale=1): the checkpoint is scored under them, the run left as it is."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the scores (JSON, every image's included) here; "
                                       "needed with --run and --set."),
) -> None:
    """Score a checkpoint on the held-out prompts (per-category table for GenEval-style prompts)."""
    overrides: dict = {}
    if run:
        cfg = _run_config(run, store)[0]
        if set_:
            bad = [o.split("=", 1)[0] for o in set_ if not o.split("=", 1)[0].startswith("eval.")]
            if bad:
                _fail(f"--set {bad[0]}: with --run only eval.* settings can change (the checkpoint was trained under "
                      f"the run's settings); drop it, or train a run with it")
            if out is None:
                _fail("--set with --run scores the checkpoint under other settings than the run's: pass --out FILE "
                      "for the scores (the run's own evaluation is left as it is)")
            new = _resolve(None, set_, base=cfg.model_dump(mode="json")).eval.model_dump(mode="json")
            overrides = {k: v for k, v in new.items() if v != cfg.eval.model_dump(mode="json")[k]}
    else:
        cfg = _resolve(config, set_)
    _preflight(cfg)
    _local_state()
    from flows.evaluate import eval_flow

    from flows.local_api import local_api

    with local_api():  # a temporary Prefect server that ends with this process
        result = eval_flow(config=cfg, run_id=run, iteration=iteration, eval_overrides=overrides or None)
    if "geneval" in result:
        from tempflow_core.shapes import format_table

        typer.echo(format_table({run or "base": {"overall": result["geneval_overall"], "per_category": result["geneval"]}}))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        tmp.replace(out)
    typer.echo(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, indent=1))


@app.command("export-lora")
def export_lora_cmd(
    run: str = typer.Argument(..., help="Run id."),
    out: Path = typer.Option(..., "--out", help="Folder to write (diffusers' load_lora_weights reads it)."),
    iteration: int = typer.Option(-1, "--iteration", help="Checkpoint iteration (-1: the last finished)."),
    store: Optional[str] = typer.Option(None, "--store"),
) -> None:
    """Write a checkpoint's LoRA with its sampling recipe and the diffusers lines that load it."""
    from tempflow_core.run.export import export_lora

    cfg, lay = _run_config(run, store)
    if iteration < 0:
        last = lay.last_finished(cfg.train.iterations)
        if last is None:
            _fail(f"run {run!r} has no finished checkpoint", 1)
        iteration = last
    elif not lay.complete(iteration, "learner"):
        _fail(f"run {run!r} has no finished checkpoint at iteration {iteration}", 1)
    folder = export_lora(cfg, lay, iteration, out)
    typer.echo(f"wrote {folder} (iteration {iteration}): pytorch_lora_weights.safetensors, recipe.json, README.md")


@app.command()
def serve(
    port: int = typer.Option(4200, help="Port of the local Prefect server on 127.0.0.1."),
    cron: str = typer.Option("0 2 * * *", help="Schedule of the training deployment."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Default parameters of the deployments."),
    set_: list[str] = typer.Option([], "--set", "-s"),
) -> None:
    """Serve the train and eval deployments from this process against a local Prefect
    server on 127.0.0.1 (started here): open the UI, start runs from the form, retry failures.

    Access: anyone who reaches the API can start runs. Set PREFECT_SERVER_API_AUTH_STRING
    ('user:password') to make the server started here require HTTP basic auth (this process
    then uses the same string as its client's PREFECT_API_AUTH_STRING; other clients set
    PREFECT_API_AUTH_STRING). Runs from the deployments read local files only under
    $TEMPFLOW_READ_ROOTS (default: the checkout, $TEMPFLOW_DATA_DIR or ~/tempflow-data, and
    the files named in serve's own config) and import the reward plugins of
    $TEMPFLOW_REWARD_PLUGINS only."""
    import subprocess
    import time
    import urllib.request

    cfg = _resolve(config, set_)
    _preflight(cfg)
    _local_state()
    _serve_read_roots(cfg)
    if os.environ.get("PREFECT_SERVER_API_AUTH_STRING") and not os.environ.get("PREFECT_API_AUTH_STRING"):
        os.environ["PREFECT_API_AUTH_STRING"] = os.environ["PREFECT_SERVER_API_AUTH_STRING"]  # client of our server
    server = None
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        api = f"http://127.0.0.1:{port}/api"
        if children.port_in_use(port):
            _fail(f"--port {port}: something already listens on 127.0.0.1:{port}; pick another port")
        server = children.prefect_server(port, stdout=subprocess.DEVNULL)
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    children.stop(server)
                    _fail(f"the local Prefect server on {api} did not start", 1)
                time.sleep(0.5)
        os.environ["PREFECT_API_URL"] = api
    from prefect import serve as prefect_serve

    from flows.ablation import ablation_flow
    from flows.evaluate import eval_flow
    from flows.train import train_flow

    params = {"config": cfg.model_dump(mode="json")}
    ablation_base = _resolve(ABLATION_CONFIG, [])  # the shipped ablation's settings (docs: Results)
    typer.echo(f"serving tempflow-train/nightly ({cron}), tempflow-eval/evaluate and tempflow-ablation/paper-ablation; "
               f"UI at {api[:-4]} (Ctrl-C stops)")
    try:
        prefect_serve(
            train_flow.to_deployment(name="nightly", cron=cron, parameters=params, tags=["tempflow"]),
            eval_flow.to_deployment(name="evaluate", parameters=params, tags=["tempflow"]),
            ablation_flow.to_deployment(name="paper-ablation", tags=["tempflow", "ablation"],
                                        parameters={"base": ablation_base.model_dump(mode="json"),
                                                    "out": str(CHECKOUT / "results" / "ablation")}),
        )
    finally:
        if server is not None:
            children.stop(server)


def _serve_read_roots(cfg) -> None:
    """Runs started from the served deployments read local files only under the read roots
    (tempflow_core.run.preflight.read_roots: $TEMPFLOW_READ_ROOTS, else the checkout and a data
    folder); the files the operator named in serve's own config join them."""
    from tempflow_core.run.preflight import READ_ROOTS_ENV, read_roots

    if os.environ.get(READ_ROOTS_ENV):
        return
    named = [cfg.model.path, cfg.prompts.source, cfg.prompts.test_source, cfg.eval.prompts]
    extra = [str(Path(p).resolve()) for p in named if p and not p.startswith("builtin:") and Path(p).exists()]
    os.environ[READ_ROOTS_ENV] = os.pathsep.join([str(r) for r in read_roots()] + extra)


@app.command("pretrain")
def pretrain_cmd(
    out: Path = typer.Option(Path("models/tiny-shapes-sd3"), "--out", help="Model folder to write."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of data, initialisation, batches, t and noise (default 0)."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Wall-clock budget of the whole run (default: none)."),
    images: Optional[int] = typer.Option(None, "--images", help="Rendered scenes (default 50000)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Max transformer steps (default 6000)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Transformer steps between evaluations (default 300)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Keep/reuse the VAE and latents here."),
    threads: int = typer.Option(2, "--threads", help="Torch threads (bit-identical reruns need the same count)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars or phase lines on stderr."),
    set_: list[str] = typer.Option([], "--set", "-s", help="PretrainConfig override, e.g. steps=3000, max_minutes=60."),
) -> None:
    """Pretrain the tiny SD3 base model on rendered shape scenes (a Prefect flow, tracked in MLflow).

    The options are shorthands for --set overrides (seed, max_minutes, images, steps,
    eval_every, cache_dir) and win over them. On shared cores set OMP_WAIT_POLICY=PASSIVE."""
    import torch
    from pydantic import ValidationError

    from tempflow_core.config import ConfigError
    from tempflow_core.pretrain import PretrainConfig

    options = {"seed": seed, "max_minutes": minutes, "images": images, "steps": steps, "eval_every": eval_every,
               "cache_dir": str(cache_dir) if cache_dir is not None else None}
    try:
        cfg = PretrainConfig.with_overrides(set_, **options)
    except ConfigError as e:
        _fail(str(e))
    except ValidationError as e:
        _fail("invalid pretrain config:\n" + "\n".join(f"  {'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))
    _local_state()
    from flows.pretrain import pretrain_flow

    torch.set_num_threads(threads)
    from flows.local_api import local_api

    with local_api():  # a temporary Prefect server that ends with this process
        result = pretrain_flow(config=cfg, out=str(out.resolve()), run_root=str(STATE / "runs"), progress=not quiet)
    typer.echo(json.dumps(result, indent=1))


@app.command()
def ablation(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Base config of every variant."),
    set_: list[str] = typer.Option([], "--set", "-s"),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds."),
    variants: str = typer.Option(PAPER_VARIANTS, help="Comma-separated variants."),
    rewards: str = typer.Option("shapes", help="Comma-separated rewards (one set of figures each)."),
    out: Path = typer.Option(Path("ablation"), "--out", help="Folder for figures, table and curves."),
    name: str = typer.Option("abl", help="Prefix of the run ids (re-running resumes them)."),
    report_only: bool = typer.Option(False, "--report-only", help="Train nothing: redraw figures, table and bundle from finished runs."),
) -> None:
    """Train the paper's five variants under one budget and draw Figures 1, 2, 4, 5 and Table 1."""
    cfg = _resolve(config, set_)
    _local_state()
    from flows.ablation import ablation_flow

    try:
        seed_list = [int(x) for x in seeds.split(",")]
    except ValueError:
        _fail(f"--seeds must be comma-separated integers, not {seeds!r}")
    from flows.local_api import local_api

    try:
        with local_api():  # a temporary Prefect server that ends with this process
            result = ablation_flow(base=cfg, variants=variants.split(","), seeds=seed_list, rewards=rewards.split(","),
                                   out=str(out), name=name, report_only=report_only)
    except ValueError as e:
        _fail(str(e), 1)
    for reward, r in result.items():
        typer.echo(f"{reward}: " + ", ".join(f"{k} {v}" for k, v in r["figures"].items()))


@app.command()
def compare(
    run: str = typer.Argument(..., help="Run id to plot."),
    reference: Path = typer.Option(..., "--reference", help="curves.json of an ablation, e.g. results/ablation/shapes/curves.json."),
    out: Path = typer.Option(Path("compare.png"), "--out"),
    x: str = typer.Option("iteration", "--x", help="'iteration' or 'nfe' (cumulative transformer rows, rollout + learner)."),
    store: Optional[str] = typer.Option(None, "--store"),
) -> None:
    """Plot a run's evaluation curve over the reference curves of an ablation (seed bands), and
    print where it ends against the same variant there."""
    from tempflow_core.reports import figures, report

    if x not in ("iteration", "nfe"):
        _fail(f"--x must be 'iteration' or 'nfe', not {x!r}")
    try:
        ref = json.loads(reference.read_text())
        ref_curves = ref["curves"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        _fail(f"--reference {reference}: not an ablation curves.json ({e})")
    cfg, lay = _run_config(run, store)
    if ref.get("reward", cfg.reward.name) != cfg.reward.name:
        typer.echo(f"warning: run {run!r} trains {cfg.reward.name!r}, the reference {ref['reward']!r}", err=True)
    mine, theirs = report.portable_config(cfg), ref.get("config", {})
    same_eval = all(mine[k] == theirs.get(k) for k in ("model", "sampling", "eval", "prompts", "reward"))
    base = ref.get("base_eval") if same_eval else None  # the run starts where the reference starts
    points = report.run_curve(cfg, lay, base)
    if not any(p["iteration"] > 0 for p in points):
        _fail(f"run {run!r} has no evaluation yet (set eval.every, or run tempflow eval --run {run})", 1)
    figures.score_curves({run: points}, x, out, report.score_label(cfg.reward.name), reference=ref_curves)
    last = points[-1]
    typer.echo(f"{run} ({cfg.algorithm}, seed {cfg.train.seed}): score {last['score']:.3f} at iteration "
               f"{last['iteration']} ({last['nfe']} NFEs)")
    same = [r for r in report.mean_curve(ref_curves.get(cfg.algorithm, [])) if r["iteration"] == last["iteration"]]
    if same:
        r = same[0]
        typer.echo(f"reference {cfg.algorithm} at iteration {last['iteration']}: {r['mean']:.3f} ± {r['std']:.3f} "
                   f"over {r['n']} seeds (min {r['min']:.3f}, max {r['max']:.3f})")
    typer.echo(f"wrote {out}")


@app.command("show-config")
def show_config(
    config: Optional[Path] = typer.Option(None, "--config", "-c"),
    set_: list[str] = typer.Option([], "--set", "-s"),
    defaults: bool = typer.Option(False, "--defaults", help="The code's defaults beside the embedded default's, "
                                  "with why the demo sets each (flows/configs/default.yaml)."),
) -> None:
    """Print the resolved run config as JSON (--defaults: the two sets of defaults side by side)."""
    if defaults:
        from flows.defaults import formatted

        typer.echo(formatted())
        return
    typer.echo(json.dumps(_resolve(config, set_).model_dump(mode="json"), indent=2))


@app.command()
def ui(
    prefect_port: int = typer.Option(4200, help="Prefect UI port on 127.0.0.1."),
    mlflow_port: int = typer.Option(5000, help="MLflow UI port on 127.0.0.1."),
) -> None:
    """Start the Prefect and MLflow UIs on the local state (127.0.0.1) until Ctrl-C."""
    from tasks.tracking import resolve_tracking_uri
    from tasks.tracking.uri import experiment_ui_page

    for flag, port in (("--prefect-port", prefect_port), ("--mlflow-port", mlflow_port)):
        if children.port_in_use(port):
            _fail(f"{flag} {port}: something already listens on 127.0.0.1:{port}; pick another port")
    cfg = _resolve(None, [])
    _local_state()
    bindir = Path(sys.executable).parent
    uri = resolve_tracking_uri(cfg.pipeline.mlflow_uri, Path(cfg.output_dir).resolve())
    # before `mlflow ui` opens (or creates) the database
    mlflow_page = experiment_ui_page(uri, cfg.pipeline.experiment, f"http://127.0.0.1:{mlflow_port}")
    procs = [  # each under a watchdog: a kill -9 of this CLI takes the servers and their workers down too
        children.prefect_server(prefect_port),
        children.spawn([str(bindir / "mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                        "--port", str(mlflow_port)], env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
    ]
    typer.echo(f"Prefect UI: http://127.0.0.1:{prefect_port}   MLflow UI: {mlflow_page}   (Ctrl-C stops both)")
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            children.stop(p)


app.command("reward-server")(reward_server)
app.command("plan")(plan)
app.command("sweep")(sweep)
app.command("report")(report)


if __name__ == "__main__":
    app()
