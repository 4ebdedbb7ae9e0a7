"""Load on the HTTP service: N concurrent clients on loopback against the bundled model, at several --max-batch.

    python -m benchmarks.serve_load [--clients 16] [--requests 12] [--batches 1 4 8] [--size 64]

For each ``--max-batch`` a fresh service (`python -m runtime.serve`, default --max-wait-ms and --max-queue) is started
on a free port; every client sends its requests one after another (each with its own seed), all clients at once.
Every answer must be 200 and the image of the direct ``Pipeline`` call with that seed (within one level per pixel).
Prints throughput (images/s) and p50/p99 latency per setting as a Markdown table, and the JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a small red circle at the top left", "a large blue square at the center",
           "a small green triangle at the bottom right", "a large yellow circle at the top right"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def run_setting(max_batch: int, clients: int, requests: int, size: int, expected: dict[int, np.ndarray]
                ) -> dict[str, Any]:
    """Start a service with ``--max-batch max_batch``, load it, stop it; the measured numbers."""
    from PIL import Image

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--port", str(port), "--max-batch",
                             str(max_batch), "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT, text=True)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if "serving tiny at" in line:
                break
        else:
            raise RuntimeError("the service did not start")
        url = f"http://127.0.0.1:{port}/v1/generate"
        _post(url, {"prompt": PROMPTS[0], "height": size, "width": size, "seed": 0})  # warm-up
        latencies: list[float] = []
        wrong: list[int] = []

        def client(c: int) -> None:
            for k in range(requests):
                seed = c * requests + k
                t = time.perf_counter()
                status, body = _post(url, {"prompt": PROMPTS[seed % len(PROMPTS)], "height": size, "width": size,
                                           "seed": seed})
                latencies.append(time.perf_counter() - t)
                image = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int) if status == 200 \
                    else None
                if image is None or np.abs(image - expected[seed]).max() > 1:
                    wrong.append(seed)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
    n = clients * requests
    return {"max_batch": max_batch, "requests": n, "answered_correctly": n - len(wrong), "seconds": wall,
            "images_per_s": n / wall, "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
            "p99_ms": 1e3 * float(np.percentile(latencies, 99))}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=12, help="per client")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / ".results" / "serve_load.json"))
    a = p.parse_args(argv)
    from runtime import Pipeline

    pipe = Pipeline.from_pretrained("tiny", device="cpu")
    expected = {s: np.asarray(pipe(PROMPTS[s % len(PROMPTS)], height=a.size, width=a.size, seed=s).images[0])
                .astype(int) for s in range(a.clients * a.requests)}
    rows = [run_setting(b, a.clients, a.requests, a.size, expected) for b in a.batches]
    from runtime.files import atomic_write_json

    from .report import render_serve_load
    from .subjects import machine_info, now

    command = "python -m benchmarks.serve_load " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {"machine": machine_info(), "date": now(), "command": command.strip(), "clients": a.clients,
           "size": a.size, "rows": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, doc)
    print("\n".join(render_serve_load(doc)))
    return 0 if all(r["answered_correctly"] == r["requests"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
