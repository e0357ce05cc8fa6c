"""infra/prefect.yaml with every deployment's stage outputs on the cluster's object store.

The deployments in infra/prefect.yaml keep stage outputs in a folder of the checkout
(`pipeline.store: .tempflow/store`), which suits one machine. On the cluster
(infra/docker-compose.yaml, Kubernetes) the stages of a run must share one store, so the
one-shot `prefect-deploy` service writes a copy of the file whose runs use `$TEMPFLOW_STORE`
(e.g. s3://tempflow/runs on MinIO; endpoint and credentials come from boto3's chain:
AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and deploys that copy:

    python infra/cluster_deployments.py /tmp/prefect.cluster.yaml
    prefect --no-prompt deploy --all --prefect-file /tmp/prefect.cluster.yaml

On Kubernetes, `--work-pool tempflow-k8s` also moves every deployment to a Kubernetes work
pool (infra/k8s/prefect-work-pool.json); `prefect deploy --all` ignores a `--pool` option.
Nothing else changes: names, schedules, job variables, the run form's other fields.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any

import yaml

PREFECT_FILE = Path(__file__).resolve().parent / "prefect.yaml"
STORE_ENV = "TEMPFLOW_STORE"
RUN_CONFIG_PARAMETERS = ("config", "base")  # the RunConfig parameters of train/eval and ablation


def with_store(spec: dict[str, Any], store: str, work_pool: str | None = None) -> dict[str, Any]:
    """A copy of a prefect.yaml mapping whose deployments' run configs write to `store` (and
    whose deployments go to `work_pool`, when given)."""
    if not store.strip():
        raise ValueError("the store is empty")
    out = copy.deepcopy(spec)
    for deployment in out.get("deployments", []):
        if work_pool:
            deployment.setdefault("work_pool", {})["name"] = work_pool
        params = deployment.get("parameters") or {}
        for name in RUN_CONFIG_PARAMETERS:
            if isinstance(params.get(name), dict):
                params[name].setdefault("pipeline", {})["store"] = store
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="File to write, e.g. /tmp/prefect.cluster.yaml.")
    parser.add_argument("--store", default=os.environ.get(STORE_ENV, ""),
                        help=f"Store URI for stage outputs (default: ${STORE_ENV}).")
    parser.add_argument("--work-pool", default=None, help="Work pool of every deployment (default: as in the file).")
    parser.add_argument("--prefect-file", type=Path, default=PREFECT_FILE)
    args = parser.parse_args(argv)
    if not args.store.strip():
        print(f"error: no store: set ${STORE_ENV} (e.g. s3://tempflow/runs) or pass --store", file=sys.stderr)
        return 2
    spec = yaml.safe_load(args.prefect_file.read_text())
    args.out.write_text(yaml.safe_dump(with_store(spec, args.store, args.work_pool), sort_keys=False))
    pool = f", work pool {args.work_pool}" if args.work_pool else ""
    print(f"{args.out}: {len(spec.get('deployments', []))} deployments with pipeline.store={args.store}{pool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
