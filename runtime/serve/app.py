"""The image service: a Ray Serve deployment with a FastAPI ingress around one :class:`runtime.Pipeline` per replica.

API
- ``POST /v1/generate`` JSON ``{"prompt": str, "negative_prompt"?: str, "num_inference_steps"?: int,
  "guidance_scale"?: float, "height"?: int, "width"?: int, "seed"?: int, "response_format"?: "png" | "b64_json"}``:
  ``image/png`` (the seed in the ``X-Seed`` header), or ``{"images": [base64 PNG], "seed": int, "timings": {...}}``.
- ``GET /healthz``: 200 once the model is loaded. ``GET /metrics``: Prometheus text for this replica.

Requests that arrive together are batched by Ray Serve (``@serve.batch``); within a batch, requests that share size,
steps and guidance go through the pipeline in one call, each with its own noise generator, so a request with seed
``s`` gets the noise of ``Pipeline(...)(prompt, seed=s)`` whatever else shares its batch. Errors: malformed JSON 400;
a wrong field or any runtime input error 422 with one line ``{"error": ...}`` (checked before the request is
queued); more than ``max_queue`` requests held by a replica 503 with ``Retry-After``.
"""

# no `from __future__ import annotations` here: FastAPI reads the request model from the live annotations of the
# methods Ray Serve's ingress wraps (string annotations turn the body into a query parameter)
import asyncio
import base64
import io
import json
import random
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve

from ..errors import InstaFlowError
from .config import ServeConfig

RETRY_AFTER_S = 1

api = FastAPI(title="instaflow-rt", description="one-step text-to-image (InstaFlow)")


class GenerateRequest(BaseModel):
    """The body of ``POST /v1/generate``; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int = 1
    guidance_scale: float = 0.0
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    response_format: Literal["png", "b64_json"] = "png"


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message.splitlines()[0] if message else "error"}, status_code=status,
                        headers=headers or None)


def parse_body(raw: bytes) -> "GenerateRequest | JSONResponse":
    """The request body (JSON whatever the content type), or the error response: 400 for malformed JSON, 422 with
    one line for a wrong field."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _error(400, "malformed JSON body")
    try:
        return GenerateRequest.model_validate(doc)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(422, f"{where}: {first['msg']}" if where else str(first["msg"]))


class _Raise:
    """An error for one request of a batch (``@serve.batch`` returns one result per request)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class Metrics:
    """This replica's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("instaflow_requests", "requests answered, by HTTP status", ["status"],
                                registry=self.registry)
        self.latency = Histogram("instaflow_request_seconds", "time from arrival to answer", registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.batch = Histogram("instaflow_batch_size", "requests per batch", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64))
        self.queue = Gauge("instaflow_queue_depth", "requests held by this replica (queued or running)",
                           registry=self.registry)


@serve.deployment(max_ongoing_requests=1024)  # admission is ours (max_queue): excess gets a 503, not Ray's queue
@serve.ingress(api)
class ImageService:
    """One replica: the pipeline, loaded once, behind Ray Serve's batching."""

    def __init__(self, config: dict[str, Any]) -> None:
        from .. import Pipeline

        self.config = ServeConfig(**config)
        c = self.config
        self.pipe = Pipeline.from_pretrained(c.ckpt, device=c.device, dtype=c.dtype, backend=c.backend,
                                             treat_as_flow=c.treat_as_flow)
        limits = self.pipe.limits
        limits.max_images = max(limits.max_images, c.max_batch)
        if c.max_pixels is not None:
            limits.max_pixels = c.max_pixels
        if c.max_steps is not None:
            limits.max_steps = c.max_steps
        self.generate_batch.set_max_batch_size(c.max_batch)
        self.generate_batch.set_batch_wait_timeout_s(c.max_wait_ms / 1000)
        self.held = 0
        self.metrics = Metrics()

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model": self.pipe.name}

    @api.get("/metrics")
    async def metrics_text(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.post("/v1/generate")
    async def generate(self, request: Request) -> Response:
        t0 = time.perf_counter()
        body = parse_body(await request.body())
        response = body if isinstance(body, Response) else await self._answer(body)
        self.metrics.requests.labels(status=str(response.status_code)).inc()
        self.metrics.latency.observe(time.perf_counter() - t0)
        return response

    async def _answer(self, body: GenerateRequest) -> Response:
        if self.held >= self.config.max_queue:
            return _error(503, f"the service is at capacity ({self.config.max_queue} requests held); retry later",
                          **{"Retry-After": str(RETRY_AFTER_S)})
        seed = body.seed if body.seed is not None else random.randrange(2**63)
        try:  # every input error is one line, before the request joins a batch
            req = self.pipe.check_inputs(body.prompt, body.negative_prompt, body.num_inference_steps,
                                         body.guidance_scale, body.height, body.width, seed=seed)
        except InstaFlowError as e:
            return _error(422, str(e))
        self.held += 1
        self.metrics.queue.set(self.held)
        try:
            result = await self.generate_batch((body, req, seed))
        finally:
            self.held -= 1
            self.metrics.queue.set(self.held)
        if isinstance(result, _Raise):
            return _error(422, str(result.error))
        png, timings = result
        if body.response_format == "b64_json":
            return JSONResponse({"images": [base64.b64encode(png).decode()], "seed": seed, "timings": timings})
        return Response(png, media_type="image/png", headers={"X-Seed": str(seed)})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def generate_batch(self, items: list[tuple[GenerateRequest, Any, int]]) -> list[Any]:
        """Ray Serve hands over the requests that arrived together; each group sharing size, steps and guidance
        runs as one pipeline call (in a worker thread: the event loop keeps admitting and refusing requests)."""
        self.metrics.batch.observe(len(items))
        groups: dict[tuple, list[int]] = {}
        for i, (_, req, _) in enumerate(items):
            groups.setdefault((req.height, req.width, req.num_inference_steps, req.guidance_scale), []).append(i)
        results: list[Any] = [None] * len(items)
        for members in groups.values():
            try:
                out = await asyncio.to_thread(self._run_group, [items[i] for i in members], len(items))
            except InstaFlowError as e:
                out = [e] * len(members)
            for i, r in zip(members, out):
                results[i] = r
        return [r if not isinstance(r, Exception) else _Raise(r) for r in results]

    def _run_group(self, items: list[tuple[GenerateRequest, Any, int]], batch_size: int) -> list[Any]:
        import torch

        body, req, _ = items[0]
        cfg = req.cfg
        out = self.pipe([b.prompt for b, _, _ in items],
                        negative_prompt=[b.negative_prompt or "" for b, _, _ in items] if cfg else None,
                        num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
                        height=req.height, width=req.width,
                        generator=[torch.Generator().manual_seed(s) for _, _, s in items])
        timings = {**out.timings, "batch_size": batch_size, "group_size": len(items)}
        pngs = []
        for image in out.images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            pngs.append((buf.getvalue(), timings))
        return pngs


def build(args: dict[str, Any]) -> Any:
    """The Ray Serve application for ``args`` (the :class:`ServeConfig` fields); the ``import_path`` of
    ``serve.yaml``."""
    config = ServeConfig(**args)
    return ImageService.bind(config.to_dict())
