"""Memory of a `tempflow reward-server` under requests at its limits.

Starts `tempflow reward-server --reward brightness` on 127.0.0.1 with the given --workers and
the default request limits, records its resident memory idle (VmRSS), then sends
--workers requests at once, each as large as the limits let it be, and reads the server's
peak resident memory (VmHWM) after they are answered. Two request kinds:

    typical   512 x 512 noise images stored as PNG, as many as fit the body limit
              (128 MB: 121 images, 95 MB decoded)
    worst     4096 x 4096 blank images (PNG deflates them to ~50 kB each), as many as the
              per-request pixel limit lets through (15: 755 MB decoded)

Prints the idle and peak memory and the peak above idle per concurrent request.

    python -m benchmarks.reward_server_memory [--workers 4] [--kind typical|worst]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from flows.children import stop
from tempflow_core.rewards.protocol import Limits
from tempflow_core.shards.png import encode_png

ROOT = Path(__file__).resolve().parents[1]


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _body(kind: str, limits: Limits) -> tuple[bytes, int]:
    """(request body, decoded bytes of its images) at the limits."""
    if kind == "typical":
        rng = np.random.default_rng(0)
        png = base64.b64encode(encode_png(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8), "image", 0))
        n = min(limits.max_images, (limits.max_body_bytes - 4096) // (len(png) + 8))
        side = 512
    else:
        side = 4096
        png = base64.b64encode(encode_png(np.zeros((side, side, 3), np.uint8), "image", 6))
        n = min(limits.max_images, limits.max_request_pixels // (side * side))
    head = json.dumps({"protocol": 1, "batch_id": "m", "prompts": ["p"] * n, "metadata": [{}] * n, "images": []})
    body = head[:-2].encode() + b'"' + b'","'.join([png] * n) + b'"]}'
    return body, n * side * side * 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--kind", choices=["typical", "worst"], default="typical")
    args = ap.parse_args()
    limits = Limits()
    body, decoded = _body(args.kind, limits)
    cmd = [sys.executable, "-m", "flows.cli", "reward-server", "--reward", "brightness", "--port", "0",
           "--workers", str(args.workers), "--parent-pid", str(os.getpid())]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = ""
        while "serving reward" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise SystemExit(f"the server did not start (exit {proc.returncode})")
        url = line.split(" at ")[1].split()[0]
        time.sleep(1.0)
        idle = _status(proc.pid, "VmRSS")
        codes: list[int] = []

        def send() -> None:
            req = urllib.request.Request(url + "/score", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                codes.append(r.status)

        threads = [threading.Thread(target=send) for _ in range(args.workers)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        peak = _status(proc.pid, "VmHWM")
    finally:
        stop(proc, timeout=10)
        proc.stdout.close()
    mib = 2 ** 20
    print(f"kind {args.kind}: {args.workers} concurrent requests of {len(body) / mib:.1f} MiB each "
          f"({decoded / mib:.0f} MiB of decoded pixels), answered {sorted(codes)} in {seconds:.1f} s")
    print(f"server memory: idle {idle / mib:.0f} MiB, peak {peak / mib:.0f} MiB, "
          f"peak above idle per concurrent request {(peak - idle) / args.workers / mib:.0f} MiB "
          f"({(peak - idle) / args.workers / decoded:.2f} x its decoded pixels)")


if __name__ == "__main__":
    main()
