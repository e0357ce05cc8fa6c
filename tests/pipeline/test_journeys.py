"""The three journeys of the people tempflow is for, in a real browser, against `tempflow serve`
and `mlflow ui` on 127.0.0.1 (Playwright and the system's Chromium: tests/pipeline/browser.py):

1. start a custom run of the scheduled `tempflow-train/nightly` deployment from its page with
   changed parameters, watch it complete, and find the changed values in Prefect and MLflow;
2. retry a run that failed in its reward stage from its flow-run page: the finished stages
   return at once (their task runs log it) and the run ends with the checkpoint an
   uninterrupted run makes;
3. browse the training runs in MLflow: child runs per iteration, metric charts, the image
   grids with their step slider, the registered model with its `best` alias and its lineage.

The module serves one deployment set on the tiny model (1 iteration by default); a failpoint
makes the reward stage of the first `tempflow-*` run fail once (runs of other algorithms are not
touched). Each test saves the screenshots of the pages it checked (`snap`); the docs' images are
five of them, regenerated with

    .venv/bin/python -m pytest tests/pipeline/test_journeys.py --screenshots docs/images
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from flows.children import executable, free_port, spawn, stop

from .browser import VIEWPORT, browser, needs_browser, shoot, snap  # noqa: F401  (fixtures)
from .conftest import tiny_overrides, unfiring_cron

pytestmark = [needs_browser]
RUN_TIMEOUT_MS = 400_000  # a bound on a hang (a 2-iteration tiny run takes seconds), not a timing claim
ADAPTER = "adapter/pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class Served:
    url: str  # the Prefect UI (and /api)
    root: Path  # store, runs (MLflow's sqlite) and serve's log
    schedule: str  # the nightly deployment's schedule as the UI says it


def _wait_for(probe, what: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = probe()
        except OSError:
            found = None
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout:.0f} s")


def _filter(api: str, what: str, body: bytes = b"{}", timeout: float = 10) -> list[dict]:
    """POST {api}/{what}/filter: the Prefect server's objects of one kind."""
    request = urllib.request.Request(f"{api}/{what}/filter", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def _deployments(api: str) -> list[str]:
    return [d["name"] for d in _filter(api, "deployments")]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory) -> Iterator[Served]:
    """`tempflow serve` on a free port, as a person starts it, ended with a Ctrl-C."""
    root = tmp_path_factory.mktemp("journeys")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env.update(TEMPFLOW_HOME=str(root / "home"), PREFECT_HOME=str(root / "home" / "prefect"),  # a database of its own
               PREFECT_RUNNER_POLL_FREQUENCY="1",
               TEMPFLOW_FAILPOINTS=f"reward.score/tempflow-*=raise:{root / 'reward-failed-once'}")
    sets = sum((["--set", o] for o in tiny_overrides(root, tiny_model_dir, iterations=1)), [])
    cron, cron_text = unfiring_cron()  # serve's 02:00 UTC would start a run of its own in a CI that crosses it
    with open(root / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--cron", cron] + sets,
                                env=env,
                                cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: proc.poll() is None and len(_deployments(f"{url}/api")) == 3,
                  f"`tempflow serve` served its deployments (log: {root / 'serve.log'})")
        yield Served(url, root, cron_text)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _new_page(browser):
    """A page whose waits allow for a loaded machine: 120 s is a bound on a hang, not a timing
    claim (Playwright's default, 30 s, is short when the suite's other files load both cores)."""
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(120_000)
    return page


def _state(page) -> str:
    badge = page.locator("[class*=state-badge]").first
    return badge.inner_text() if badge.count() else ""


def _wait_state(page, want: str, timeout_ms: int = RUN_TIMEOUT_MS, after: str | None = None) -> None:
    """Wait on the flow run's page until its state badge says `want` (fails at once on another end;
    `after`: the state the page still shows until the run moves on, e.g. Failed before a retry)."""
    deadline = time.monotonic() + timeout_ms / 1000
    while after and after in _state(page) and time.monotonic() < deadline:
        time.sleep(0.5)
    while time.monotonic() < deadline:
        state = _state(page)
        if want in state:
            return
        if state and want not in ("Failed", "Crashed") and any(s in state for s in ("Failed", "Crashed", "Cancelled")):
            raise AssertionError(f"the flow run ended {state}: {page.inner_text('body')[-3000:]}")
        time.sleep(1)
    raise AssertionError(f"the flow run is still {_state(page)!r}, not {want}")


def _open_deployment(page, served: Served) -> None:
    page.goto(f"{served.url}/deployments")
    page.get_by_role("link", name="nightly").first.click()
    page.get_by_text(served.schedule).first.wait_for()  # its schedule (the --cron it was served with)


def _flow_runs(served: Served) -> set[str]:
    """The ids of the server's flow runs that a person started, from its API (the Runs page's
    list loads late on a loaded machine: a page reloaded every few seconds may never show it).
    The runs the scheduler adds for the nightly schedule are left out."""
    runs = _filter(f"{served.url}/api", "flow_runs", b'{"limit": 200}', timeout=30)
    return {run["id"] for run in runs if not run.get("auto_scheduled")}


def _start(page, how: str) -> None:
    """The deployment page's Run menu: "Quick run" or "Custom run"."""
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text(how).first.click()


def _view_started_run(page, served: Served, known: set[str], timeout: float = 120.0) -> str:
    """Open the page of the run just started: the run the server has now and had not before
    (its API is asked: the toast that links to it comes and goes, and a click on it raced the
    page's own move to the deployment's Runs tab on a loaded machine), by its link where the
    page lists it, as a person would click it, else by its address."""
    deadline = time.monotonic() + timeout
    new: set[str] = set()
    while not new and time.monotonic() < deadline:
        new = _flow_runs(served) - known
        time.sleep(1)
    assert len(new) == 1, f"{len(new)} new flow runs on the server, not 1: {page.inner_text('body')[-1500:]}"
    run = new.pop()
    link = page.locator(f"a[href$='/runs/flow-run/{run}']")
    if link.count():
        link.first.click()
    else:
        page.goto(f"{served.url}/runs/flow-run/{run}")
    page.wait_for_url(re.compile(rf".*/runs/flow-run/{run}$"), timeout=60_000)
    return page.url


def _form_field(page, label: str):
    """A property of the deployment's parameter form (Prefect renders the RunConfig schema as
    nested fields, each with its description)."""
    name = page.locator("span.schema-form-property__label", has_text=re.compile(rf"^{re.escape(label)} \(Optional\)$"))
    return name.first.locator("xpath=ancestor::div[contains(concat(' ', normalize-space(@class), ' '), "
                              "' schema-form-property ')][1]")


def _choose(page, field, option: str) -> None:
    """Pick `option` in one of the form's select boxes (opened from the keyboard; picked by a
    pointer press on the option, as a person's click)."""
    from playwright.sync_api import expect

    button = field.locator("button.p-select-button__control")
    button.focus()
    page.keyboard.press("ArrowDown")
    choice = page.get_by_role("option", name=option, exact=True)
    choice.wait_for()
    choice.hover()
    page.mouse.down()
    page.mouse.up()
    expect(button).to_have_text(option)


def _tab(page, name: str) -> None:
    page.locator("li.p-tab", has_text=re.compile(rf"^{name}$")).first.click()


@pytest.fixture(scope="module")
def custom_run(browser, served, request) -> dict[str, str]:
    """Journey 1's clicks: the nightly deployment's page -> Run -> Custom run -> iterations 2 and
    algorithm `branch` in the form -> Submit -> the run's page until Completed (screenshots in
    the module's folder)."""
    docs = request.config.getoption("--screenshots")
    page = _new_page(browser)
    calls: list[str] = []  # what the page asked the API to change, and what the console said
    page.on("response", lambda r: calls.append(f"{r.request.method} {r.url} -> {r.status}")
            if r.request.method != "GET" else None)
    page.on("console", lambda m: calls.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    try:
        known = _flow_runs(served)
        for attempt in range(2):  # a Submit on a loaded machine before the form was ready started nothing once
            _open_deployment(page, served)
            shoot(page, served.root, "prefect-deployment", None)
            _start(page, "Custom run")
            page.get_by_role("button", name="Submit").wait_for()
            time.sleep(2)  # the form fills its fields from the deployment's parameters
            _form_field(page, "Iterations").locator("input").fill("2")
            _choose(page, _form_field(page, "Algorithm"), "branch")
            shoot(page, served.root, "prefect-custom-run", docs)  # a page the docs show
            page.get_by_role("button", name="Submit").click()
            try:
                url = _view_started_run(page, served, known, timeout=60 if attempt == 0 else 120)
                break
            except AssertionError as e:
                shoot(page, served.root, f"no-run-after-submit-{attempt}", None)
                known = _flow_runs(served)  # a run that came late is not taken for the next Submit's
                if attempt:
                    raise AssertionError(f"{e}\nthe page's requests and console:\n" + "\n".join(calls[-60:])) from e
        _wait_state(page, "Completed")
        name = page.get_by_text(re.compile(r"^branch-[0-9a-f]{12} · shapes · seed 0$")).first
        name.wait_for()
        return {"url": url, "name": name.inner_text(), "run_id": name.inner_text().split(" ")[0]}
    finally:
        page.close()


@pytest.fixture(scope="module")
def mlflow_ui(custom_run, served) -> Iterator[str]:
    """`mlflow ui` on the database the served runs track to (started once a run created it)."""
    from tasks.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(None, served.root / "runs")
    port = free_port()
    proc = spawn([executable("mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
                 env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: proc.poll() is None and urllib.request.urlopen(f"{server}/health", timeout=5).status == 200,
                  "the MLflow UI answered")
        yield server
    finally:
        stop(proc)


def _mlflow_page(browser, server: str, path: str):
    """A page of the MLflow UI with its assistant side panel closed (it covers a third of the page)."""
    page = _new_page(browser)
    page.goto(f"{server}/#/{path}")
    return page


def _close_assistant(page) -> None:
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def test_start_a_custom_run_from_the_deployment_page_and_find_its_values(browser, served, custom_run, mlflow_ui,
                                                                        snap):
    from tasks.tracking.values import experiment_page

    page = _new_page(browser)
    page.goto(custom_run["url"])
    page.get_by_text(custom_run["name"]).first.wait_for()  # the run's name says what ran
    assert _state(page) == "Completed"
    snap(page, "prefect-flow-run")
    _tab(page, "Parameters")
    params = page.get_by_text('"iterations": 2').first
    params.wait_for()
    assert '"algorithm": "branch"' in page.inner_text("body")
    _tab(page, "Artifacts")
    page.get_by_text("tempflow-config").first.click()  # the config as a person reads it
    row = page.locator("tr", has=page.get_by_text("train.iterations", exact=True))
    row.first.wait_for()
    assert row.first.inner_text().split() == ["train.iterations", "2", "3"], row.first.inner_text()
    snap(page, "prefect-config-artifact")
    page.close()

    record = json.loads((served.root / "store" / custom_run["run_id"] / "run.json").read_text())
    assert record["config"]["train"]["iterations"] == 2 and record["config"]["algorithm"] == "branch"
    from mlflow import MlflowClient

    from tasks.tracking import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(None, served.root / "runs"))
    experiment = client.get_experiment_by_name("tempflow").experiment_id
    page = _mlflow_page(browser, mlflow_ui, experiment_page("", experiment).split("/#/", 1)[1])
    page.get_by_role("link", name=custom_run["name"]).first.click()  # the runs table lists it by its name
    page.get_by_text("Reproduce").first.wait_for()
    _close_assistant(page)
    body = page.inner_text("body")
    assert "tempflow train --config config.yaml" in body and f"--run-id {record['mlflow_run_id']}" in body
    assert re.search(r"\ntrain\.iterations\s*\n\s*2\s*\n", body) and re.search(r"\nalgorithm\s*\n\s*branch\s*\n", body)
    snap(page, "mlflow-run", doc=True)
    page.close()


def test_retry_a_run_that_failed_in_its_reward_stage_from_its_page(browser, served, custom_run, snap, tmp_path):
    from tempflow_core.config import RunConfig
    from tempflow_core.algorithm.train import train_in_process

    page = _new_page(browser)
    known = _flow_runs(served)
    _open_deployment(page, served)
    _start(page, "Quick run")  # the deployment's parameters: tempflow, 1 iteration
    _view_started_run(page, served, known)
    _wait_state(page, "Failed")
    page.get_by_text("FailpointError").first.wait_for()  # the log says why
    name = page.get_by_text(re.compile(r"^tempflow-[0-9a-f]{12} · shapes · seed 0$")).first.inner_text()
    run_id = name.split(" ")[0]
    snap(page, "prefect-failed-run")
    page.get_by_role("button", name="Retry").click()
    page.get_by_role("dialog").get_by_role("button", name="Retry").click()
    _wait_state(page, "Completed", after="Failed")
    store = served.root / "store" / run_id
    for stage in ("init/learner", "iter-000000/rollout"):  # finished before the failure: returned at once
        page.get_by_text(f"{store.as_uri()}/{stage} finished before: intact and made from the current inputs, "
                         "reused as it is").first.wait_for()
    body = page.inner_text("body")
    assert "iter-000000/reward finished before" not in body  # the failed stage ran again
    snap(page, "prefect-retried-run", doc=True)
    page.close()

    cfg = RunConfig.model_validate(json.loads((store / "run.json").read_text())["config"])
    reference = train_in_process(cfg, tmp_path / "uninterrupted").lora_path.read_bytes()
    assert (store / "iter-000000" / "learner" / ADAPTER).read_bytes() == reference


def test_browse_the_training_runs_in_mlflow(browser, served, custom_run, mlflow_ui, snap):
    from mlflow import MlflowClient
    from playwright.sync_api import expect

    from tasks.tracking import resolve_tracking_uri
    from tasks.tracking.values import experiment_page

    client = MlflowClient(resolve_tracking_uri(None, served.root / "runs"))
    experiment = client.get_experiment_by_name("tempflow").experiment_id
    page = _mlflow_page(browser, mlflow_ui, experiment_page("", experiment).split("/#/", 1)[1])
    parent = page.get_by_role("link", name=custom_run["name"]).first
    parent.wait_for()
    _close_assistant(page)
    assert "/runs" in page.url and "Traces\n0" not in page.inner_text("body")  # the training runs, not GenAI's
    cell = parent.locator("xpath=ancestor::div[@role='gridcell'][1]")
    cell.locator("button").first.click()  # expand the run: a child run per iteration
    for child in ("iter-000000", "iter-000001"):
        page.get_by_role("link", name=child).first.wait_for()
    assert page.get_by_text("rollouts-iter-000001").count()  # each child's rollout dataset
    snap(page, "mlflow-runs", doc=True)

    parent.click()
    _tab_mlflow = page.get_by_role("tab", name="Model metrics")
    _tab_mlflow.click()
    search = page.get_by_placeholder("Search metric charts")
    for key in ("reward/mean", "train/loss", "train/clip_frac", "eval/reward", "eval/reward_se"):
        search.fill(key)
        page.get_by_text(f"({key})").first.wait_for()  # the chart's legend names the metric
    search.fill("reward")
    snap(page, "mlflow-metrics")
    search.fill("grid")
    # the card into view before its image is waited for (once, under load, the image did not attach in 120 s)
    page.get_by_text("group_grid", exact=True).first.scroll_into_view_if_needed()
    card = page.locator("div", has=page.get_by_text("group_grid", exact=True)).filter(has=page.locator("img")).last
    image = card.locator("img").first
    image.wait_for(state="attached")
    assert "group_grid%2Bstep%2B0%2B" in image.get_attribute("src")
    # the card lists the run's 75 params above the image: its menu -> Configure -> "Show run parameters" off
    card.get_by_role("button").last.click()
    page.get_by_role("menuitem", name="Configure").click()
    page.get_by_role("dialog").get_by_role("switch").click()
    page.get_by_role("button", name="Save changes").click()
    expect(image).to_be_in_viewport()
    card.get_by_role("slider").press("ArrowRight")  # the step slider, one step on: the grid of iteration 1
    expect(card.locator("img").first).to_have_attribute("src", re.compile(r"group_grid%2Bstep%2B1%2B"))
    assert page.locator("img[src*='eval_grid']").count() == 1  # the held-out grid of the last iteration
    snap(page, "mlflow-image-grids", doc=True)

    page.goto(f"{mlflow_ui}/#/models/tempflow-lora")
    best = page.get_by_role("row").filter(has_text=re.compile(r"@\s*best")).first  # the alias, on one version
    best.wait_for()
    best.get_by_role("link", name=re.compile(r"^Version \d+$")).click()
    page.get_by_text("trained on rollouts").first.wait_for()  # the version's lineage
    body = page.inner_text("body")
    assert re.search(r"trained on rollouts: file://\S+/iter-\d{6}/rollout", body), body[:2000]
    snap(page, "mlflow-model-version")
    page.get_by_role("link", name=re.compile(r"^iter-\d{6}$")).first.click()  # Source run: the iteration
    page.get_by_text(re.compile(r"^rollouts-iter-\d{6}")).first.wait_for()  # ... trained on that dataset
    page.close()
