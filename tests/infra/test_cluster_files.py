"""The cluster files parse and agree with each other and with the docs page naming them.

Docker and Kubernetes do not run here: these tests read infra/Dockerfile,
infra/docker-compose.yaml, infra/.env.example, infra/k8s/ and infra/cluster_deployments.py, and
check what a `docker compose up`, a `kubectl apply` or a `prefect work-pool create` would first
trip over. No network, no Docker, no Prefect import (a second or so in all).

The docs page docs/cluster.md ("# On a cluster: Docker Compose and Kubernetes") names the
services (its table), images, ports and environment variables; `test_readme_section_*` checks
every one of them against the files. TEMPFLOW_CLUSTER_README=<file> points those tests at a
draft of the page instead. The names are also listed once below (SERVICES, PORTS, ...), so that
the files are held to them whatever the page says.
The Prefect deployments of infra/prefect.yaml themselves are loaded by
tests/pipeline/test_deploy_export.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "Dockerfile"
COMPOSE_FILE = INFRA / "docker-compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
RAYCLUSTER = INFRA / "k8s" / "raycluster.yaml"
WORK_POOL = INFRA / "k8s" / "prefect-work-pool.json"
PREFECT_FILE = INFRA / "prefect.yaml"
SECTION_HEADING = "# On a cluster: Docker Compose and Kubernetes"

# What the README section names; its table lists exactly SERVICES.
SERVICES = {"postgres", "minio", "minio-init", "prefect-server", "mlflow", "prefect-deploy",
            "prefect-worker", "ray-head", "ray-worker"}
ONE_SHOT = {"minio-init", "prefect-deploy"}
GPU_SERVICES = {"ray-worker", "prefect-worker"}
PORTS = {4200, 5000, 8265, 9000, 9001}
IMAGES = {"tempflow:cpu", "tempflow:cuda"}
CREDENTIALS = {"POSTGRES_USER", "POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
CLIENT_SETTINGS = {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS"}
K8S_SECRET_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "TEMPFLOW_STORE",
                   "MLFLOW_TRACKING_URI", "PREFECT_API_URL"}
TORCH_PIN = "torch==2.13.0"

SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|AUTH_STRING|CREDENTIAL)", re.I)
REFERENCE = re.compile(r"^\$\$?\{?[A-Za-z_][A-Za-z0-9_]*")  # ${VAR}, $${VAR}, $VAR
URI_WITH_PASSWORD = re.compile(r"[a-z0-9+.-]+://([^/\s:@\"']+):([^@\s/\"']+)@", re.I)
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\}\}")
ENV_TOKEN = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$")


# --- readers ----------------------------------------------------------------------------------

def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=value: {line!r}"
            out[key.strip()] = value.strip()
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_stages() -> dict[str, dict[str, Any]]:
    """Stage name -> {base, args, instructions}; '' holds the global ARGs before the first FROM."""
    stages: dict[str, dict[str, Any]] = {"": {"base": None, "args": {}, "instructions": []}}
    current = ""
    for word, rest in dockerfile_instructions():
        if word == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            assert m, f"Dockerfile: unparsed FROM {rest!r}"
            current = (m.group(2) or f"stage{len(stages)}").lower()
            stages[current] = {"base": m.group(1), "args": {}, "instructions": []}
        elif word == "ARG":
            name, _, default = rest.partition("=")
            stages[current]["args"][name.strip()] = default.strip().strip('"') if default else None
        stages[current]["instructions"].append((word, rest))
    return stages


def ancestry(stages: dict[str, dict[str, Any]], name: str) -> list[str]:
    chain = [name]
    while stages[chain[-1]]["base"] in stages:
        chain.append(stages[chain[-1]]["base"])
    return chain


def all_instructions(stages, name) -> list[tuple[str, str]]:
    return [ins for stage in reversed(ancestry(stages, name)) for ins in stages[stage]["instructions"]]


def compose_env(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return env


def resolve_default(value: str) -> str:
    """${NAME:-default} -> default (what compose uses when infra/.env leaves NAME unset)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)


def published_ports(service: dict[str, Any]) -> list[tuple[str | None, int, int]]:
    """(host ip, host port, container port) of every published port, short or long syntax."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append((port.get("host_ip"), int(port.get("published", 0)), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            out.append((None, int(parts[0]), int(parts[1])))
        else:
            out.append((None, 0, int(parts[0])))
    return out


def render(template: Any, values: dict[str, Any]) -> Any:
    """Prefect's templating of a base job template, in short: a value that is exactly
    '{{ name }}' becomes the variable's value (any type), or is dropped when the variable has no
    value; placeholders inside longer strings are substituted as text."""
    if isinstance(template, dict):
        out = {}
        for key, value in template.items():
            rendered = render(value, values)
            if rendered is not _DROP:
                out[key] = rendered
        return out
    if isinstance(template, list):
        return [v for v in (render(item, values) for item in template) if v is not _DROP]
    if isinstance(template, str):
        full = PLACEHOLDER.fullmatch(template.strip())
        if full:
            return values.get(full.group(1), _DROP)
        return PLACEHOLDER.sub(lambda m: str(values.get(m.group(1), "")), template)
    return template


_DROP = object()


def readme_section() -> tuple[Path, str] | None:
    path = Path(os.environ.get("TEMPFLOW_CLUSTER_README", ROOT / "docs" / "cluster.md"))
    text = path.read_text() if path.is_file() else ""
    start = text.find(SECTION_HEADING)
    if start < 0:
        return None
    end = text.find("\n## ", start + len(SECTION_HEADING))
    return path, text[start:] if end < 0 else text[start:end]


def section_or_skip() -> tuple[Path, str]:
    found = readme_section()
    if found is None:
        pytest.fail(f"docs/cluster.md has no section {SECTION_HEADING!r}")
    return found


def known_env_names() -> set[str]:
    """Every environment variable or build argument that the cluster files define."""
    names = set(env_example())
    for svc in services().values():
        names |= set(compose_env(svc))
        for arg in ((svc.get("build") or {}).get("args") or {}):
            names.add(arg)
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            names |= set(re.findall(r"([A-Z][A-Z0-9_]*)=", rest))
        elif word == "ARG":
            names.add(rest.partition("=")[0].strip())
    names |= K8S_SECRET_KEYS & set(re.findall(r"[A-Z][A-Z0-9_]+", WORK_POOL.read_text()))
    pool = json.loads(WORK_POOL.read_text())
    names |= set(pool["variables"]["properties"]["env"]["default"])
    for container in raycluster_containers():
        names |= {e["name"] for e in container.get("env") or []}
    return names


def raycluster_containers() -> list[dict[str, Any]]:
    spec = yaml.safe_load(RAYCLUSTER.read_text())["spec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


# --- Dockerfile --------------------------------------------------------------------------------

def test_dockerfile_has_cpu_and_cuda_targets_from_one_code_base():
    stages = dockerfile_stages()
    assert {"cpu", "cuda"} <= set(stages), sorted(stages)
    cpu, cuda = ancestry(stages, "cpu"), ancestry(stages, "cuda")
    shared = [s for s in cpu if s in cuda]
    assert shared, "cpu and cuda share no stage"
    # the code goes in once, in a stage both targets descend from
    code_stage = shared[0]
    assert any(w == "COPY" and re.fullmatch(r"(--chown=\S+\s+)?\.\s+/app/?", r)
               for w, r in stages[code_stage]["instructions"]), f"no `COPY . /app` in {code_stage}"
    assert any(w == "COPY" and "--from=deps" in r for w, r in all_instructions(stages, "cpu"))
    # the CUDA target refuses a CPU-only torch
    assert any(w == "RUN" and "torch.version.cuda" in r for w, r in stages["cuda"]["instructions"])
    # the last stage (a plain `docker build`) is the CPU one
    assert list(stages)[-1] == "cpu"


def test_dockerfile_torch_build_is_a_build_argument_with_the_pin():
    stages = dockerfile_stages()
    glob = stages[""]["args"]
    assert glob.get("TORCH_SPEC") == TORCH_PIN
    assert glob.get("TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    setup_env = (INFRA / "setup_env.sh").read_text()
    assert f"TEMPFLOW_TORCH:-{TORCH_PIN}" in setup_env, "infra/setup_env.sh pins another torch"
    installing = [s for s, st in stages.items()
                  if any(w == "RUN" and '--index-url "${TORCH_INDEX_URL}"' in r and "${TORCH_SPEC}" in r
                         for w, r in st["instructions"])]
    assert installing == ["deps"], installing
    # a global ARG reaches a stage only when the stage declares it again
    assert {"TORCH_SPEC", "TORCH_INDEX_URL"} <= set(stages["deps"]["args"])
    for target in ("cpu", "cuda"):
        assert "deps" in [i.split()[0].split("=")[1] for w, i in all_instructions(stages, target)
                          if w == "COPY" and i.startswith("--from=")]
    # the project's dependencies come after torch, read from pyproject.toml
    deps = [r for w, r in stages["deps"]["instructions"] if w == "RUN"]
    torch_at = next(i for i, r in enumerate(deps) if "${TORCH_INDEX_URL}" in r)
    project_at = next(i for i, r in enumerate(deps) if "pyproject.toml" in r)
    assert torch_at < project_at


def test_dockerfile_installs_the_project_runs_as_non_root_with_the_tempflow_entrypoint():
    stages = dockerfile_stages()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^tempflow\s*=\s*"flows\.cli:app"', pyproject, re.M), "console script `tempflow` is gone"
    for target in ("cpu", "cuda"):
        ins = all_instructions(stages, target)
        assert any(w == "RUN" and re.search(r"pip install .*-e /app", r) for w, r in ins)
        users = [r for w, r in ins if w == "USER"]
        assert users and users[-1] not in ("root", "0"), users
        entry = [r for w, r in ins if w == "ENTRYPOINT"]
        assert entry and json.loads(entry[-1]) == ["tempflow"], entry
        env = " ".join(r for w, r in ins if w == "ENV")
        assert "TEMPFLOW_CHECKOUT=/app" in env  # the pull step of infra/prefect.yaml
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".env", "**/.env", ".venv"} <= set(ignore)


# --- docker compose ------------------------------------------------------------------------------

def test_compose_parses_with_the_named_services_and_images():
    compose = load_compose()
    svcs = compose["services"]
    assert set(svcs) == SERVICES
    built = {}
    for name, svc in svcs.items():
        assert svc.get("image"), f"{name}: no image"
        build = svc.get("build")
        if build:
            assert (COMPOSE_FILE.parent / build["context"]).resolve() == ROOT, name
            assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE, name
            assert build["target"] in ("cpu", "cuda"), name
            image = resolve_default(svc["image"])
            assert image.endswith(":" + build["target"]), (name, image)
            built.setdefault(image, set()).add(repr(sorted((build.get("args") or {}).items())))
            if build["target"] == "cuda":
                index = resolve_default(build["args"]["TORCH_INDEX_URL"])
                assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), index
    assert set(built) == IMAGES
    assert all(len(args) == 1 for args in built.values()), "one tag built with different arguments"
    for name in GPU_SERVICES:
        assert resolve_default(svcs[name]["image"]) == "tempflow:cuda"
    assert resolve_default(svcs["minio"]["image"]).split("/")[-1].startswith("minio:RELEASE.")
    assert resolve_default(svcs["postgres"]["image"]).startswith("postgres:")


def test_compose_ports_are_published_on_loopback_only():
    seen = set()
    for name, svc in services().items():
        for host_ip, host_port, container_port in published_ports(svc):
            assert host_ip == "127.0.0.1", f"{name}: port {container_port} published on {host_ip or 'all interfaces'}"
            assert host_port == container_port
            seen.add(container_port)
        assert not svc.get("network_mode") == "host", name
    assert seen == PORTS


def test_compose_long_running_services_have_health_checks_and_one_shots_complete():
    svcs = services()
    for name, svc in svcs.items():
        if name in ONE_SHOT:
            assert svc.get("restart") == "no", name
            continue
        assert svc.get("restart") in ("unless-stopped", "always"), name
        check = svc.get("healthcheck") or {}
        assert not check.get("disable"), name
        test = check.get("test")
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, (name, test)
        assert check.get("interval") and check.get("timeout") and check.get("retries"), name
    for name, svc in svcs.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in svcs, (name, dep)
            want = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert cond["condition"] == want, (name, dep, cond)
    # the worker starts after the deployments exist; the deployments after the store and server
    assert {"prefect-deploy", "mlflow"} <= set(svcs["prefect-worker"]["depends_on"])
    assert {"prefect-server", "minio-init"} <= set(svcs["prefect-deploy"]["depends_on"])


def test_compose_gpu_services_reserve_an_nvidia_gpu():
    svcs = services()
    for name, svc in svcs.items():
        devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
        if name not in GPU_SERVICES:
            assert not devices, name
            continue
        assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
    assert "--num-gpus=1" in svcs["ray-worker"]["command"]
    assert "--address=ray-head:6379" in svcs["ray-worker"]["command"]
    assert "--head" in svcs["ray-head"]["command"]


def test_compose_state_is_in_named_volumes():
    compose = load_compose()
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes") or []:
            source = volume["source"] if isinstance(volume, dict) else str(volume).split(":")[0]
            assert not source.startswith((".", "/", "~")), f"{name}: bind mount {source}"
            assert source in declared, (name, source)
            used.add(source)
    assert used == declared and {"postgres-data", "minio-data"} <= declared
    svcs = compose["services"]
    assert any(v.startswith("postgres-data:") for v in svcs["postgres"]["volumes"])
    assert any(v.startswith("minio-data:") for v in svcs["minio"]["volumes"])


def test_compose_uses_the_uncommitted_env_file_and_every_variable_is_defined():
    example = env_example()
    assert CREDENTIALS <= set(example)
    svcs = services()
    for name, svc in svcs.items():
        text = yaml.safe_dump(svc)
        uses = set(re.findall(r"\$\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
        if uses & CREDENTIALS or name in {"postgres", "minio"}:
            assert svc.get("env_file") in (".env", [".env"]), f"{name} needs env_file: .env"
        # the container's shell expands these: infra/.env (env_file), the service's environment
        # or the image's environment provide them
        provided = set(compose_env(svc)) | (set(example) if svc.get("env_file") else set())
        assert uses <= provided | {"uri", "bucket"}, (name, sorted(uses - provided))
    # compose interpolates these from infra/.env (--env-file); without a default they must be there
    raw = COMPOSE_FILE.read_text()
    for m in re.finditer(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?][^}]*)?\}", raw):
        assert m.group(2) or m.group(1) in example, f"${{{m.group(1)}}} has no default and is not in .env.example"
    # the client settings the README names are set for the worker
    assert CLIENT_SETTINGS <= set(compose_env(svcs["prefect-worker"]))
    assert svcs["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "--artifacts-destination" in svcs["mlflow"]["command"][0]
    assert "postgresql" in svcs["mlflow"]["command"][0]
    assert compose_env(svcs["prefect-server"])["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    # the .env file itself is git-ignored and not tracked
    gitignore = (ROOT / ".gitignore").read_text().split()
    assert "infra/.env" in gitignore or ".env" in gitignore
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=ROOT)
        assert ignored.returncode == 0, "infra/.env is not git-ignored"
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "infra/.env"], cwd=ROOT,
                                 capture_output=True)
        assert tracked.returncode != 0, "infra/.env is committed"


def test_no_literal_secret_in_committed_cluster_files():
    example = env_example()
    placeholders = {k: v for k, v in example.items() if SECRET_NAME.search(k)}
    assert placeholders and all("change-me" in v for v in placeholders.values()), placeholders
    files = [DOCKERFILE, COMPOSE_FILE, RAYCLUSTER, WORK_POOL, PREFECT_FILE, INFRA / "cluster_deployments.py"]
    for path in files:
        text = path.read_text()
        for value in placeholders.values():
            assert value not in text, f"{path.name} holds the example secret {value!r}"
        for m in URI_WITH_PASSWORD.finditer(text):
            assert REFERENCE.match(m.group(2)), f"{path.name}: a password in a URI: {m.group(0)!r}"
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path.name
    # compose: every secret-named variable is a reference, never a value
    for name, svc in services().items():
        for key, value in compose_env(svc).items():
            if SECRET_NAME.search(key):
                assert REFERENCE.match(str(value)), f"{name}: {key} is written in the file"
    # Kubernetes: secrets only through secretRef / secretKeyRef
    for container in raycluster_containers():
        assert {"secretRef": {"name": "tempflow-env"}} in container["envFrom"]
        for env in container.get("env") or []:
            assert not SECRET_NAME.search(env["name"]) or "valueFrom" in env, env
    pool = json.loads(WORK_POOL.read_text())
    for key in pool["variables"]["properties"]["env"]["default"]:
        assert not SECRET_NAME.search(key), key


# --- Kubernetes ----------------------------------------------------------------------------------

def test_raycluster_is_kuberay_with_gpu_workers_on_the_cuda_image():
    doc = yaml.safe_load(RAYCLUSTER.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    ray_spec = dockerfile_stages()[""]["args"]["RAY_SPEC"]
    assert spec["rayVersion"] == ray_spec.split("==")[1], (spec["rayVersion"], ray_spec)
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in group["template"]["spec"]["containers"]:
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            if int(limits.get("nvidia.com/gpu", 0)) >= 1:
                assert requests.get("nvidia.com/gpu") == limits["nvidia.com/gpu"]
                gpu_groups.append(group["groupName"])
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for c in raycluster_containers():
        assert c["image"].split("/")[-1] == "tempflow:cuda", c["image"]
    pods = [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        sc = pod["spec"]["securityContext"]
        assert sc["runAsNonRoot"] and sc["runAsUser"] == 1000  # the Dockerfile's user


def test_prefect_work_pool_template_renders_a_gpu_job_with_settings_from_a_secret():
    pool = json.loads(WORK_POOL.read_text())
    assert set(pool) == {"job_configuration", "variables"}
    props = pool["variables"]["properties"]
    # Prefect's rule (server.schemas.actions.validate_base_job_template): every placeholder of
    # job_configuration is a declared variable
    used = {m.group(1) for m in PLACEHOLDER.finditer(json.dumps(pool["job_configuration"]))}
    assert used <= set(props), sorted(used - set(props))
    # the keys the Kubernetes worker's job configuration reads
    assert {"command", "env", "labels", "name", "namespace", "job_manifest"} <= set(pool["job_configuration"])
    defaults = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    job = render(pool["job_configuration"], {**defaults, "command": "prefect flow-run execute"})
    manifest = job["job_manifest"]
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    pod = manifest["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsUser"] == 1000
    container = pod["containers"][0]
    assert container["name"] == "prefect-job"
    assert container["image"] == "tempflow:cuda"
    # the image's entrypoint is `tempflow`: the job replaces it so that Prefect's command runs, after
    # joining the RayCluster as a CPU-only node when RAY_ADDRESS is set (pipeline.engine=ray drivers)
    assert container["command"][:2] == ["/bin/sh", "-c"] and container["command"][-1] == "--"
    assert 'ray start --address="$RAY_ADDRESS" --num-gpus=0' in container["command"][2]
    assert container["command"][2].endswith('exec "$@"') and container["args"] == "prefect flow-run execute"
    assert container["envFrom"] == [{"secretRef": {"name": "tempflow-env"}}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
    assert container["env"]["TEMPFLOW_CHECKOUT"] == "/app"
    assert "{{" not in json.dumps(job)
    described = props["secret_name"]["description"]
    assert K8S_SECRET_KEYS <= set(re.findall(r"[A-Z][A-Z0-9_]+", described))


# --- the deployments on the cluster ------------------------------------------------------------

def test_cluster_deployments_put_stage_outputs_on_the_store_and_change_nothing_else(tmp_path):
    sys.path.insert(0, str(INFRA))
    try:
        import cluster_deployments
    finally:
        sys.path.remove(str(INFRA))
    from tempflow_core.config import RunConfig

    spec = yaml.safe_load(PREFECT_FILE.read_text())
    out = tmp_path / "prefect.cluster.yaml"
    assert cluster_deployments.main([str(out), "--store", "s3://tempflow/runs"]) == 0
    assert cluster_deployments.main([str(tmp_path / "x.yaml"), "--store", ""]) == 2
    cluster = yaml.safe_load(out.read_text())
    assert [d["name"] for d in cluster["deployments"]] == [d["name"] for d in spec["deployments"]]
    changed = 0
    for before, after in zip(spec["deployments"], cluster["deployments"]):
        for key in before:
            if key != "parameters":
                assert after[key] == before[key], (before["name"], key)
        for name in ("config", "base"):
            if name in before["parameters"]:
                old = RunConfig.model_validate(before["parameters"][name])
                new = RunConfig.model_validate(after["parameters"][name])
                assert new.pipeline.store == "s3://tempflow/runs"
                assert new.model_dump(exclude={"pipeline": {"store"}}) == old.model_dump(exclude={"pipeline": {"store"}})
                assert new.digest() == old.digest()  # the same runs, elsewhere
                changed += 1
        others = {k: v for k, v in before["parameters"].items() if k not in ("config", "base")}
        assert others.items() <= after["parameters"].items()
    assert changed == len(spec["deployments"])
    assert cluster["pull"] == spec["pull"]
    # Kubernetes: the same deployments on the Kubernetes work pool
    k8s = tmp_path / "prefect.k8s.yaml"
    assert cluster_deployments.main([str(k8s), "--store", "s3://tempflow/runs", "--work-pool", "tempflow-k8s"]) == 0
    moved = yaml.safe_load(k8s.read_text())["deployments"]
    assert [d["work_pool"]["name"] for d in moved] == ["tempflow-k8s"] * len(spec["deployments"])
    assert [d["work_pool"].get("job_variables") for d in moved] == [d["work_pool"].get("job_variables")
                                                                   for d in spec["deployments"]]
    job_env = json.loads(WORK_POOL.read_text())["job_configuration"]["env"]
    assert job_env == "{{ env }}"  # the deployments' job_variables env reaches the job
    # the compose deploy job runs exactly this, and the env file names the store
    command = services()["prefect-deploy"]["command"][0]
    assert "python infra/cluster_deployments.py .tempflow/prefect.cluster.yaml" in command
    assert "prefect --no-prompt deploy --all --prefect-file .tempflow/prefect.cluster.yaml" in command
    for pool_or_limit in ("tempflow-process", "tempflow-gpu"):
        assert pool_or_limit in command and pool_or_limit in PREFECT_FILE.read_text()
    assert env_example()["TEMPFLOW_STORE"].startswith("s3://")


# --- the README section -------------------------------------------------------------------------

def _deployments() -> set[str]:
    """'flow-name/deployment' of every deployment in infra/prefect.yaml (flow names read from
    the entrypoints' @flow decorators, without importing them)."""
    out = set()
    for d in yaml.safe_load(PREFECT_FILE.read_text())["deployments"]:
        path, _, func = d["entrypoint"].partition(":")
        src = (ROOT / path).read_text()
        m = re.search(r'@flow\(name="([^"]+)"[^)]*\)\s*\ndef ' + re.escape(func) + r"\b", src)
        assert m, d["entrypoint"]
        out.add(f"{m.group(1)}/{d['name']}")
    return out


def test_readme_section_names_only_what_the_files_hold():
    path, section = section_or_skip()
    ticked = set(re.findall(r"`([^`\n]+)`", section))
    # services: the table's first column, exactly the compose services
    table = set(re.findall(r"^\|\s*`([a-z][a-z0-9-]*)`\s*\|", section, re.M))
    assert table == set(services()) == SERVICES, (path, table ^ set(services()))
    # environment variables and build arguments
    env_names = {t for t in ticked if ENV_TOKEN.match(t)}
    assert env_names, path
    assert env_names <= known_env_names(), sorted(env_names - known_env_names())
    assert CREDENTIALS | CLIENT_SETTINGS <= env_names
    # images
    images = {t for t in ticked if re.fullmatch(r"[a-z0-9._/-]+:[A-Za-z0-9._-]+", t) and "//" not in t}
    assert images == IMAGES, images
    built = {resolve_default(s["image"]) for s in services().values() if s.get("build")}
    assert images <= built
    # ports
    ports = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", section)}
    assert ports == PORTS == {p for s in services().values() for _, _, p in published_ports(s)}
    # files
    for token in ticked:
        if token.startswith("infra/") and " " not in token and token != "infra/.env":
            assert (ROOT / token).exists(), token


def test_readme_section_commands_start_the_stack_and_a_real_deployment():
    path, section = section_or_skip()
    assert "docker compose --env-file infra/.env -f infra/docker-compose.yaml up -d" in section
    runs = re.findall(r"prefect deployment run (\S+)", section)
    assert runs == ["tempflow-train/nightly"], runs
    deployments = _deployments()
    named = {t for t in re.findall(r"`([^`\s]+)`", section) if re.fullmatch(r"tempflow-[a-z]+/[a-z-]+", t)}
    assert set(runs) | named <= deployments, sorted((set(runs) | named) - deployments)
    # the exec target runs the deployments and the run is against the cluster's server
    assert re.search(r"exec prefect-worker prefect deployment run", section)
    assert compose_env(services()["prefect-worker"])["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    # pipeline.engine=ray: the worker's flow runs are Ray drivers on a node of the compose cluster
    join = "ray start --address=ray-head:6379 --num-gpus=0"
    assert "pipeline.engine=ray" in section and join in section
    assert join in " ".join(services()["prefect-worker"]["command"])
