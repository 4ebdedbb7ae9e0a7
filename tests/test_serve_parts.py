"""The service's parts without a service: the batcher (isolation, out-of-memory splitting, cancellation, answers per
group), the HTTP gate (as an ASGI app driven by hand), the settings and the request checks. Fast and deterministic:
nothing here starts Ray or a process (tests/test_serve.py runs the real service)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import warnings
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed")

from runtime.errors import Cancelled, InvalidInputError  # noqa: E402
from runtime.serve.batching import Batcher, Job, OutOfMemory  # noqa: E402
from runtime.serve.config import ServeConfig, default_sizes, hash_key, parse_sizes, read_api_key  # noqa: E402
from runtime.serve.gate import Gate, GateConfig, RefusalLimiter, check_request, host_name  # noqa: E402

KEY = "k" * 20


# ------------------------------------------------------------------------------------------------ batcher
class FakeRunner:
    """Records each call's job names; fails calls holding a "bad" job, and calls of more than ``fits`` jobs with an
    out-of-memory error."""

    def __init__(self, fits: int = 100, block: threading.Event | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fits = fits
        self.block = block
        self.cancel_seen: list[bool] = []

    def __call__(self, jobs, cancel):
        names = [j.payload for j in jobs]
        self.calls.append(names)
        if self.block is not None:
            self.block.wait(10)
            self.cancel_seen.append(cancel())
            if cancel():
                raise Cancelled("stopped")
        if len(jobs) > self.fits:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any(n.startswith("bad") for n in names):
            raise InvalidInputError(f"the generated image contains NaN/inf ({names})")
        return [f"image of {n}" for n in names]


def _run(coro):
    return asyncio.run(coro)


async def _submit_all(batcher: Batcher, jobs: list[Job]) -> list[Any]:
    return await asyncio.gather(*(batcher.submit(j) for j in jobs), return_exceptions=True)


def test_a_failing_call_is_retried_one_by_one_and_only_the_guilty_job_fails():
    runner = FakeRunner()
    batcher = Batcher(runner, max_batch=8, max_wait_s=0.05, max_batch_cost=10**9)
    jobs = [Job(("s",), 1, name) for name in ("a", "b", "bad", "c")]
    results = _run(_submit_all(batcher, jobs))
    assert results[:2] == ["image of a", "image of b"] and results[3] == "image of c"
    assert isinstance(results[2], InvalidInputError)
    assert runner.calls == [["a", "b", "bad", "c"], ["a"], ["b"], ["bad"], ["c"]] and batcher.retried_calls == 1


def test_out_of_memory_splits_the_call_in_halves_before_failing():
    runner = FakeRunner(fits=2)
    batcher = Batcher(runner, max_batch=8, max_wait_s=0.05, max_batch_cost=10**9)
    results = _run(_submit_all(batcher, [Job(("s",), 1, str(i)) for i in range(5)]))
    assert results == [f"image of {i}" for i in range(5)]
    assert runner.calls == [["0", "1", "2", "3", "4"], ["0", "1"], ["2", "3", "4"], ["2"], ["3", "4"]]
    alone = FakeRunner(fits=0)
    (result,) = _run(_submit_all(Batcher(alone, 8, 0.0, 10**9), [Job(("s",), 1, "x")]))
    assert isinstance(result, OutOfMemory) and "out of memory" in str(result)


def test_groups_answer_cheapest_first_and_each_as_it_finishes():
    """Two shapes in one batch: the cheap group runs first and its job is answered before the costly group's call
    has even finished."""
    order: list[str] = []
    release = threading.Event()

    def runner(jobs, cancel):
        name = jobs[0].payload
        order.append(f"run {name}")
        if name == "big":
            release.wait(10)
        return [f"image of {j.payload}" for j in jobs]

    async def scenario():
        batcher = Batcher(runner, max_batch=8, max_wait_s=0.05, max_batch_cost=10**9)
        big = asyncio.ensure_future(batcher.submit(Job(("256",), 65536, "big")))
        small = asyncio.ensure_future(batcher.submit(Job(("32",), 1024, "small")))
        assert await asyncio.wait_for(small, 5) == "image of small"
        order.append("small answered")
        assert not big.done()
        release.set()
        assert await asyncio.wait_for(big, 5) == "image of big"

    _run(scenario())
    assert order[0] == "run small" and "small answered" in order


def test_batches_respect_the_job_and_cost_budgets():
    runner = FakeRunner()
    batcher = Batcher(runner, max_batch=3, max_wait_s=0.05, max_batch_cost=10)
    jobs = [Job(("s",), 4, f"j{i}") for i in range(5)]  # 4 + 4 fits in 10, a third does not
    assert _run(_submit_all(batcher, jobs)) == [f"image of j{i}" for i in range(5)]
    assert runner.calls == [["j0", "j1"], ["j2", "j3"], ["j4"]]
    runner2 = FakeRunner()
    costly = Batcher(runner2, max_batch=3, max_wait_s=0.05, max_batch_cost=10)
    assert _run(_submit_all(costly, [Job(("s",), 50, "huge")])) == ["image of huge"]  # alone, whatever its cost


def test_jobs_whose_clients_left_are_dropped_and_a_call_whose_clients_all_left_stops():
    block = threading.Event()
    runner = FakeRunner(block=block)

    async def scenario():
        batcher = Batcher(runner, max_batch=8, max_wait_s=0.01, max_batch_cost=10**9)
        first = asyncio.ensure_future(batcher.submit(Job(("s",), 1, "first")))
        while not runner.calls:
            await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(batcher.submit(Job(("s",), 1, "waiting")))
        await asyncio.sleep(0.05)
        first.cancel()  # the client of the running call goes: its cancel hook turns True
        waiting.cancel()  # the queued job's client goes: it never runs
        await asyncio.sleep(0.05)
        block.set()
        for _ in range(100):
            if batcher.cancelled_calls:
                break
            await asyncio.sleep(0.02)
        late = await batcher.submit(Job(("s",), 1, "late"))
        return batcher, late

    batcher, late = _run(scenario())
    assert runner.calls == [["first"], ["late"]] and runner.cancel_seen[0] is True
    assert batcher.cancelled_calls == 1 and late == "image of late"


def test_a_job_past_its_deadline_is_not_run():
    import time

    runner = FakeRunner()
    batcher = Batcher(runner, max_batch=8, max_wait_s=0.01, max_batch_cost=10**9)
    (result,) = _run(_submit_all(batcher, [Job(("s",), 1, "old", deadline=time.monotonic() - 1)]))
    assert isinstance(result, Cancelled) and runner.calls == []


# ------------------------------------------------------------------------------------------------ gate
class Client:
    """Drives the gate like an HTTP server would: one request, the messages it sends back."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      chunks: list[bytes] | None = None, delay: float = 0.0, disconnect: bool = False
                      ) -> tuple[int, dict[str, str], bytes]:
        scope = {"type": "http", "method": method, "path": path, "headers": [(k.lower().encode(), v.encode())
                                                                            for k, v in (headers or {}).items()]}
        pending = list(chunks or [b""])
        sent: list[dict] = []

        async def receive():
            if pending:
                await asyncio.sleep(delay)
                chunk = pending.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(pending) or disconnect}
            if disconnect:
                return {"type": "http.disconnect"}
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        await self.gate(scope, receive, send)
        start = next((m for m in sent if m["type"] == "http.response.start"), None)
        if start is None:
            return 0, {}, b""
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def _json_app(status: int = 200, body: bytes = b'{"ok": 1}', ctype: bytes = b"application/json",
              seen: list | None = None):
    async def app(scope, receive, send):
        if seen is not None:
            message = await receive()
            seen.append((scope, message))
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
        await send({"type": "http.response.body", "body": body})

    return app


def _post(gate: Gate, body: bytes = b'{"prompt": "x"}', **kw) -> tuple[int, dict[str, str], bytes]:
    headers = {"host": "127.0.0.1:8000", "content-type": "application/json", "content-length": str(len(body)),
               **kw.pop("headers", {})}
    return asyncio.run(Client(gate).request("POST", "/v1/generate", headers, [body], **kw))


def _error_of(body: bytes) -> str:
    doc = json.loads(body)
    assert set(doc) == {"error"} and "\n" not in doc["error"]
    return doc["error"]


def test_gate_refuses_in_one_line_before_the_service_sees_anything():
    seen: list = []
    cfg = GateConfig(api_key_sha256=hash_key(KEY), allowed_hosts=["127.0.0.1", "localhost"], max_body_bytes=100)
    gate = Gate(_json_app(seen=seen), cfg)
    auth = {"authorization": f"Bearer {KEY}"}
    cases = [
        (dict(headers={}), 401, "missing or wrong API key"),
        (dict(headers={"authorization": "Bearer " + "x" * 20}), 401, "missing or wrong API key"),
        (dict(headers={**auth, "content-type": "text/plain"}), 415, "Content-Type must be application/json"),
        (dict(headers={**auth, "content-type": "application/x-www-form-urlencoded"}), 415, "application/json"),
        (dict(headers={**auth, "host": "evil.example:8000"}), 400, "Host 'evil.example' is not one"),
        (dict(headers={**auth, "content-length": "10000000"}), 413, "10,000,000 bytes is over"),
    ]
    for kw, status, match in cases:
        code, headers, body = _post(gate, **kw)
        assert code == status and match in _error_of(body), (kw, code, body)
        if status == 401:
            assert headers["www-authenticate"] == "Bearer"
    code, _, _ = _post(gate, headers={**auth, "content-type": "application/json; charset=utf-8"})
    assert code == 200 and len(seen) == 1  # only the good request reached the service
    for method, path, status in (("GET", "/nope", 404), ("GET", "/docs", 404), ("GET", "/openapi.json", 404),
                                 ("GET", "/v1/generate", 405), ("GET", "/healthz", 200)):
        code, _, _ = asyncio.run(Client(gate).request(method, path, {"host": "localhost"}))
        assert code == status, (method, path, code)
    assert len(seen) == 2


def test_gate_reads_bodies_up_to_the_limit_and_within_the_time():
    seen: list = []
    gate = Gate(_json_app(seen=seen), GateConfig(max_body_bytes=100, body_timeout_s=0.3))
    chunked = {"host": "x", "content-type": "application/json"}  # no Content-Length: streamed
    code, headers, body = asyncio.run(Client(gate).request("POST", "/v1/generate", chunked, [b"x" * 60] * 3))
    assert code == 413 and "limit of 100 bytes" in _error_of(body) and headers["connection"] == "close"
    code, _, body = asyncio.run(Client(gate).request("POST", "/v1/generate", chunked, [b"{"] * 10, delay=0.1))
    assert code == 408 and "did not arrive in time" in _error_of(body)
    code, _, _ = asyncio.run(Client(gate).request("POST", "/v1/generate", chunked, [b'{"prompt":', b' "x"}']))
    assert code == 200 and seen[-1][1]["body"] == b'{"prompt": "x"}' and len(seen) == 1
    assert gate.responses[413] == 1 and gate.responses[408] == 1


def test_gate_logs_one_line_per_client_gone_mid_body(caplog):
    gate = Gate(_json_app(), GateConfig())
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        for _ in range(3):
            code, _, _ = asyncio.run(Client(gate).request("POST", "/v1/generate", {"content-type": "application/json"},
                                                          [b'{"pro'], disconnect=True))
            assert code == 0
    lines = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(lines) == 3 and all(r.exc_info is None for r in lines) and gate.responses[499] == 3


def test_gate_strips_ray_timeout_overrides_and_rewrites_ray_errors():
    seen: list = []
    gate = Gate(_json_app(503, b"Request dropped due to backpressure (num_queued_requests=8).", b"text/plain",
                          seen=seen), GateConfig(request_timeout_s=7))
    code, headers, body = _post(gate, headers={"x-request-timeout-seconds": "0",
                                               "x-request-disconnect-disabled": "?1"})
    names = {k for k, _ in seen[0][0]["headers"]}
    assert b"x-request-timeout-seconds" not in names and b"x-request-disconnect-disabled" not in names
    assert code == 503 and headers["retry-after"] == "1"
    assert _error_of(body) == "the service is at capacity; retry later"
    timeout = Gate(_json_app(408, b"Request abc timed out after 7.0s.", b"text/plain"), GateConfig(request_timeout_s=7))
    code, _, body = _post(timeout)
    assert code == 408 and _error_of(body) == "no answer within the service's request timeout (7 s)"
    ours = Gate(_json_app(422, b'{"error": "prompt: bad"}'), GateConfig())
    assert _post(ours)[2] == b'{"error": "prompt: bad"}'  # the service's own JSON errors pass unchanged


def test_gate_capacity_and_drain_refuse_before_reading_the_body(tmp_path):
    gate = Gate(_json_app(), GateConfig(capacity=0))
    code, headers, body = _post(gate)
    assert code == 503 and headers["retry-after"] == "1" and "at capacity" in _error_of(body)
    (tmp_path / "draining").touch()

    async def scenario():
        g = Gate(_json_app(), GateConfig(state_dir=str(tmp_path)))
        for _ in range(100):
            if g.draining:
                break
            await asyncio.sleep(0.02)
        result = await Client(g).request("POST", "/v1/generate", {"content-type": "application/json"}, [b"{}"])
        await asyncio.sleep(0.1)
        g._watcher.cancel()
        return result

    code, headers, body = asyncio.run(scenario())
    assert code == 503 and "shutting down" in _error_of(body) and headers["connection"] == "close"
    report = json.loads(next(tmp_path.glob("gate-*.json")).read_text())
    assert report["open"] == 0


def test_refusals_beyond_a_clients_rate_wait_their_turn():
    """10 a second in bursts of 20: a client sending mistakes back to back gets 20 at once, then one every 0.1 s;
    another client is not affected; the wait never exceeds 10 s; after a quiet spell the burst is back."""
    lim = RefusalLimiter(rate=10)
    assert [lim.delay("a", 100.0) for _ in range(20)] == [0.0] * 20
    assert [round(lim.delay("a", 100.0), 6) for _ in range(3)] == [0.1, 0.2, 0.3]
    assert lim.delay("b", 100.0) == 0.0
    assert max(lim.delay("a", 100.0) for _ in range(1000)) == 10.0
    assert lim.delay("a", 200.0) == 0.0
    assert RefusalLimiter(rate=0).delay("a", 0.0) == 0.0
    small = RefusalLimiter(rate=10, max_clients=2)
    for c in ("a", "b", "c"):
        small.delay(c, 0.0)
    assert list(small._due) == ["b", "c"]  # bounded memory: the oldest address forgotten


def test_gate_holds_a_flood_of_refusals_but_not_good_answers():
    async def scenario():
        gate = Gate(_json_app(), GateConfig(refusal_rate=5))
        client = Client(gate)
        bad = {"host": "x", "content-type": "text/plain"}
        good = {"host": "x", "content-type": "application/json"}
        for _ in range(10):  # the burst: answered at once
            assert (await client.request("POST", "/v1/generate", bad, [b"{}"]))[0] == 415
        assert gate.delayed == 0
        t = asyncio.get_running_loop().time()
        assert (await client.request("POST", "/v1/generate", bad, [b"{}"]))[0] == 415
        held = asyncio.get_running_loop().time() - t
        assert gate.delayed == 1 and held > 0.1  # the 11th waited its turn (0.2 s)
        assert (await client.request("POST", "/v1/generate", good, [b"{}"]))[0] == 200
        assert gate.delayed == 1  # a good answer is never held

    asyncio.run(scenario())


def test_a_held_refusal_from_the_service_does_not_keep_its_slot():
    """A refusal the service made (422) is held only after the service is done with the request: the gate's count
    of requests handed on (what Ray's router counts against a replica too) is back to 0 while it waits."""
    gate = Gate(_json_app(422, b'{"error": "prompt: bad"}'), GateConfig(refusal_rate=1))
    seen: list[int] = []

    async def scenario():
        for _ in range(3):  # a burst of 2, then held
            scope = {"type": "http", "method": "POST", "path": "/v1/generate", "client": ("10.0.0.1", 5),
                     "headers": [(b"content-type", b"application/json")]}
            messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

            async def receive():
                return messages.pop(0) if messages else {"type": "http.disconnect"}

            async def send(message):
                if message["type"] == "http.response.start":
                    seen.append((message["status"], gate.handed_on))

            await gate(scope, receive, send)

    asyncio.run(scenario())
    assert seen == [(422, 0)] * 3 and gate.delayed == 1


def test_host_names_and_api_keys():
    assert host_name("[::1]:8000") == "::1" and host_name("Example.COM:443") == "example.com"
    assert host_name("localhost") == "localhost" and host_name("::1") == "::1"
    cfg = GateConfig(api_key_sha256=hash_key(KEY))
    ok = [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json")]
    assert check_request(cfg, "POST", "/v1/generate", ok) is None
    assert check_request(cfg, "POST", "/v1/generate", [(b"authorization", f"Basic {KEY}".encode())]).status == 401
    assert check_request(cfg, "GET", "/metrics", []).status == 401 and check_request(cfg, "GET", "/healthz", []) is None
    with pytest.raises(InvalidInputError, match="at least 16 printable characters"):
        read_api_key("short")
    assert read_api_key(None, None, {"INSTAFLOW_API_KEY": KEY}) == KEY


# ------------------------------------------------------------------------------------------------ settings
def test_sizes_and_settings_are_one_line_mistakes():
    assert parse_sizes("512x512, 768x512,512X768,768x512") == [(512, 512), (512, 768), (768, 512)]
    for bad in ("512", "512x", "0x512", "axb", "512x512,"):
        with pytest.raises(InvalidInputError, match="--sizes takes WIDTHxHEIGHT"):
            parse_sizes(bad)
    assert default_sizes((512, 512), 64) == [(512, 512), (512, 768), (768, 512)]
    assert default_sizes((32, 32), 8) == [(32, 32), (32, 48), (48, 32)]
    for kwargs, match in ((dict(max_cost=0), "--max-cost must be an integer >= 1"),
                          (dict(request_timeout_s=0), "--request-timeout must be a number >= 0.1"),
                          (dict(max_guidance=float("nan")), "--max-guidance must be a number"),
                          (dict(sizes="big"), "--sizes takes")):
        with pytest.raises(InvalidInputError, match=match):
            ServeConfig(**kwargs)
    with pytest.raises(InvalidInputError, match="unknown service setting"):
        ServeConfig.from_dict({"max_bacth": 4})


def test_ray_limits_follow_the_service_capacity():
    """Ray Serve's proxy queue has room for all the service holds (the gate, not Ray, refuses a burst), and a
    replica takes its queue and a running call."""
    from runtime.serve.app import deployment_options

    config = ServeConfig(max_batch=8, max_queue=8)
    assert config.capacity() == 24 and config.capacity(3) == 56
    for replicas in (1, 3):
        options = deployment_options(config, replicas)
        assert options["max_queued_requests"] == config.capacity(replicas)
        assert options["max_ongoing_requests"] == 16


def test_request_body_types_are_strict_and_deep_json_is_400():
    from fastapi.responses import JSONResponse

    from runtime.serve.app import GenerateRequest, parse_body

    for field, value in (("num_inference_steps", True), ("num_inference_steps", "32"), ("num_inference_steps", 32.0),
                         ("height", "32"), ("seed", 1.5), ("guidance_scale", True), ("prompt", 5)):
        out = parse_body(json.dumps({"prompt": "x", field: value}).encode())
        assert isinstance(out, JSONResponse) and out.status_code == 422, (field, value)
        assert json.loads(out.body)["error"].startswith(field)
    assert isinstance(parse_body(b'{"prompt": "x", "guidance_scale": 2}'), GenerateRequest)  # an int is a number
    deep = parse_body(b"[" * 5000 + b"]" * 5000)
    assert deep.status_code == 400 and json.loads(deep.body)["error"] == "JSON nested too deeply"
    assert parse_body(b"[1]").status_code == 422


def test_truncation_warnings_do_not_fill_the_warnings_registry(tiny_pipe):
    """The service ignores the truncation warning (its text names the prompt): distinct long prompts then add
    nothing to Python's warnings registry."""
    import sys

    from runtime.serve.app import quiet_truncation_warnings

    registry = vars(sys.modules["runtime.pipeline"]).setdefault("__warningregistry__", {})
    with warnings.catch_warnings():
        quiet_truncation_warnings()
        before = len(registry)
        for i in range(20):
            tiny_pipe.encode([f"prompt number {i} " + "word " * 40])
        assert len(registry) - before <= 1  # the registry's version entry, at most


def test_a_bug_is_a_counted_500_in_one_line():
    """An unexpected exception in the request path answers 500 in one line and is counted in /metrics."""
    from prometheus_client import generate_latest

    from runtime.serve import app as app_module

    from types import SimpleNamespace

    async def broken(request):
        raise RuntimeError("a bug\nwith a second line")

    service = SimpleNamespace(metrics=app_module.Metrics(), _generate=broken)  # what generate() uses of a replica
    response = asyncio.run(app_module.ImageService.func_or_class.generate(service, None))
    assert response.status_code == 500 and _error_of(response.body) == \
        "internal error (the service's log has the details)"
    assert 'instaflow_requests_total{status="500"} 1.0' in generate_latest(service.metrics.registry).decode()


def test_gpu_calls_are_padded_to_a_batch_bucket_and_the_padding_is_dropped():
    """On a GPU every call on the menu runs at a batch size from a short fixed list (graphs are captured for those
    only): 3 requests run as a batch of 4, and 3 images come back, in order. Checked with a stand-in pipeline, so it
    runs on the CPU."""
    from types import SimpleNamespace

    from PIL import Image

    from runtime.serve import app as app_module

    calls = []

    def pipe(prompts, **kw):
        calls.append((list(prompts), [g.initial_seed() for g in kw["generator"]]))
        images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(len(prompts))]
        return SimpleNamespace(images=images, timings={"total": 0.0})

    replica = SimpleNamespace(pipe=pipe, eager=pipe, cuda=True, buckets=[1, 2, 4, 8])
    payloads = [app_module.Payload(f"p{i}", "", 10 + i, 1, 0.0, 8, 8, False, True) for i in range(3)]
    jobs = [Job(("k",), 64, p) for p in payloads]
    out = app_module.ImageService.func_or_class._run(replica, jobs, lambda: False)
    assert calls == [(["p0", "p1", "p2", "p2"], [10, 11, 12, 12])]
    assert len(out) == 3 and [Image.open(io.BytesIO(png)).getpixel((0, 0))[0] for png, _ in out] == \
        [0, 1, 2]
    assert out[0][1]["group_size"] == 3 and out[0][1]["batch_size"] == 4
    replica.cuda = False  # on the CPU a call runs at its own size
    calls.clear()
    app_module.ImageService.func_or_class._run(replica, jobs, lambda: False)
    assert calls[0][0] == ["p0", "p1", "p2"]


def test_preflight_checks_the_menu_against_the_checkpoint_before_ray_starts():
    from argparse import Namespace

    from runtime.serve.__main__ import exposure_warnings, preflight

    preflight(ServeConfig(ckpt="tiny"))  # the default menu of the bundled model: 32x32, 32x48, 48x32
    for sizes, match in (("30x30", "--sizes 30x30: height must be a positive multiple of the VAE scale factor 4"),
                         ("5000x32", "--sizes 5000x32: 32x5000 px: a side over")):
        with pytest.raises(InvalidInputError, match=match):
            preflight(ServeConfig(ckpt="tiny", sizes=sizes))
    assert preflight(ServeConfig(ckpt="tiny", sizes="64x64,32x32")) is None
    args = Namespace(host="0.0.0.0", ssl_keyfile=None, api_key=None)
    said = exposure_warnings(args, GateConfig())
    assert len(said) == 3 and all(line.startswith("warning: --host 0.0.0.0 without") for line in said)
    assert exposure_warnings(Namespace(host="127.0.0.1", ssl_keyfile=None, api_key=None), GateConfig()) == []


@pytest.mark.parametrize("backend", ["auto", "torch", "aoti", "onnxruntime", "tensorrt"])
def test_replicas_keep_a_cuda_graph_for_every_menu_shape(backend):
    """Every backend that captures CUDA graphs is given room for all the menu's shapes on a GPU (none captured under
    traffic); none on the CPU."""
    pytest.importorskip("ray")
    from runtime.serve.app import graph_options

    config = ServeConfig(backend=backend, device="cuda", max_batch=16, sizes="512x512,512x768,768x512,640x640")
    assert graph_options(config) == {"max_graphs": 2 * 4 * 6 + 2}  # 4 sizes x 6 batch buckets, guided or not
    assert graph_options(ServeConfig(backend=backend, device="cuda")) == {"max_graphs": 2 * 3 * 5 + 2}  # defaults
    assert graph_options(ServeConfig(backend=backend, device="cpu")) == {}
