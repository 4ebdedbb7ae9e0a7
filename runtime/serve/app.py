"""The image service: a Ray Serve deployment with a FastAPI ingress around one :class:`runtime.Pipeline` per replica.

API
- ``POST /v1/generate`` (``Content-Type: application/json``; ``Authorization: Bearer KEY`` when the service has a
  key) ``{"prompt": str, "negative_prompt"?: str, "num_inference_steps"?: int, "guidance_scale"?: float,
  "height"?: int, "width"?: int, "seed"?: int, "response_format"?: "png" | "b64_json"}``: ``image/png`` (the seed in
  the ``X-Seed`` header), or ``{"images": [base64 PNG], "seed": int, "timings": {...}}``.
- ``GET /healthz``: 200 ``{"status": "ready", "model": name, "sizes": [...], "limits": {...}}`` once the model is
  loaded and every size on the menu warmed up. ``GET /metrics``: Prometheus text for this replica.

What one request may ask for is bounded before it is queued: a size from the menu (``--sizes``), steps and a cost
(pixels x steps, doubled with guidance) under the limits, prompts of at most ``max_prompt_chars``, a finite guidance
scale up to ``max_guidance``. Types are strict (``true``, ``"32"`` or ``32.0`` for an integer are 422).

Requests are batched by :class:`~runtime.serve.batching.Batcher`: requests that share size, steps and guidance go
through the pipeline in one call, each with its own noise generator, so a request with seed ``s`` gets the noise of
``Pipeline(...)(prompt, seed=s)`` whatever else shares its call; a failing call is retried one request at a time (in
halves when out of memory), so only the request at fault fails; each group is answered as it finishes; work whose
clients have all gone stops between steps. Errors are one line ``{"error": ...}``: malformed or too deeply nested
JSON 400; a wrong field or any input the pipeline refuses 422; a request still failing alone for lack of memory
503; a bug 500 (counted in ``/metrics``). See :mod:`runtime.serve.gate` for what is refused before a replica sees it.
"""

# no `from __future__ import annotations` here: FastAPI reads the request model from the live annotations of the
# methods Ray Serve's ingress wraps (string annotations turn the body into a query parameter)
import asyncio
import base64
import io
import json
import logging
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any, Literal, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve

from ..errors import Cancelled, InstaFlowError, InvalidInputError
from .batching import Batcher, Job, OutOfMemory
from .config import ServeConfig, format_size, menu_for, parse_sizes
from .gate import RETRY_AFTER_S, GateConfig, check_request

log = logging.getLogger("ray.serve")

api = FastAPI(title="instaflow-rt", description="one-step text-to-image (InstaFlow)", docs_url=None,
              redoc_url=None, openapi_url=None)


class GenerateRequest(BaseModel):
    """The body of ``POST /v1/generate``; unknown fields are refused, types are strict."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str
    negative_prompt: Optional[str] = None
    num_inference_steps: int = 1
    guidance_scale: float = 0.0
    height: Optional[int] = None
    width: Optional[int] = None
    seed: Optional[int] = None
    response_format: Literal["png", "b64_json"] = "png"


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message.splitlines()[0] if message else "error"}, status_code=status,
                        headers=headers or None)


def parse_body(raw: bytes) -> "GenerateRequest | JSONResponse":
    """The request body, or the error response: 400 for malformed or too deeply nested JSON, 422 with one line for a
    wrong field or type."""
    try:
        doc = json.loads(raw)
    except RecursionError:
        return _error(400, "JSON nested too deeply")
    except (ValueError, UnicodeDecodeError):
        return _error(400, "malformed JSON body")
    if not isinstance(doc, dict):
        return _error(422, f"the body must be a JSON object, got {type(doc).__name__}")
    try:
        return GenerateRequest.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(422, f"{where}: {first['msg']}" if where else str(first["msg"]))


def public_name(ckpt: str) -> str:
    """What ``/healthz`` says the model is: an alias or hub id as given, a local folder by its last part only."""
    return Path(ckpt).name if os.path.sep in ckpt and Path(ckpt).expanduser().exists() else ckpt


def quiet_truncation_warnings() -> None:
    """Ignore the pipeline's prompt-truncation warning: its text names the prompt, so each distinct long prompt
    would add an entry to Python's warnings registry for as long as the replica lives ("ignore" records none)."""
    warnings.filterwarnings("ignore", message=r"\d+ prompt\(s\) longer than the", category=UserWarning)


def request_cost(height: int, width: int, steps: int, cfg: bool) -> int:
    """Pixel-steps: pixels times UNet evaluations per image (guidance evaluates two batches)."""
    return height * width * steps * (2 if cfg else 1)


class Metrics:
    """This replica's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("instaflow_requests", "requests answered, by HTTP status", ["status"],
                                registry=self.registry)
        self.latency = Histogram("instaflow_request_seconds", "time from arrival to answer", registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.batch = Histogram("instaflow_batch_size", "requests per pipeline call", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        self.queue = Gauge("instaflow_queue_depth", "requests held by this replica (queued or running)",
                           registry=self.registry)
        self.abandoned = Counter("instaflow_abandoned", "requests whose client had gone (or whose deadline passed) "
                                 "before their answer", registry=self.registry)
        self.cancelled_calls = Gauge("instaflow_cancelled_calls", "pipeline calls stopped between steps because "
                                     "every client had gone", registry=self.registry)
        self.retried_calls = Gauge("instaflow_retried_calls", "pipeline calls that failed and were run again one "
                                   "request at a time (in halves when out of memory)", registry=self.registry)
        self.graph_memory = Gauge("instaflow_graph_memory_bytes", "GPU memory the warm-up of each menu size added "
                                  "(CUDA graphs, workspaces)", ["size"], registry=self.registry)


class Payload:
    """What the runner needs of one request."""

    __slots__ = ("prompt", "negative", "seed", "steps", "guidance", "height", "width", "cfg", "on_menu")

    def __init__(self, prompt: str, negative: str, seed: int, steps: int, guidance: float, height: int, width: int,
                 cfg: bool, on_menu: bool) -> None:
        self.prompt, self.negative, self.seed = prompt, negative, seed
        self.steps, self.guidance, self.height, self.width = steps, guidance, height, width
        self.cfg, self.on_menu = cfg, on_menu


def graph_options(c: ServeConfig) -> dict[str, Any]:
    """A replica's pipeline options for room for one CUDA graph per (menu size, batch bucket) and per text-encoder
    batch, so that none is ever evicted (or, with onnxruntime, refused) under traffic: for every backend that
    captures CUDA graphs (those taking ``max_graphs``), on a GPU."""
    from ..backends import backend_class, option_names

    if c.backend != "auto" and "max_graphs" not in option_names(backend_class(c.backend)):
        return {}
    import torch

    device = c.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not str(device).startswith("cuda"):
        return {}
    n_sizes = len(parse_sizes(c.sizes)) if c.sizes else 3
    n_buckets = c.max_batch.bit_length() + 1
    # per menu size and bucket: one shape without guidance, one with (a doubled batch); the text encoder sees
    # 1 to 2 x max_batch texts
    return {"max_graphs": max(16, 2 * n_sizes * n_buckets, 2 * c.max_batch) + 2}


@serve.deployment(max_ongoing_requests=72, max_queued_requests=136, graceful_shutdown_timeout_s=65)
@serve.ingress(api)
class ImageService:
    """One replica: the pipeline, loaded and warmed up once, behind the batcher."""

    def __init__(self, config: dict[str, Any], gate: Optional[dict[str, Any]] = None) -> None:
        from .. import Pipeline

        self.config = c = ServeConfig(**config)
        self.gate = GateConfig(**(gate or {}))
        quiet_truncation_warnings()
        self.pipe = Pipeline.from_pretrained(c.ckpt, device=c.device, dtype=c.dtype, backend=c.backend,
                                             treat_as_flow=c.treat_as_flow, **graph_options(c))
        self.name = public_name(c.ckpt)
        limits = self.pipe.limits
        limits.max_images = max(limits.max_images, c.max_batch)
        if c.max_pixels is not None:
            limits.max_pixels = c.max_pixels
        if c.max_steps is not None:
            limits.max_steps = c.max_steps
        self.sizes = self._menu()
        self.cuda = self.pipe.device.type == "cuda"
        # on a GPU every call runs at a batch size from this list (padded): one graph per (size, bucket), all
        # captured below, none ever captured under traffic
        self.buckets = sorted({min(2**i, c.max_batch) for i in range(c.max_batch.bit_length() + 1)}) \
            if self.cuda else list(range(1, c.max_batch + 1))
        self.eager = self._eager_pipeline()
        self.metrics = Metrics()
        seconds_per_unit = self._warm_up()
        largest = max(h * w for h, w in self.sizes)
        budget = int(c.cost_seconds / seconds_per_unit)
        # floors: one step at the menu's largest size per request, and a full call of those per call (what the
        # warm-up ran): the measured budget only ever limits steps and guidance, never the batching of the menu
        self.max_cost = c.max_cost if c.max_cost is not None else max(budget, largest)
        self.max_batch_cost = c.max_batch_cost if c.max_batch_cost is not None else \
            max(budget, self.max_cost, c.max_batch * largest)
        self.batcher = Batcher(self._run, c.max_batch, c.max_wait_ms / 1000, self.max_batch_cost,
                               is_oom=self._is_oom, on_call=lambda n, _: self.metrics.batch.observe(n))
        self.held = 0
        log.info("instaflow: %s ready, sizes %s, at most %d pixel-steps per request and %d per call (%.3g us per "
                 "pixel-step measured)", self.name, ",".join(format_size(h, w) for h, w in self.sizes),
                 self.max_cost, self.max_batch_cost, seconds_per_unit * 1e6)

    # ------------------------------------------------------------------------------------------------ start-up
    def _menu(self) -> list[tuple[int, int]]:
        sizes = menu_for(self.config, self.pipe.components, self.pipe.limits)
        for h, w in sizes:  # and whatever the backend says (exported graphs may take fewer sizes)
            try:
                self.pipe.check_inputs("x", height=h, width=w, seed=0)
            except InstaFlowError as e:
                raise InvalidInputError(f"--sizes {format_size(h, w)}: {e}") from None
        return sizes

    def _eager_pipeline(self) -> Any:
        """Off-menu sizes (``allow_other_sizes``) run eagerly: on a pipeline of their own over the same weights
        when the main one replays CUDA graphs (a new shape would be captured, and could evict a menu size)."""
        c = self.config
        if not c.allow_other_sizes:
            return None
        if not self.cuda:
            return self.pipe  # nothing is captured on the CPU
        from .. import Pipeline

        if self.pipe.backend.name != "torch":
            raise InvalidInputError(f"--allow-other-sizes runs other sizes eagerly with torch; the "
                                    f"{self.pipe.backend.name} backend on a GPU takes the menu's sizes only")
        if not getattr(self.pipe.backend, "cuda_graph", False):
            return self.pipe
        eager = Pipeline(self.pipe.components, device=self.pipe.device, dtype=self.pipe.dtype, backend="torch",
                         name=self.pipe.name)
        eager.limits = self.pipe.limits
        return eager

    def _warm_up(self) -> float:
        """Run every menu size once per batch bucket (on a GPU this captures its graphs) and measure the seconds
        one pixel-step takes in a full batch at the checkpoint's size (the cost budgets' unit)."""
        import torch

        for h, w in self.sizes:
            before = torch.cuda.memory_reserved(self.pipe.device) if self.cuda else 0
            for n in (self.buckets if self.cuda else [1]):
                self.pipe(["warm-up"] * n, height=h, width=w, seed=0)
            if self.cuda:
                torch.cuda.synchronize(self.pipe.device)
                added = torch.cuda.memory_reserved(self.pipe.device) - before
                self.metrics.graph_memory.labels(size=format_size(h, w)).set(added)
                log.info("instaflow: warmed up %s (%d batch sizes): %.1f MiB of GPU memory added", format_size(h, w),
                         len(self.buckets), added / 2**20)
        h, w = self.sizes[0]
        n = self.config.max_batch
        best = math.inf
        for _ in range(3):  # the fastest of three: other work on the machine only ever slows a run down
            t = time.perf_counter()
            self.pipe(["warm-up"] * n, height=h, width=w, seed=0)
            if self.cuda:
                torch.cuda.synchronize(self.pipe.device)
            best = min(best, time.perf_counter() - t)
        return best / (n * h * w)

    # ------------------------------------------------------------------------------------------------ endpoints
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Ready (the replica answers only once its model is loaded and warmed up): the model's name, the menu and
        the limits."""
        return {"status": "ready", "model": self.name,
                "sizes": [format_size(h, w) for h, w in self.sizes],
                "limits": {"max_cost": self.max_cost, "max_batch_cost": self.max_batch_cost,
                           "max_steps": self.pipe.limits.max_steps, "max_batch": self.config.max_batch,
                           "max_prompt_chars": self.config.max_prompt_chars,
                           "max_guidance": self.config.max_guidance,
                           "allow_other_sizes": self.config.allow_other_sizes}}

    def _guard(self, request: Request) -> Optional[Response]:
        refusal = check_request(self.gate, request.method, request.url.path, request.scope.get("headers", []))
        return None if refusal is None else _error(refusal.status, refusal.message, **dict(refusal.headers))

    @api.get("/metrics")
    async def metrics_text(self, request: Request) -> Response:
        refused = self._guard(request)
        if refused is not None:
            return refused
        self.metrics.cancelled_calls.set(self.batcher.cancelled_calls)
        self.metrics.retried_calls.set(self.batcher.retried_calls)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/docs")
    async def docs(self, request: Request) -> Response:
        refused = self._guard(request)
        if refused is not None:
            return refused
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="instaflow-rt")

    @api.get("/openapi.json")
    async def openapi(self, request: Request) -> Response:
        refused = self._guard(request)
        return refused if refused is not None else JSONResponse(api.openapi())

    @api.post("/v1/generate")
    async def generate(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            response = await self._generate(request)
        except asyncio.CancelledError:  # the client went away or timed out: Ray logs it (one line), we count it
            self.metrics.abandoned.inc()
            raise
        except Exception:  # noqa: BLE001 - a bug: one line to the client, the traceback to the log, counted
            log.exception("instaflow: request failed")
            response = _error(500, "internal error (the service's log has the details)")
        self.metrics.requests.labels(status=str(response.status_code)).inc()
        self.metrics.latency.observe(time.perf_counter() - t0)
        return response

    async def _read(self, request: Request) -> "bytes | Response":
        """The body, read up to the gate's limit (the proxy's gate has already done so; this holds without it)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.gate.max_body_bytes:
                return _error(413, f"the body is over this service's limit of {self.gate.max_body_bytes:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _generate(self, request: Request) -> Response:
        refused = self._guard(request)
        if refused is not None:
            return refused
        raw = await self._read(request)
        if isinstance(raw, Response):
            return raw
        body = parse_body(raw)
        if isinstance(body, Response):
            return body
        try:  # every input check, before the request joins a batch
            job = self.admit(body)
        except InstaFlowError as e:
            return _error(422, str(e))
        self.held += 1
        self.metrics.queue.set(self.held)
        try:
            png, timings = await self.batcher.submit(job)
        except Cancelled:  # its deadline passed while it waited (the proxy has answered 408)
            self.metrics.abandoned.inc()
            return _error(408, "no answer within the service's request timeout")
        except OutOfMemory:
            return _error(503, "out of memory for this request even alone; retry later or ask for less",
                          **{"Retry-After": str(RETRY_AFTER_S)})
        except InstaFlowError as e:
            return _error(422, str(e))
        finally:
            self.held -= 1
            self.metrics.queue.set(self.held)
        seed = job.payload.seed
        if body.response_format == "b64_json":
            return JSONResponse({"images": [base64.b64encode(png).decode()], "seed": seed, "timings": timings})
        return Response(png, media_type="image/png", headers={"X-Seed": str(seed)})

    def admit(self, body: GenerateRequest) -> Job:
        """Every check of one request (one-line errors), and its job: size on the menu, text lengths, guidance,
        steps and cost under the limits, and everything the pipeline checks."""
        c = self.config
        for label, text in (("prompt", body.prompt), ("negative_prompt", body.negative_prompt)):
            if text is not None and len(text) > c.max_prompt_chars:
                raise InvalidInputError(f"{label} has {len(text):,} characters, over this service's limit of "
                                        f"{c.max_prompt_chars:,}")
        if math.isfinite(body.guidance_scale) and body.guidance_scale > c.max_guidance:
            raise InvalidInputError(f"guidance_scale={body.guidance_scale:g} is over this service's limit of "
                                    f"{c.max_guidance:g}")
        seed = body.seed if body.seed is not None else random.randrange(2**63)
        req = self.pipe.check_inputs(body.prompt, body.negative_prompt, body.num_inference_steps,
                                     body.guidance_scale, body.height, body.width, seed=seed)
        on_menu = (req.height, req.width) in self.sizes
        if not on_menu and self.eager is None:
            raise InvalidInputError(f"{format_size(req.height, req.width)} (width x height) is not on this "
                                    f"service's menu: {', '.join(format_size(h, w) for h, w in self.sizes)}")
        cost = request_cost(req.height, req.width, req.num_inference_steps, req.cfg)
        if cost > self.max_cost:
            raise InvalidInputError(f"{format_size(req.height, req.width)} px x {req.num_inference_steps} step(s)"
                                    f"{' x 2 (guidance)' if req.cfg else ''} = {cost:,} pixel-steps is over this "
                                    f"service's limit of {self.max_cost:,} per request")
        payload = Payload(req.prompts[0], req.negatives[0], seed, req.num_inference_steps, req.guidance_scale,
                          req.height, req.width, req.cfg, on_menu)
        key = (req.height, req.width, req.num_inference_steps, req.guidance_scale if req.cfg else 0.0, on_menu)
        return Job(key, cost, payload, deadline=time.monotonic() + c.request_timeout_s)

    # ------------------------------------------------------------------------------------------------ work
    def _is_oom(self, error: BaseException) -> bool:
        import torch

        oom = isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or \
            (isinstance(error, RuntimeError) and "out of memory" in str(error))
        if oom and self.cuda:
            torch.cuda.empty_cache()
        return oom

    def _run(self, jobs: list[Job], cancel: Any) -> list[tuple[bytes, dict[str, Any]]]:
        """One pipeline call for jobs sharing size, steps and guidance (a worker thread); PNGs out. On a GPU a call
        is padded to the next batch bucket, so that the shapes graphs are captured for stay few and fixed."""
        import torch

        first: Payload = jobs[0].payload
        pipe = self.pipe if first.on_menu else self.eager
        payloads = [j.payload for j in jobs]
        if self.cuda and first.on_menu:  # graphs exist (or are captured) for the bucket sizes only
            n = next(b for b in self.buckets if b >= len(payloads))
            payloads = payloads + [payloads[-1]] * (n - len(payloads))
        out = pipe([p.prompt for p in payloads],
                   negative_prompt=[p.negative for p in payloads] if first.cfg else None,
                   num_inference_steps=first.steps, guidance_scale=first.guidance, height=first.height,
                   width=first.width, generator=[torch.Generator().manual_seed(p.seed) for p in payloads],
                   cancel=cancel)
        timings = {**out.timings, "group_size": len(jobs), "batch_size": len(payloads)}
        pngs = []
        for image in out.images[: len(jobs)]:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            pngs.append((buf.getvalue(), timings))
        return pngs


def deployment_options(config: ServeConfig, replicas: int = 1) -> dict[str, Any]:
    """Ray Serve's own limits, from the service's: a replica holds ``max_queue`` requests queued in its batcher and
    the ``max_batch`` of a running call; the proxy queue (every request passes through it on its way to a replica)
    has room for all the service holds, :meth:`ServeConfig.capacity` (why: there), so a burst is not refused there
    while the replicas have room; the gate, given that capacity, bounds the total (503 in the proxy, before the body
    is read, no hop to a replica).
    A stopping replica has as long as the longest admitted request to finish. (The queue is the replica's, not the
    proxy's: Ray's router hands waiting requests to a replica only as its retry backoff allows, which left a replica
    holding 2 requests idle between calls: 5.4 against 15.8 images/s at --max-batch 1.)"""
    return {"max_ongoing_requests": config.max_queue + config.max_batch,
            "max_queued_requests": config.capacity(replicas),
            "graceful_shutdown_timeout_s": config.graceful_shutdown_s}


def build(args: dict[str, Any]) -> Any:
    """The Ray Serve application for ``args`` (the :class:`ServeConfig` fields, plus ``gate``: the
    :class:`~runtime.serve.gate.GateConfig` fields the replicas check too, e.g. ``api_key_file``); the
    ``import_path`` of ``serve.yaml``."""
    args = dict(args)
    gate = GateConfig(**(args.pop("gate", None) or {}))
    config = ServeConfig.from_dict(args)
    return ImageService.options(**deployment_options(config)).bind(config.to_dict(), gate_dict(gate))


def gate_dict(gate: GateConfig) -> dict[str, Any]:
    """The gate settings a replica checks (the API key's hash, never the key or its file)."""
    d = json.loads(gate.to_json())
    d["api_key_file"] = None
    d["state_dir"] = None
    return d
