"""The pre-flight check of a run: every setting that would fail later, checked before any work.

`preflight(cfg)` reads what a run reads and writes nothing: the model folder (model_index.json
and the component folders it names), every prompt source (each record parsed, each id usable
as a sample key), the reward and the eval reward (registered names, options the factory
takes, model folders that exist, reward servers that answer), the eval prompts, the tracking settings the orchestration
will use, and the object store (a local folder that can be created; an S3 bucket that
answers a HEAD with the credentials of boto3's chain, with short timeouts). The first
problem raises `PreflightError`, whose one-line message names the field (or file, or URI),
what is wrong and the fix.

Runs started through a Prefect deployment may read local files only under `roots`
(`read_roots()`: the checkout and a data folder by default, `TEMPFLOW_READ_ROOTS` names
them), so a run form cannot point a prompt source at any file of the worker's machine.

    from tempflow_core.run.preflight import preflight
    preflight(load_config("my-run.yaml"))         # raises PreflightError naming the field and the fix
"""

from __future__ import annotations

import inspect
import json
import os
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tempflow_core.config import RunConfig
from tempflow_core.families import detect_family, family_spec
from tempflow_core.redaction import redact_uri
from tempflow_core.rewards.registry import RewardError, RewardRegistry

READ_ROOTS_ENV = "TEMPFLOW_READ_ROOTS"  # os.pathsep-separated folders deployment runs may read
PLUGINS_ENV = "TEMPFLOW_REWARD_PLUGINS"  # reward plugins that runs started from a deployment may import
DATA_DIR_ENV = "TEMPFLOW_DATA_DIR"  # the default data folder among them
CHECKOUT = Path(__file__).resolve().parents[1]
S3_PROBE_TIMEOUT_S = 5.0  # connect and read timeout of the bucket probe; one attempt
# Prompt ids start the keys of stored samples (`{id}_k04`): shards.schema.SAMPLE_KEY's rule (a test
# checks they agree), copied so that the check does not import the shard codec (webdataset, torch).
PROMPT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


class PreflightError(ValueError):
    """A setting that cannot work. `str()` is one line: '<field>: <problem>; fix: <fix>'."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field, self.problem, self.fix = field, _one_line(problem), _one_line(fix)
        super().__init__(f"{self.field}: {self.problem}; fix: {self.fix}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_roots() -> list[Path]:
    """Folders that deployment runs may read local files from: $TEMPFLOW_READ_ROOTS, else the
    checkout and $TEMPFLOW_DATA_DIR (default ~/tempflow-data)."""
    raw = os.environ.get(READ_ROOTS_ENV, "").strip()
    if raw:
        return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]
    data = os.environ.get(DATA_DIR_ENV, "").strip() or "~/tempflow-data"
    return [CHECKOUT, Path(data).expanduser().resolve()]


def preflight(cfg: RunConfig, *, roots: Sequence[str | os.PathLike[str]] | None = None,
              check_store: bool = True) -> None:
    """Check everything a run of `cfg` reads before it starts; write nothing.

    Args:
        cfg: the resolved run config.
        roots: when given, local files (model folder, prompt files, reward model folders) must
            lie under one of these folders, and reward plugins be listed in $TEMPFLOW_REWARD_PLUGINS
            (runs started from a deployment).
        check_store: also reach the object store (an S3 HEAD bucket).

    Raises:
        PreflightError: the first problem, naming the field and the fix.
    """
    allowed = [Path(r).expanduser().resolve() for r in roots] if roots is not None else None
    check_credentials(cfg)
    check_model(cfg, allowed)
    check_frames(cfg)
    check_prompts(cfg.prompts.source, "prompts.source", allowed)
    eval_field, eval_source = eval_prompt_source(cfg)
    if eval_source != cfg.prompts.source:
        check_prompts(eval_source, eval_field, allowed)
    check_prompt_tokens(cfg, [("prompts.source", cfg.prompts.source)]
                        + ([(eval_field, eval_source)] if eval_source != cfg.prompts.source else []))
    if roots is not None:  # a run started from a deployment imports only the plugins the operator allows
        allowed_plugins = {m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()}
        for module in cfg.reward.plugins:
            if module not in allowed_plugins:
                raise PreflightError("reward.plugins", f"runs started from a deployment import no reward plugin "
                                     f"{module!r} unless the operator allows it",
                                     f"add it to {PLUGINS_ENV} (comma-separated) where the deployments are served")
    registry = reward_registry(cfg.reward.plugins)
    check_reward(cfg.reward.name, cfg.reward.weights, cfg.reward.options, "reward.name", allowed, registry)
    if cfg.eval.extra_reward:
        check_reward(cfg.eval.extra_reward, {}, cfg.reward.options, "eval.extra_reward", allowed, registry)
    check_tracking(cfg)
    if check_store:
        check_store_access(cfg)


def local_paths(cfg: RunConfig) -> list[tuple[str, str]]:
    """(field, path) of every local file or folder a stage reads: model.path, prompt files, reward
    model folders, a local pipeline.store (builtin: prompt sets, s3:// stores are not paths)."""
    from tempflow_core.prompts import split_source

    found = [("model.path", cfg.model.path)] if cfg.model.path else []
    for field, source in (("prompts.source", cfg.prompts.source), ("prompts.test_source", cfg.prompts.test_source),
                          ("eval.prompts", cfg.eval.prompts)):
        if source and not source.startswith("builtin:"):
            found.append((field, split_source(source)[0]))
    for reward, opts in sorted(cfg.reward.options.items()):
        found += [(f"reward.options.{reward}.{key}", opts[key]) for key in ("model", "processor")
                  if isinstance(opts.get(key), str) and opts[key]]
    if "://" not in cfg.pipeline.store:
        found.append(("pipeline.store", cfg.pipeline.store))
    return found


# -- credentials -------------------------------------------------------------------------------

# Settings whose credentials have a way out of the records: the store's own check refuses them
# (the AWS chain holds them); MLflow's user:password and a reward server's token move to the
# environment before the run (flows/train.py).
_CREDENTIALS_MOVED = re.compile(r"pipeline\.store|pipeline\.mlflow_uri|reward\.options\.[^.]+\.url")


def check_credentials(cfg: RunConfig) -> None:
    """No other setting holds a credential (a secret-named key, a URI with user:password@ or a
    signed query): run.json, MLflow params and the Prefect run's parameters would keep it."""
    from tempflow_core.redaction import credential_paths

    found = credential_paths(cfg.model_dump(mode="json"), skip=lambda p: bool(_CREDENTIALS_MOVED.fullmatch(p)))
    if found:
        raise PreflightError(found[0], "holds a credential, which run.json, MLflow and the Prefect run's parameters "
                             "would keep", "pass it through an environment variable the component reads (S3: the "
                             "AWS chain; pipeline.mlflow_uri and reward.options.<name>.url may carry theirs)")


# -- model -------------------------------------------------------------------------------------


def check_model(cfg: RunConfig, roots: list[Path] | None = None) -> None:
    """model.path: a folder with model_index.json whose named components are folders."""
    if cfg.model.path is None:
        return
    folder = Path(cfg.model.path).expanduser()
    fix = ("set model.path to a saved diffusers pipeline folder of a supported family (or leave it unset "
           "for a random tiny model)")
    _check_under_roots(folder, "model.path", roots)
    if not folder.exists():
        raise PreflightError("model.path", f"folder {str(folder)!r} does not exist", fix)
    if not folder.is_dir():
        raise PreflightError("model.path", f"{str(folder)!r} is a file, not a model folder", fix)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise PreflightError("model.path", f"{str(folder)!r} has no model_index.json (not a saved diffusers pipeline)", fix)
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PreflightError("model.path", f"{str(index_path)!r} is not valid JSON ({e})", fix) from None
    if not isinstance(index, dict):
        raise PreflightError("model.path", f"{str(index_path)!r} does not hold a JSON object", fix)
    try:
        detect_family(folder)
    except ValueError as e:
        raise PreflightError("model.path", str(e), fix) from None
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not (isinstance(spec, list) and len(spec) == 2 and spec[0] is not None):
            continue  # metadata (_class_name) or a component saved as absent (text_encoder_3: [null, null])
        sub = folder / name
        if not sub.is_dir() or not any(sub.iterdir()):
            raise PreflightError("model.path", f"component {name!r} ({spec[1]}) named by {str(index_path)!r} is "
                                 f"missing: no files in {str(sub)!r}", "copy the whole pipeline folder "
                                 "(save_pretrained writes one subfolder per component)")
        for conf in (sub / "config.json", sub / "scheduler_config.json"):
            if conf.is_file():
                _check_declared_sizes(conf)
    if cfg.model.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise PreflightError("model.device", f"{cfg.model.device!r} asked for, but no CUDA device is visible",
                                 "set model.device=auto (the GPU when present, else the CPU) or model.device=cpu")


def check_frames(cfg: RunConfig) -> None:
    """model.num_frames: a clip's frames, for a video family only, a count its VAE takes (1 + s k,
    s the VAE's temporal scale: 4 for Wan2.1, the tiny model's 2**(len(vae_channels) - 1))."""
    n = cfg.model.num_frames
    if n is None:
        return
    spec = family_spec(cfg.family())
    if not spec.video:
        raise PreflightError("model.num_frames", f"{n} frames, but {spec.pipeline_class} makes images, not clips",
                             "leave model.num_frames unset")
    if cfg.model.path:
        vae = json.loads((Path(cfg.model.path).expanduser() / "vae" / "config.json").read_text(encoding="utf-8"))
        step = int(vae.get("scale_factor_temporal", 4))
    else:
        step = 2 ** (len(cfg.model.tiny.vae_channels) - 1)
    if (n - 1) % step:
        raise PreflightError("model.num_frames", f"{n} frames: this VAE takes 1 + {step}k frames",
                             f"use {1 + (n - 1) // step * step} or {1 + ((n - 1) // step + 1) * step}")


# A component's declared sizes, bounded before any module is built from them (even on the meta
# device, a billion declared layers is a billion Python objects): counts of layers or blocks at
# most MAX_DECLARED_LAYERS, every other integer and list length at most MAX_DECLARED_SIZE.
MAX_DECLARED_LAYERS = 1024
MAX_DECLARED_SIZE = 1 << 20
MAX_CONFIG_BYTES = 1 << 20
_LAYER_KEY = re.compile(r"(layers|blocks)(_per_block)?$|^num_.*(layers|blocks)")


def _check_declared_sizes(conf: Path) -> None:
    fix = "check the file: it must be the config.json that was saved with the model's weights"
    if conf.stat().st_size > MAX_CONFIG_BYTES:
        raise PreflightError("model.path", f"{str(conf)!r} is {conf.stat().st_size} bytes (a config is at most "
                             f"{MAX_CONFIG_BYTES})", fix)
    try:
        data = json.loads(conf.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise PreflightError("model.path", f"{str(conf)!r} is not valid JSON ({type(e).__name__})", fix) from None

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, list):
            if len(value) > MAX_DECLARED_SIZE:
                raise PreflightError("model.path", f"{str(conf)!r}: {key} lists {len(value)} values", fix)
            for v in value:
                walk(v, key)
        elif isinstance(value, int) and not isinstance(value, bool):
            bound = MAX_DECLARED_LAYERS if _LAYER_KEY.search(key) else MAX_DECLARED_SIZE
            if abs(value) > bound:
                raise PreflightError("model.path", f"{str(conf)!r} declares {key} = {value} (at most {bound} is "
                                     "read: no released model comes near)", fix)

    walk(data, "")


# -- prompts -----------------------------------------------------------------------------------


def eval_prompt_source(cfg: RunConfig) -> tuple[str, str]:
    """(field, source) of the held-out prompts: eval.prompts, else prompts.test_source, else
    prompts.source (the order evaluation uses)."""
    if cfg.eval.prompts:
        return "eval.prompts", cfg.eval.prompts
    if cfg.prompts.test_source:
        return "prompts.test_source", cfg.prompts.test_source
    return "prompts.source", cfg.prompts.source


def check_prompts(source: str, field: str, roots: list[Path] | None = None) -> int:
    """Every record of a prompt source parses, has a non-empty text and an id that is a valid,
    unique sample key. Returns the number of prompts."""
    from tempflow_core.prompts import load_prompts, split_source

    fix = (f"set {field} to builtin:<name>, a .txt file (one prompt a line) or a .jsonl file of objects "
           "with a 'prompt' string and an optional 'id' of letters, digits, '_' and '-'; "
           "a source may end in ?tags=CATEGORY,... to keep only those categories")
    if not source.startswith("builtin:"):
        _check_under_roots(Path(split_source(source)[0]).expanduser(), field, roots)
    try:
        records = load_prompts(source)
    except FileNotFoundError as e:
        raise PreflightError(field, str(e), fix) from None
    except UnicodeDecodeError:
        raise PreflightError(field, f"prompt file {source!r} is not UTF-8 text", fix) from None
    except (ValueError, TypeError, OSError) as e:
        raise PreflightError(field, str(e), fix) from None
    if not records:
        raise PreflightError(field, f"prompt source {source!r} holds no prompts", fix)
    seen: dict[str, int] = {}
    for n, r in enumerate(records):
        where = f"{source} record {n + 1}"
        if not isinstance(r.text, str) or not r.text.strip():
            raise PreflightError(field, f"{where}: the prompt is not a non-empty string ({r.text!r})", fix)
        if not PROMPT_ID.match(r.id):
            raise PreflightError(field, f"{where}: id {r.id!r} cannot name stored samples "
                                 "(letters, digits, '_' and '-', starting with a letter or digit)", fix)
        if r.id in seen:
            raise PreflightError(field, f"{where}: id {r.id!r} repeats record {seen[r.id] + 1}", "give every record "
                                 "a unique 'id' (or none: records without one are numbered)")
        seen[r.id] = n
    return len(records)


def prompt_token_limit(cfg: RunConfig) -> tuple[str, int, str] | None:
    """(tokenizer subfolder, tokens, what) of the text encoder that reads the most of a prompt:
    SD3 with T5 and FLUX: T5 at model.max_sequence_length (the family's default when unset,
    FLUX capped by the tokenizer); Qwen-Image: Qwen2.5-VL's tokens after the template, likewise;
    SD3 without T5: CLIP's context. None without a model folder."""
    if cfg.model.path is None:
        return None
    folder = Path(cfg.model.path).expanduser()
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    spec = family_spec(detect_family(folder))
    long = spec.long_tokenizer
    if long and isinstance(index.get(long), list) and index[long][0] is not None:
        return long, cfg.model.max_sequence_length or spec.defaults.text_tokens, spec.encoder_label
    return "tokenizer", 0, "CLIP"  # 0: the tokenizer's own model_max_length


def check_prompt_tokens(cfg: RunConfig, sources: list[tuple[str, str]]) -> None:
    """Every prompt fits the tokens the model reads of it (a longer one is cut: the model would
    never see its end). Tokenized with the model folder's own tokenizer."""
    limit = prompt_token_limit(cfg)
    if limit is None:
        return
    import transformers

    from tempflow_core.prompts import load_prompts

    sub, tokens, what = limit
    folder = Path(cfg.model.path).expanduser()
    spec = family_spec(detect_family(folder))
    template = spec.prompt_template or "{}"  # the text the pipeline encodes; its first template_tokens are dropped
    cls = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))[sub][1]
    try:
        tokenizer = getattr(transformers, cls).from_pretrained(str(folder / sub))
    except Exception as e:  # noqa: BLE001 - a missing vocabulary, a bad class name: the run could not encode
        raise PreflightError("model.path", f"the {what} tokenizer in {str(folder / sub)!r} ({cls}) cannot be "
                             f"loaded ({type(e).__name__})", "copy the whole pipeline folder") from None
    model_max = int(tokenizer.model_max_length)
    tokens = min(tokens, model_max) if tokens else model_max
    for field, source in sources:
        records = load_prompts(source)
        for start in range(0, len(records), 1024):
            batch = records[start:start + 1024]
            ids = tokenizer([template.format(r.text) for r in batch], add_special_tokens=True, verbose=False)["input_ids"]
            for n, (r, row) in enumerate(zip(batch, ids)):
                count = len(row) - spec.template_tokens
                if count > tokens:
                    more = (f"raise model.max_sequence_length (the tokenizer reads up to {model_max})"
                            if what != "CLIP" and tokens < model_max else "")
                    raise PreflightError(field, f"{source} record {start + n + 1} ({r.id}) is {count} {what} tokens, "
                                         f"over the {tokens} the model reads (its end would be cut)",
                                         "shorten the prompt" + (f", or {more}" if more else ""))


# -- rewards -----------------------------------------------------------------------------------


def reward_registry(plugins: list[str]) -> RewardRegistry:
    """The run's reward registry (the built-in rewards and reward.plugins), or a PreflightError
    naming the plugin that cannot be loaded."""
    try:
        return RewardRegistry.with_plugins(plugins)
    except RewardError as e:
        raise PreflightError("reward.plugins", e.problem,
                             "put the module on the Python path (it defines REWARDS = {name: factory}) or remove it") from None


def _choices(factory: Any, key: str) -> tuple[Any, ...]:
    """The values a factory's Literal-typed option takes (empty: any)."""
    try:
        hint = typing.get_type_hints(factory).get(key)
    except Exception:  # an annotation that does not resolve: no choices known
        return ()
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()


def check_reward(name: str, weights: dict[str, float], options: dict[str, dict[str, Any]], field: str,
                 roots: list[Path] | None = None, rewards: RewardRegistry | None = None) -> None:
    """A registered reward (or 'weighted' over registered ones) whose options its factory takes,
    and whose optional dependencies are installed."""
    rewards = rewards or RewardRegistry.builtin()
    known = rewards.names()
    names = ", ".join(known + ["weighted"])
    if name == "weighted":
        if not weights:
            raise PreflightError("reward.weights", "reward 'weighted' has no weights",
                                 "set reward.weights, e.g. {shapes: 1.0, jpeg_compressibility: 0.1}")
        used = list(weights)
        for part in used:
            if not rewards.is_known(part):
                raise PreflightError(f"reward.weights.{part}", f"no reward named {part!r}", f"use one of: {', '.join(known)}")
    elif not rewards.is_known(name):
        raise PreflightError(field, f"no reward named {name!r}", f"use one of: {names}")
    else:
        used = [name]
    for opt_name in options:
        if not rewards.is_known(opt_name):
            raise PreflightError(f"reward.options.{opt_name}", f"no reward named {opt_name!r}",
                                 f"key reward.options by a reward name: {', '.join(known)}")
    for reward in used:
        try:
            factory = rewards.factory(reward)
        except RewardError as e:
            raise PreflightError(field if reward == name else f"reward.weights.{reward}", e.problem, e.fix or "") from None
        opts = options.get(reward, {})
        params = inspect.signature(factory).parameters
        for key in opts:
            if key not in params:
                takes = ", ".join(params) or "none"
                raise PreflightError(f"reward.options.{reward}.{key}", f"reward {reward!r} takes no option {key!r}",
                                     f"remove it (options of {reward!r}: {takes})")
            choices = _choices(factory, key)
            if choices and opts[key] not in choices:
                raise PreflightError(f"reward.options.{reward}.{key}", f"{opts[key]!r} is not a value of option {key!r} "
                                     f"of reward {reward!r}", f"use one of: {', '.join(map(str, choices))}")
        if "model" in params and params["model"].default is None and not opts.get("model"):
            raise PreflightError(f"reward.options.{reward}.model", f"reward {reward!r} needs a local model folder",
                                 f"set reward.options={{{reward}: {{model: /path/to/folder}}}}")
        for key in ("model", "processor"):
            value = opts.get(key)
            if key in params and isinstance(value, str) and value:
                path = Path(value).expanduser()
                _check_under_roots(path, f"reward.options.{reward}.{key}", roots)
                if not path.is_dir():
                    raise PreflightError(f"reward.options.{reward}.{key}", f"folder {value!r} does not exist",
                                         "point it at a local model folder (models are never downloaded)")
        if factory is rewards.factory("remote"):
            _check_reward_server(reward, opts)


def _check_reward_server(reward: str, opts: dict[str, Any]) -> None:
    """A remote reward's url is set and its server answers GET /health (reward.options.<name>.url)."""
    from tempflow_core.rewards.remote import RemoteRewardError, RemoteRewardUnavailable, remote

    field = f"reward.options.{reward}.url"
    if not opts.get("url"):
        raise PreflightError(field, f"reward {reward!r} needs the reward server's address",
                             f"set {field}=http://HOST:PORT (start a server: tempflow reward-server --reward NAME)")
    try:
        remote(**opts)
    except (RemoteRewardUnavailable, RemoteRewardError, ValueError) as e:
        raise PreflightError(field, str(e), "start the server or correct the url") from None


# -- tracking settings (read by the orchestration; checked here so a run fails before work) -----

_MODEL_NAME_BAD = ("/", ":", "@", "\\")


def check_tracking(cfg: RunConfig) -> None:
    """pipeline.registered_model and experiment are names MLflow accepts; pipeline.mlflow_uri is
    not a file store (MLflow 3.17 serves none)."""
    p = cfg.pipeline
    name = p.registered_model
    if not name.strip() or any(c in name for c in _MODEL_NAME_BAD) or ".." in name.split("/") or name.strip() != name:
        raise PreflightError("pipeline.registered_model", f"{name!r} is not a valid registered model name",
                             "use a name without '/', ':', '@', '\\' or surrounding spaces, e.g. tempflow-lora")
    if not p.experiment.strip():
        raise PreflightError("pipeline.experiment", "the experiment name is empty", "set a name, e.g. tempflow")
    if p.mlflow_uri:
        scheme = urlsplit(p.mlflow_uri).scheme.lower()
        if scheme in ("", "file"):
            raise PreflightError("pipeline.mlflow_uri", f"{redact_uri(p.mlflow_uri)!r} is an MLflow file store, "
                                 "which MLflow 3.17 no longer serves",
                                 "use sqlite:///<abs path>/mlflow.db or http://host:port (or leave it unset)")
        if "***@" in urlsplit(p.mlflow_uri).netloc:
            raise PreflightError("pipeline.mlflow_uri", f"{p.mlflow_uri!r} holds masked credentials (a stored "
                                 "config never keeps them)", "pass the tracking URI again (--set pipeline.mlflow_uri=...) "
                                 "or set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
        if scheme not in ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks"):
            raise PreflightError("pipeline.mlflow_uri", f"unsupported tracking URI scheme {scheme!r}",
                                 "use http(s)://host:port or sqlite:///<abs path>/mlflow.db")


# -- store -------------------------------------------------------------------------------------


def check_store_access(cfg: RunConfig) -> None:
    """pipeline.store opens; a local folder can be created; an S3 bucket answers a HEAD."""
    from tempflow_core.run.ownership import STORE_ROOT_FIX, store_root_problem
    from tempflow_core.storage import LocalStore, StoreError, open_store
    from tempflow_core.storage.s3 import S3Store

    try:  # as layout.open_run_store opens it (that module imports the shard codec)
        opts = {"endpoint_url": cfg.pipeline.s3_endpoint_url} if cfg.pipeline.s3_endpoint_url else {}
        store = open_store(cfg.pipeline.store, **opts)
    except (StoreError, ValueError, TypeError) as e:
        raise PreflightError("pipeline.store", str(e), "use a local folder, file:///abs/path or s3://bucket/prefix "
                             "(credentials through the AWS chain, never in the URI)") from None
    if isinstance(store, LocalStore):
        _check_local_folder(store.root)
    elif isinstance(store, S3Store):
        _check_s3(store, cfg)
    try:
        problem = store_root_problem(store, cfg.pipeline.shared_store)
    except StoreError as e:
        raise PreflightError("pipeline.store", f"cannot list {store.uri} ({e})", "check the store's permissions") from None
    if problem:
        raise PreflightError("pipeline.store", problem, STORE_ROOT_FIX)


def _check_local_folder(root: Path) -> None:
    fix = "set pipeline.store to a folder this process may create and write"
    if root.exists() and not root.is_dir():
        raise PreflightError("pipeline.store", f"{str(root)!r} is a file, not a folder", fix)
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError("pipeline.store", f"{str(existing)!r} (on the way to {str(root)!r}) is a file", fix)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError("pipeline.store", f"folder {str(existing)!r} is not writable", fix)


def _check_s3(store: Any, cfg: RunConfig) -> None:
    import dataclasses

    import boto3
    import botocore.exceptions as bex
    from botocore.config import Config

    from tempflow_core.storage.retry import client_error_code

    s = store.settings
    uri = redact_uri(cfg.pipeline.store)
    session = boto3.session.Session(region_name=s.region_name, profile_name=s.profile_name)
    if session.get_credentials() is None:
        raise PreflightError("pipeline.store", f"no AWS credentials for {uri}",
                             "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role "
                             "(the standard boto3 chain)")
    probe = dataclasses.replace(s, connect_timeout=S3_PROBE_TIMEOUT_S, read_timeout=S3_PROBE_TIMEOUT_S)
    client = session.client("s3", endpoint_url=probe.endpoint_url, config=Config(
        retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=probe.connect_timeout,
        read_timeout=probe.read_timeout, s3={"addressing_style": s.addressing_style} if s.addressing_style else None))
    endpoint = redact_uri(s.endpoint_url) if s.endpoint_url else "the AWS endpoint"
    try:
        client.head_bucket(Bucket=store.bucket)
    except bex.ClientError as e:
        code, status = client_error_code(e)
        if status == 404 or code in ("NoSuchBucket", "404", "NotFound"):
            raise PreflightError("pipeline.store", f"bucket {store.bucket!r} does not exist at {endpoint}",
                                 "create the bucket or name an existing one") from None
        if status in (401, 403) or code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise PreflightError("pipeline.store", f"access to bucket {store.bucket!r} denied ({code or status})",
                                 "check the AWS credentials and the bucket policy") from None
        raise PreflightError("pipeline.store", f"bucket {store.bucket!r} at {endpoint}: {code or status}",
                             "check pipeline.store and pipeline.s3_endpoint_url") from None
    except (bex.NoCredentialsError, bex.PartialCredentialsError) as e:
        raise PreflightError("pipeline.store", f"no usable AWS credentials for {uri} ({type(e).__name__})",
                             "set them through the standard boto3 chain (env, profile, instance role)") from None
    except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError, bex.ConnectionError) as e:
        raise PreflightError("pipeline.s3_endpoint_url" if s.endpoint_url else "pipeline.store",
                             f"cannot reach {endpoint} ({type(e).__name__})",
                             "start the S3 server or fix pipeline.s3_endpoint_url") from None


# -- local file roots --------------------------------------------------------------------------


def _check_under_roots(path: Path, field: str, roots: list[Path] | None) -> None:
    if roots is None:
        return
    real = Path(os.path.realpath(path))
    if not any(real == r or r in real.parents for r in roots):
        raise PreflightError(field, f"{str(path)!r} lies outside the folders deployment runs may read "
                             f"({', '.join(str(r) for r in roots)})",
                             f"move the file under one of them, or name its folder in ${READ_ROOTS_ENV} on the worker")
