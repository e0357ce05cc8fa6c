"""The UIs in a real browser: `tempflow ui` on ports of its own, pages read as a person reads them.

Playwright drives the operating system's Chromium (tests/pipeline/browser.py). Each test saves
screenshots of the pages it checked in its own output folder.

Checked: the Prefect UI served on a port other than its default talks to its own API (its
pages load the server's flows, no "Can't connect to Server API"), and the MLflow page that
`tempflow ui` prints opens the tempflow experiment on its training runs (not on the GenAI
overview), with the tracked run listed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows.children import free_port

from .browser import VIEWPORT, browser, needs_browser, snap  # noqa: F401  (fixtures)
from .test_children import _answers

ROOT = Path(__file__).resolve().parents[2]
pytestmark = needs_browser


def _tracked_run(home: Path, env: dict[str, str]) -> tuple[str, str]:
    """(experiment name, run name) of a finished run tracked where `tempflow ui` looks."""
    from tasks.tracking import RunTracker, resolve_tracking_uri

    out = subprocess.run([sys.executable, "-m", "flows.cli", "show-config"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    cfg = json.loads(out.stdout)
    uri = resolve_tracking_uri(cfg["pipeline"]["mlflow_uri"], Path(cfg["output_dir"]))
    name = "tempflow-shapes-seed0"
    RunTracker(uri, cfg["pipeline"]["experiment"], name, {"algorithm": "tempflow", "reward": {"name": "shapes"}}).finish()
    return cfg["pipeline"]["experiment"], name


def test_tempflow_ui_on_its_own_ports_opens_prefect_on_its_api_and_mlflow_on_the_training_runs(browser, tmp_path,
                                                                                              snap):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env.update(TEMPFLOW_HOME=str(home), PREFECT_HOME=str(home / "prefect"))
    experiment, run_name = _tracked_run(home, env)
    prefect_port, mlflow_port = free_port(), free_port()  # not the defaults 4200 / 5000
    cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--prefect-port", str(prefect_port),
                            "--mlflow-port", str(mlflow_port)], cwd=ROOT, env=env, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        printed = ""
        while "MLflow UI: " not in printed:
            line = cli.stdout.readline()
            assert line, f"tempflow ui printed no MLflow page (exit {cli.poll()}): {printed[-500:]}"
            printed += line
        mlflow_page = printed.split("MLflow UI: ", 1)[1].split()[0]
        assert mlflow_page.startswith(f"http://127.0.0.1:{mlflow_port}/#/experiments/")
        deadline = time.monotonic() + 180
        while not (_answers(f"http://127.0.0.1:{prefect_port}/api/health")
                   and _answers(f"http://127.0.0.1:{mlflow_port}/health")):
            assert cli.poll() is None and time.monotonic() < deadline, "the UIs did not come up"
            time.sleep(0.5)

        # a flow on this server: the page shows it only if it asks this server's API
        request = urllib.request.Request(f"http://127.0.0.1:{prefect_port}/api/flows/", method="POST",
                                         data=json.dumps({"name": "tempflow-train"}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).close()
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(f"http://127.0.0.1:{prefect_port}/flows")
        try:
            page.get_by_text("tempflow-train").first.wait_for(timeout=60_000)
        finally:
            snap(page, "prefect-flows")
        body = page.inner_text("body")
        assert "Can't connect" not in body and "4200" not in body, body[:500]

        page.goto(mlflow_page)
        page.get_by_text(run_name).first.wait_for(timeout=60_000)  # the runs table lists the tracked run
        snap(page, "mlflow-experiment")
        assert "/runs" in page.url and "workflowType=machine_learning" in page.url, page.url
        body = page.inner_text("body")
        assert experiment in body and "Token Usage" not in body and "Traces\n0" not in body
        page.close()
    finally:
        cli.send_signal(signal.SIGINT)
        try:
            cli.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
