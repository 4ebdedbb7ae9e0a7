"""``python -m runtime.serve``: the image service on a local Ray instance (see :mod:`runtime.serve.app`).

    python -m runtime.serve --ckpt tiny --host 127.0.0.1 --port 8000 [--sizes 512x512,768x512] [--api-key-file F]
        [--ssl-keyfile K --ssl-certfile C] [--max-batch 8] [--max-queue 64] [--request-timeout 60] ...

Prints the URL once the model is loaded, every menu size warmed up and the service answers. SIGTERM or SIGINT (to
this process or to its whole process group: a terminal's Ctrl-C) drains it: new requests get 503, the ones admitted
finish, then it stops within seconds of the last answer; a second signal stops it without waiting.

This process supervises: the service (the Ray driver and Ray's own processes) runs in a child process in a session
of its own, so that a signal sent to this process group reaches only this process, which passes it on once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from ..cli import description
from ..errors import InstaFlowError, InvalidInputError
from .config import API_KEY_ENV, ServeConfig, hash_key, read_api_key
from .gate import DRAIN_FLAG, GATE_ENV, LOOPBACK_HOSTS, PROXY_CALLBACK, PROXY_CALLBACK_ENV, GateConfig

_CHILD_ENV = "INSTAFLOW_SERVE_CHILD"


def build_parser() -> argparse.ArgumentParser:
    d, g = ServeConfig(), GateConfig()
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=description(__doc__))
    a = p.add_argument
    a("--ckpt", default=d.ckpt, help="checkpoint: alias, hub id or folder [tiny]")
    a("--host", default="127.0.0.1", help="address the HTTP proxy listens on [127.0.0.1]")
    a("--port", type=int, default=8000, help="port [8000]")
    a("--backend", default=d.backend, help="auto | torch | aoti | onnxruntime | tensorrt [auto]")
    a("--device", default=None, help="cpu, cuda ... [cuda if available]")
    a("--dtype", default=None, help="fp32, fp16 or bf16 [fp16 on cuda, fp32 on cpu]")
    a("--replicas", type=int, default=1, help="pipelines (one per GPU on a GPU machine) [1]")
    a("--max-batch", type=int, default=d.max_batch, help=f"images per pipeline call [{d.max_batch}]")
    a("--max-wait-ms", type=float, default=d.max_wait_ms,
      help=f"how long a batch waits for more requests [{d.max_wait_ms:g}]")
    a("--max-queue", type=int, default=d.max_queue,
      help=f"requests a replica queues (besides the --max-batch it runs); as many more wait in the proxy, then "
           f"503 [{d.max_queue}]")
    a("--sizes", default=None, help="the size menu, WIDTHxHEIGHT,... [the checkpoint's size, 3:2 and 2:3]")
    a("--allow-other-sizes", action="store_true", help="admit sizes off the menu (run eagerly, never captured)")
    a("--max-cost", type=int, default=None,
      help="pixel-steps per request (pixels x steps, x2 with guidance) [what a replica computes in --cost-seconds]")
    a("--max-batch-cost", type=int, default=None, help="pixel-steps per pipeline call [as --max-cost]")
    a("--cost-seconds", type=float, default=d.cost_seconds,
      help=f"the work one request may ask for, in seconds measured at start-up [{d.cost_seconds:g}]")
    a("--max-pixels", type=int, default=None, help="per image, off the menu [the pipeline's limit]")
    a("--max-steps", type=int, default=None, help="Euler steps per request [the pipeline's limit]")
    a("--max-prompt-chars", type=int, default=d.max_prompt_chars,
      help=f"characters per prompt and negative prompt [{d.max_prompt_chars}]")
    a("--max-guidance", type=float, default=d.max_guidance, help=f"largest guidance_scale [{d.max_guidance:g}]")
    a("--request-timeout", type=float, default=d.request_timeout_s,
      help=f"seconds from arrival to answer; then 408 and the work stops [{d.request_timeout_s:g}]")
    a("--body-timeout", type=float, default=g.body_timeout_s,
      help=f"seconds a client has to send its body; then 408 [{g.body_timeout_s:g}]")
    a("--max-body-bytes", type=int, default=g.max_body_bytes, help=f"request body limit [{g.max_body_bytes}]")
    a("--refusal-rate", type=float, default=g.refusal_rate,
      help=f"refusals a second answered at once per client address; more wait their turn (0: off) "
           f"[{g.refusal_rate:g}]")
    a("--api-key", default=None, help=f"require `Authorization: Bearer KEY` (visible in `ps`: prefer "
                                      f"--api-key-file or ${API_KEY_ENV})")
    a("--api-key-file", default=None, help="file whose first line is the API key")
    a("--ssl-keyfile", default=None, help="TLS private key (with --ssl-certfile: HTTPS)")
    a("--ssl-certfile", default=None, help="TLS certificate chain")
    a("--allowed-hosts", default=None,
      help="Host header names answered, comma-separated [loopback names and --host; any when --host is 0.0.0.0/::]")
    a("--docs", action="store_true", help="serve /docs and /openapi.json (with the API key, if any)")
    a("--treat-as-flow", action="store_true", help="load a diffusion-type checkpoint as a flow")
    return p


def configs(a: argparse.Namespace) -> tuple[ServeConfig, GateConfig]:
    """The replica's and the gate's settings from the command line (one line for any mistake)."""
    if not 1 <= a.port <= 65535:
        raise InvalidInputError(f"--port must be in 1..65535, got {a.port}")
    if a.replicas < 1:
        raise InvalidInputError(f"--replicas must be >= 1, got {a.replicas}")
    config = ServeConfig(ckpt=a.ckpt, backend=a.backend, device=a.device, dtype=a.dtype, max_batch=a.max_batch,
                         max_wait_ms=a.max_wait_ms, max_queue=a.max_queue, sizes=a.sizes,
                         allow_other_sizes=a.allow_other_sizes, max_cost=a.max_cost, max_batch_cost=a.max_batch_cost,
                         cost_seconds=a.cost_seconds, max_pixels=a.max_pixels, max_steps=a.max_steps,
                         max_prompt_chars=a.max_prompt_chars, max_guidance=a.max_guidance,
                         request_timeout_s=a.request_timeout, treat_as_flow=a.treat_as_flow)
    if not a.body_timeout > 0:
        raise InvalidInputError(f"--body-timeout must be > 0, got {a.body_timeout}")
    if not a.refusal_rate >= 0:
        raise InvalidInputError(f"--refusal-rate must be >= 0, got {a.refusal_rate}")
    if a.max_body_bytes < 1024:
        raise InvalidInputError(f"--max-body-bytes must be >= 1024, got {a.max_body_bytes}")
    if bool(a.ssl_keyfile) != bool(a.ssl_certfile):
        raise InvalidInputError("--ssl-keyfile and --ssl-certfile go together")
    for flag, path in (("--ssl-keyfile", a.ssl_keyfile), ("--ssl-certfile", a.ssl_certfile)):
        if path and not Path(path).is_file():
            raise InvalidInputError(f"{flag} {path}: no such file")
    key = read_api_key(a.api_key, a.api_key_file)
    if a.allowed_hosts is not None:
        hosts: list[str] | None = [h for h in a.allowed_hosts.split(",") if h.strip()]
    elif a.host in ("0.0.0.0", "::", ""):
        hosts = None  # any name may reach a wildcard address: say which with --allowed-hosts
    else:
        hosts = [*LOOPBACK_HOSTS, a.host]
    gate = GateConfig(api_key_sha256=hash_key(key) if key else None, allowed_hosts=hosts,
                      max_body_bytes=a.max_body_bytes, body_timeout_s=a.body_timeout,
                      request_timeout_s=config.request_timeout_s, docs=a.docs, refusal_rate=a.refusal_rate)
    return config, gate


def preflight(config: ServeConfig) -> None:
    """What can be checked before Ray starts, from the checkpoint's configs alone (no weights): it resolves, and
    every size of the menu is one it takes (one line otherwise)."""
    from ..checkpoints import check_is_flow, resolve
    from ..models import load_components
    from .config import menu_for

    checkpoint = resolve(config.ckpt)
    check_is_flow(checkpoint, config.treat_as_flow)
    menu_for(config, load_components(checkpoint, weights=False))


def last_line(text: str) -> str:
    """The last non-empty line of a traceback-like text (the error itself)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def exposure_warnings(a: argparse.Namespace, gate: GateConfig) -> list[str]:
    """What an operator binding beyond loopback should know (one line each)."""
    out = []
    if a.host not in LOOPBACK_HOSTS:
        if gate.api_key_sha256 is None:
            out.append(f"warning: --host {a.host} without an API key: anyone who reaches it may generate images "
                       "(--api-key-file)")
        if gate.allowed_hosts is None:
            out.append(f"warning: --host {a.host} without --allowed-hosts: any Host header is answered")
        if not a.ssl_keyfile:
            out.append(f"warning: --host {a.host} without TLS: keys and images travel in clear (--ssl-keyfile/"
                       "--ssl-certfile, or a gateway that terminates TLS)")
    if a.api_key is not None:
        out.append(f"warning: --api-key is visible to every user in `ps`; prefer --api-key-file or ${API_KEY_ENV}")
    return out


def actor_options(config: ServeConfig, replicas: int) -> dict[str, float]:
    """Each replica's share of this machine: a GPU each on a CUDA device, and the CPU cores split evenly (Ray sets
    a worker's thread count to its CPUs: with Ray's default of one, torch would compute on one core)."""
    import torch

    cuda = (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda and replicas > torch.cuda.device_count():
        raise InvalidInputError(f"--replicas {replicas} needs {replicas} GPUs; this machine has "
                                f"{torch.cuda.device_count()}")
    return {"num_cpus": max(1, (os.cpu_count() or 1) // replicas), "num_gpus": 1 if cuda else 0}


class Stop:
    """The signals: the first asks for a drain, a second for an immediate stop."""

    def __init__(self) -> None:
        self.drain = threading.Event()
        self.now = threading.Event()

    def __call__(self, *_: Any) -> None:
        (self.now if self.drain.is_set() else self.drain).set()


def wait_for_gate(state: Path, since: float, stop: Stop, deadline: float) -> bool | None:
    """After the drain flag: wait until the proxy's gate reports no request open (True), or the deadline / a second
    signal (False); None when no gate reports within 3 s (it is not installed)."""
    quiet_since = None
    started = time.monotonic()
    while time.monotonic() < deadline and not stop.now.is_set():
        reports = []
        for f in state.glob("gate-*.json"):
            try:
                reports.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                pass
        fresh = [r for r in reports if r.get("time", 0) >= since]
        if not fresh and time.monotonic() - started > 3:
            return None
        if fresh and all(r.get("open", 1) == 0 for r in fresh):
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 0.2:  # two reports in a row: nothing open, nothing arriving
                return True
        else:
            quiet_since = None
        time.sleep(0.05)
    return False


def serve_forever(config: ServeConfig, gate: GateConfig, host: str, port: int, replicas: int,
                  ssl: tuple[str, str] | None = None) -> None:
    """Start Ray (local), the HTTP proxy with the gate and the deployment; block until SIGINT/SIGTERM; drain: the
    gate answers 503 to new requests, the admitted ones finish, then Serve and Ray stop."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    preflight(config)
    stop = Stop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    state = Path(tempfile.mkdtemp(prefix="instaflow-serve-"))
    gate.state_dir = str(state)
    gate.capacity = config.capacity(replicas)  # Ray Serve's limits
    # the HTTP proxy is one of Ray's processes: it inherits these, and Ray Serve installs the gate from them
    os.environ[PROXY_CALLBACK_ENV] = PROXY_CALLBACK
    os.environ[GATE_ENV] = gate.to_json()
    import ray
    from ray import serve

    from .app import ImageService, deployment_options, gate_dict

    started, wait_s = False, 20.0
    try:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
            signal.signal(sig, stop)
        if stop.drain.is_set():
            return
        http: dict[str, Any] = {"host": host, "port": port, "request_timeout_s": config.request_timeout_s,
                                "keep_alive_timeout_s": 5}
        if ssl:
            http.update(ssl_keyfile=ssl[0], ssl_certfile=ssl[1])
        serve.start(http_options=http)
        started = True
        app = ImageService.options(num_replicas=replicas, ray_actor_options=actor_options(config, replicas),
                                   **deployment_options(config, replicas)).bind(config.to_dict(), gate_dict(gate))
        try:
            serve.run(app, name="instaflow", route_prefix="/", blocking=False)
        except RuntimeError as e:  # the replica could not start: its error, not Ray's page of traceback
            raise InstaFlowError(f"the service did not start: {last_line(str(e))}") from None
        scheme = "https" if ssl else "http"
        if not stop.drain.is_set():
            print(f"serving {config.ckpt} at {scheme}://{host}:{port}/v1/generate (Ctrl-C to stop)", flush=True)
            stop.drain.wait()
        since = time.time()
        (state / DRAIN_FLAG).touch()
        print("stopping: new requests get 503, requests in flight finish first", flush=True)
        drained = wait_for_gate(state, since, stop, time.monotonic() + config.graceful_shutdown_s + gate.body_timeout_s)
        if drained is None:  # no gate in the proxy: Ray Serve's own graceful shutdown drains the replicas
            print("stopping: the HTTP proxy's gate did not report; replicas drain as Ray Serve stops them", flush=True)
            wait_s = config.graceful_shutdown_s + 20
        else:
            print("stopping: every request answered" if drained else "stopping: not waiting any longer", flush=True)
    finally:
        _shutdown(started, wait_s)
        shutil.rmtree(state, ignore_errors=True)


def _shutdown(serve_started: bool, wait_s: float = 20.0) -> None:
    """Serve and Ray down, within seconds: whatever still hangs after ``wait_s`` (a Ray process that died under us)
    is left to exit with this process."""
    import ray

    def down() -> None:
        if serve_started:
            from ray import serve

            try:
                serve.shutdown()
            except Exception as e:  # noqa: BLE001 - Ray already gone: nothing left to stop
                print(f"warning: serve.shutdown: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                      file=sys.stderr)
        ray.shutdown()

    t = threading.Thread(target=down, daemon=True)
    t.start()
    t.join(wait_s)
    if t.is_alive():
        print(f"warning: Ray did not stop within {wait_s:g} s; exiting anyway", file=sys.stderr, flush=True)
        os._exit(0)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """The child dies with the supervisor (Linux: PR_SET_PDEATHSIG), and Ray's processes with the child."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(argv: Sequence[str]) -> int:
    """Run the service in a child process in a session of its own; pass the first SIGINT/SIGTERM on as SIGTERM
    (a drain), a second one too (stop now); return the child's exit status."""
    env = {**os.environ, _CHILD_ENV: "1"}
    child = subprocess.Popen([sys.executable, "-m", "runtime.serve", *argv], env=env, preexec_fn=_die_with_parent)
    forwarded = 0

    def forward(*_: Any) -> None:
        nonlocal forwarded
        if forwarded < 2 and child.poll() is None:
            forwarded += 1
            child.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    while True:
        try:
            return child.wait()
        except InterruptedError:  # pragma: no cover - wait() retries on EINTR itself
            continue


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    try:  # every mistake is one line here, before any process starts (and without importing torch)
        config, gate = configs(a)
    except InstaFlowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get(_CHILD_ENV) != "1":
        for line in exposure_warnings(a, gate):
            print(line, file=sys.stderr)
        return supervise(argv)
    from ..cli import run_cli

    ssl = (a.ssl_keyfile, a.ssl_certfile) if a.ssl_keyfile else None
    return run_cli(lambda: serve_forever(config, gate, a.host, a.port, a.replicas, ssl))


if __name__ == "__main__":
    sys.exit(main())
