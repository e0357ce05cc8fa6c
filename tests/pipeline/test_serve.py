"""`tempflow serve`: a local Prefect server + served deployments; a run started from the API
with a changed parameter (what the UI's form does) completes; a Ctrl-C (SIGINT to the
terminal's process group) ends serve and its server within seconds, exit code 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from flows.children import free_port

from .conftest import tiny_overrides, unfiring_cron


def test_serve_shows_the_schedule_and_runs_a_deployment_with_changed_parameters(tiny_model_dir, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    # the runner polls for scheduled runs every second here (Prefect's default: 10 s)
    # a Prefect database of its own (a PREFECT_HOME shared with another served deployment set, as CI's
    # one for the whole session, lets that one's runner take this test's runs)
    env.update(TEMPFLOW_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "home" / "prefect"),
               PREFECT_LOGGING_LEVEL="WARNING", PREFECT_RUNNER_POLL_FREQUENCY="1")
    sets = sum((["--set", o] for o in tiny_overrides(tmp_path, tiny_model_dir, iterations=1)), [])
    cron, _ = unfiring_cron()  # serve's default 02:00 UTC would fire in a CI that crosses it
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--cron", cron] + sets,
                            env=env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            # as in a terminal, even where pytest itself was started with SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        from prefect.client.orchestration import PrefectClient

        async def scenario():
            async with PrefectClient(api) as c:
                deadline = time.time() + 180
                deployments = []
                while time.time() < deadline and len(deployments) < 3:
                    try:
                        deployments = await c.read_deployments()
                    except Exception:  # noqa: BLE001 - server still starting
                        pass
                    await asyncio.sleep(1)
                by_name = {d.name: d for d in deployments}
                assert set(by_name) == {"nightly", "evaluate", "paper-ablation"}
                nightly = by_name["nightly"]
                assert nightly.schedules and nightly.schedules[0].schedule.cron == cron
                assert "config" in nightly.parameter_openapi_schema["properties"]
                params = dict(nightly.parameters)
                params["config"] = {**params["config"], "algorithm": "branch"}  # a changed field of the form
                run = await c.create_flow_run_from_deployment(nightly.id, parameters=params)
                while time.time() < deadline + 300:
                    run = await c.read_flow_run(run.id)
                    if run.state.is_final():
                        break
                    await asyncio.sleep(1)
                return run

        run = asyncio.run(scenario())
        assert run.state.is_completed(), run.state
        assert run.parameters["config"]["algorithm"] == "branch"
        assert re.fullmatch(r"branch-[0-9a-f]{12} · shapes · seed 0", run.name), run.name  # what ran, not a random name
        assert list((tmp_path / "store").glob("branch-*/iter-000000/learner/manifest.json"))
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        try:  # a bound on a hang, not a timing claim: measured 4 s on 2 busy cores
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            raise AssertionError("`tempflow serve` was still running 60 s after a Ctrl-C")
    assert code == 0, f"`tempflow serve` exited {code} after a Ctrl-C"  # 1, after 70 s, when its server died first
    try:
        urllib.request.urlopen(f"{api}/health", timeout=2)
        raise AssertionError("the Prefect server outlived `tempflow serve`")
    except OSError:
        pass
