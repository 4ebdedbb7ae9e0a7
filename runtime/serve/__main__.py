"""``python -m runtime.serve``: the image service on a local Ray instance (see :mod:`runtime.serve.app`).

    python -m runtime.serve --ckpt tiny --host 127.0.0.1 --port 8000 [--replicas 1] [--max-batch 8]
        [--max-wait-ms 5] [--max-queue 64] [--backend torch] [--device cpu] [--dtype fp32]

Prints the URL when the model is loaded and the service answers; Ctrl-C or SIGTERM stops it cleanly (requests in
flight finish first).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Sequence

from ..cli import run_cli
from ..errors import InvalidInputError
from .config import ServeConfig


def build_parser() -> argparse.ArgumentParser:
    d = ServeConfig()
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=d.ckpt, help="checkpoint: alias, hub id or folder [tiny]")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on [127.0.0.1]")
    p.add_argument("--port", type=int, default=8000, help="port [8000]")
    p.add_argument("--backend", default=d.backend, help="torch | onnxruntime | tensorrt | auto [torch]")
    p.add_argument("--device", default=None, help="cpu, cuda ... [cuda if available]")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 [fp16 on cuda, fp32 on cpu]")
    p.add_argument("--replicas", type=int, default=1, help="pipelines (one per GPU on a GPU machine) [1]")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help=f"images per pipeline call [{d.max_batch}]")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help=f"how long a batch waits for more requests [{d.max_wait_ms:g}]")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests a replica holds before answering 503 [{d.max_queue}]")
    p.add_argument("--max-pixels", type=int, default=None, help="per image [the pipeline's limit]")
    p.add_argument("--max-steps", type=int, default=None, help="Euler steps per request [the pipeline's limit]")
    p.add_argument("--treat-as-flow", action="store_true", help="load a diffusion-type checkpoint as a flow")
    return p


def actor_options(config: ServeConfig, replicas: int) -> dict[str, float]:
    """Each replica's share of this machine: a GPU each on a CUDA device, and the CPU cores split evenly (Ray sets
    a worker's thread count to its CPUs: with Ray's default of one, torch would compute on one core)."""
    import torch

    cuda = (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda and replicas > torch.cuda.device_count():
        raise InvalidInputError(f"--replicas {replicas} needs {replicas} GPUs; this machine has "
                                f"{torch.cuda.device_count()}")
    return {"num_cpus": max(1, (os.cpu_count() or 1) // replicas), "num_gpus": 1 if cuda else 0}


def serve_forever(config: ServeConfig, host: str, port: int, replicas: int) -> None:
    """Start Ray (local), the HTTP proxy and the deployment; block until SIGINT/SIGTERM; shut down gracefully."""
    if not 1 <= port <= 65535:
        raise InvalidInputError(f"--port must be in 1..65535, got {port}")
    if replicas < 1:
        raise InvalidInputError(f"--replicas must be >= 1, got {replicas}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from .app import ImageService

    stop = threading.Event()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        app = ImageService.options(num_replicas=replicas, ray_actor_options=actor_options(config, replicas)
                                   ).bind(config.to_dict())
        serve.run(app, name="instaflow", route_prefix="/", blocking=False)
        print(f"serving {config.ckpt} at http://{host}:{port}/v1/generate (Ctrl-C to stop)", flush=True)
        stop.wait()
        print("stopping: requests in flight finish first", flush=True)
        serve.delete("instaflow")  # replicas drain their requests while the HTTP proxy still answers them
        serve.shutdown()
    finally:
        ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    def job() -> None:
        config = ServeConfig(ckpt=a.ckpt, backend=a.backend, device=a.device, dtype=a.dtype, max_batch=a.max_batch,
                             max_wait_ms=a.max_wait_ms, max_queue=a.max_queue, max_pixels=a.max_pixels,
                             max_steps=a.max_steps, treat_as_flow=a.treat_as_flow)
        serve_forever(config, a.host, a.port, a.replicas)

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
