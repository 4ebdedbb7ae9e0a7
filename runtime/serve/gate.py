"""The HTTP gate: checks that cost nothing, made before a request reaches a replica (or its body is read).

It runs twice. In Ray Serve's HTTP proxy, as an ASGI middleware (:func:`proxy_middlewares`, installed through Ray's
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, configured by ``$INSTAFLOW_SERVE_GATE``), it refuses in the proxy,
before any hop to a replica:

- unknown paths (404) and methods (405); a ``Host`` not in ``allowed_hosts`` (400: DNS rebinding);
- a missing or wrong ``Authorization: Bearer`` API key (401; the key's SHA-256 is compared in constant time);
- a ``POST`` that is not ``Content-Type: application/json`` (415: a browser form cannot send that without a CORS
  preflight, which the service never grants);
- a ``Content-Length`` over ``max_body_bytes`` (413, without reading it); a body that grows past it while streamed
  (413, reading stops there) or does not arrive within ``body_timeout_s`` (408): slow clients never hold a replica;
- a request beyond ``capacity`` (503 with ``Retry-After``, before its body is read) and any request while the
  service drains (503, ``Connection: close``);
- a client that keeps being refused (more than ``refusal_rate`` refusals a second, bursts of twice that) gets each
  further refusal late (at most 10 s): it holds an idle connection instead of CPU the model needs;
- Ray Serve's own per-request overrides (``x-request-timeout-seconds``, ``x-request-disconnect-disabled``) are
  stripped, so no client lifts the request timeout.

It also turns Ray Serve's plain-text errors (503 back-pressure, 408 timeout, 500) into the service's one-line JSON
``{"error": ...}``, logs one line per client that goes away mid-body, counts its answers by status and adds them to
``GET /metrics`` (``instaflow_gate_responses_total``).

In a replica (:func:`check_request`), the same header checks run again: a deployment started without the proxy
callback (a cluster whose nodes lack the environment variable) is still closed to unauthenticated, cross-site or
oversized requests, if less cheaply.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from .config import hash_key

log = logging.getLogger("ray.serve")

#: Environment variable holding the proxy gate's configuration (JSON of :class:`GateConfig`).
GATE_ENV = "INSTAFLOW_SERVE_GATE"
#: Ray Serve's hook for HTTP proxy middlewares, and the value that installs this gate.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "runtime.serve.gate:proxy_middlewares"
#: Names of the files the CLI and the proxy gate share in ``state_dir``.
DRAIN_FLAG = "draining"
RETRY_AFTER_S = 1
_STRIPPED = {b"x-request-timeout-seconds", b"x-request-disconnect-disabled"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class GateConfig:
    """What the gate checks (see the module docstring)."""

    api_key_sha256: str | None = None  # None: no API key asked for
    allowed_hosts: list[str] | None = None  # Host header names (port ignored); None: any
    max_body_bytes: int = 65536
    body_timeout_s: float = 10.0
    request_timeout_s: float | None = None  # for the 408 message (Ray Serve's request_timeout_s)
    docs: bool = False  # /docs and /openapi.json
    state_dir: str | None = None  # where the CLI raises the drain flag and reads the gate's in-flight count
    capacity: int | None = None  # requests handed on at once by this proxy; None: Ray Serve's limits only
    api_key_file: str | None = None  # read once at start (the cluster form; the CLI passes the hash)
    refusal_rate: float = 10.0  # refusals a second answered at once per client address (bursts of twice that)

    def __post_init__(self) -> None:
        if self.api_key_sha256 is None and self.api_key_file:
            from .config import read_api_key

            key = read_api_key(key_file=self.api_key_file)
            self.api_key_sha256 = hash_key(key) if key else None
        if self.allowed_hosts is not None:
            self.allowed_hosts = [h.strip().lower().strip("[]") for h in self.allowed_hosts if h.strip()]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "GateConfig":
        raw = (os.environ if environ is None else environ).get(GATE_ENV)
        return cls(**json.loads(raw)) if raw else cls()


@dataclass(frozen=True)
class Refusal:
    """An answer the gate gives instead of the service: status, one line, extra headers."""

    status: int
    message: str
    headers: tuple[tuple[str, str], ...] = field(default=())


# routes: path -> (method, needs the API key); everything else is 404
_ROUTES = {"/v1/generate": ("POST", True), "/healthz": ("GET", False), "/metrics": ("GET", True),
           "/docs": ("GET", True), "/openapi.json": ("GET", True), "/-/healthz": ("GET", False)}


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def host_name(value: str) -> str:
    """The name part of a ``Host`` header (``[::1]:8000`` -> ``::1``, ``Example.com:443`` -> ``example.com``)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def authorized(config: GateConfig, authorization: bytes | None) -> bool:
    """``Authorization: Bearer KEY`` matches the configured key (compared as SHA-256 digests, in constant time)."""
    if config.api_key_sha256 is None:
        return True
    if not authorization:
        return False
    scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
    presented = hash_key(token.strip()) if scheme.lower() == "bearer" else ""
    return hmac.compare_digest(presented.encode(), config.api_key_sha256.encode())


def check_request(config: GateConfig, method: str, path: str, headers: Iterable[tuple[bytes, bytes]]
                  ) -> Refusal | None:
    """The header checks (route, Host, API key, Content-Type, Content-Length): a :class:`Refusal` or None."""
    headers = list(headers)
    route = _ROUTES.get(path)
    if route is None or (path in ("/docs", "/openapi.json") and not config.docs):
        return Refusal(404, f"no such path {path[:100]!r}; the service answers POST /v1/generate, GET /healthz "
                            "and GET /metrics")
    want, needs_key = route
    if method != want:
        return Refusal(405, f"{path} takes {want}, not {method[:20]}", (("Allow", want),))
    if config.allowed_hosts is not None:
        host = _header(headers, b"host")
        name = host_name(host.decode("latin-1")) if host else ""
        if name not in config.allowed_hosts:
            return Refusal(400, f"Host {name[:100]!r} is not one this service answers to (--allowed-hosts)")
    if needs_key and not authorized(config, _header(headers, b"authorization")):
        return Refusal(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                       (("WWW-Authenticate", "Bearer"),))
    if method == "POST":
        ctype = (_header(headers, b"content-type") or b"").decode("latin-1").split(";")[0].strip().lower()
        if ctype != "application/json":
            return Refusal(415, f"Content-Type must be application/json, got {ctype[:60]!r}")
        length = _header(headers, b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return Refusal(400, "malformed Content-Length")
            if n > config.max_body_bytes:
                return Refusal(413, f"a body of {n:,} bytes is over this service's limit of "
                                    f"{config.max_body_bytes:,}")
    return None


async def send_json(send: Send, status: int, message: str, headers: Iterable[tuple[str, str]] = (),
                    close: bool = False) -> None:
    """Answer ``{"error": message}`` (one line)."""
    body = json.dumps({"error": message.splitlines()[0] if message else "error"}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class BodyError(Exception):
    """The body could not be read: a refusal to send, or ``status == 0`` when the client went away."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(receive: Receive, limit: int, deadline: float) -> bytes:
    """The whole body, read as it streams in: stops at ``limit`` bytes (413) or at ``deadline`` (monotonic, 408)."""
    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BodyError(408, "the request body did not arrive in time")
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            raise BodyError(408, "the request body did not arrive in time") from None
        if message["type"] == "http.disconnect":
            raise BodyError(0, f"the client went away after {size:,} bytes of its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyError(413, f"the body is over this service's limit of {limit:,} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands over ``body`` in one message, then whatever the connection says (disconnect)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


_RAY_ERRORS = {
    503: "the service is at capacity; retry later",
    408: "no answer within the service's request timeout",
    500: "internal error (the service's log has the details)",
}


#: Statuses that count as refusals for the limiter (a slow body's 408 has waited already; 5xx are the service's).
THROTTLED = frozenset({400, 401, 404, 405, 411, 413, 415, 422, 503})


class RefusalLimiter:
    """Refusals answered per client address: ``rate`` a second, in bursts of up to ``2 x rate`` at once; beyond,
    each refusal waits its turn (at most ``max_delay_s``), so a client that sends mistakes back to back is slowed to
    ``rate`` answers a second, costing an idle connection rather than CPU. Clients without mistakes never wait.
    (Generic cell rate algorithm; at most ``max_clients`` addresses remembered, oldest forgotten first.)"""

    def __init__(self, rate: float, max_delay_s: float = 10.0, max_clients: int = 10000) -> None:
        self.rate, self.max_delay_s, self.max_clients = rate, max_delay_s, max_clients
        self._due: OrderedDict[str, float] = OrderedDict()  # when each client's next refusal is due

    def delay(self, client: str, now: float) -> float:
        """Seconds to hold this client's refusal at ``now`` (monotonic seconds)."""
        if self.rate <= 0:
            return 0.0
        interval, tolerance = 1.0 / self.rate, 2.0  # tolerance: the burst, 2 x rate refusals in 2 x rate intervals
        due = max(self._due.pop(client, now), now) + interval
        due = min(due, now + tolerance + self.max_delay_s)  # a persistent client's debt stops growing
        self._due[client] = due
        while len(self._due) > self.max_clients:
            self._due.popitem(last=False)
        return min(max(0.0, due - now - tolerance), self.max_delay_s)


class Gate:
    """The ASGI middleware (see the module docstring). One per HTTP proxy."""

    def __init__(self, app: Callable[..., Awaitable[None]], config: GateConfig | dict[str, Any] | None = None
                 ) -> None:
        self.app = app
        self.config = config if isinstance(config, GateConfig) else GateConfig(**(config or {}))
        self.open = 0  # requests inside the gate, body being read included
        self.handed_on = 0  # requests passed to the service and not answered yet
        self.responses: Counter[int] = Counter()  # answers by status (the gate's own and the service's)
        self.draining = False
        self.limiter = RefusalLimiter(self.config.refusal_rate)
        self.delayed = 0  # refusals held back by the limiter
        self._watcher: asyncio.Task | None = None
        try:
            self._watch_soon(asyncio.get_running_loop())
        except RuntimeError:  # built outside an event loop: the first request starts the watcher
            pass

    # ------------------------------------------------------------------------------------------- drain state
    def _watch_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.config.state_dir and self._watcher is None:
            self._watcher = loop.create_task(self._watch())

    async def _watch(self) -> None:
        """Every 50 ms: is the drain flag up? While draining, report how many requests are open (for the CLI)."""
        state = Path(self.config.state_dir or ".")
        report = state / f"gate-{os.getpid()}.json"
        while True:
            try:
                if not self.draining and (state / DRAIN_FLAG).exists():
                    self.draining = True
                if self.draining:
                    tmp = report.with_suffix(".tmp")
                    tmp.write_text(json.dumps({"open": self.open, "time": time.time()}))
                    os.replace(tmp, report)
            except OSError as e:  # the state folder went away: nothing to report to
                log.warning("instaflow gate: cannot use %s (%s)", state, e)
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------------------------------- requests
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":  # the service has no websocket route
                await receive()
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        if self._watcher is None:
            self._watch_soon(asyncio.get_running_loop())
        self.open += 1
        try:
            await self._http(scope, receive, send)
        finally:
            self.open -= 1

    async def _hold(self, scope: Scope, status: int) -> None:
        """Hold a refusal as long as the limiter says (see :class:`RefusalLimiter`)."""
        if status in THROTTLED:
            client = scope.get("client")
            wait = self.limiter.delay(str(client[0]) if client else "", time.monotonic())
            if wait > 0:
                self.delayed += 1
                await asyncio.sleep(wait)

    async def _refuse(self, scope: Scope, send: Send, refusal: Refusal, close: bool = False) -> None:
        self.responses[refusal.status] += 1
        await self._hold(scope, refusal.status)
        await send_json(send, refusal.status, refusal.message, refusal.headers, close=close)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        c = self.config
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in _STRIPPED]
        scope = {**scope, "headers": headers}
        method, path = scope.get("method", "GET"), scope.get("path", "")
        has_body = method == "POST"
        if self.draining:  # health checks included: a gateway takes the service out of rotation
            await self._refuse(scope, send, Refusal(503, "the service is shutting down", (("Retry-After", "5"),)),
                               close=True)
            return
        refusal = check_request(c, method, path, headers)
        if refusal is not None:
            await self._refuse(scope, send, refusal, close=has_body)
            return
        if has_body:
            if c.capacity is not None and self.handed_on >= c.capacity:
                await self._refuse(scope, send, Refusal(503, "the service is at capacity; retry later",
                                                 (("Retry-After", str(RETRY_AFTER_S)),)), close=True)
                return
            try:
                body = await read_body(receive, c.max_body_bytes, time.monotonic() + c.body_timeout_s)
            except BodyError as e:
                if e.status == 0:
                    log.info("instaflow gate: %s", e)
                    self.responses[499] += 1
                    return
                await self._refuse(scope, send, Refusal(e.status, str(e)), close=True)
                return
            if self.draining:
                await self._refuse(scope, send, Refusal(503, "the service is shutting down", (("Retry-After", "5"),)),
                                   close=True)
                return
            receive = replay(body, receive)
        later: list[Message] = []  # a refusal from the service, sent once the service is done with the request
        self.handed_on += 1
        try:
            await self.app(scope, receive, self._answers(send, path, later))
        finally:
            self.handed_on -= 1
        if later:  # held (the limiter) only now: a held refusal must not keep a replica's slot
            await self._hold(scope, int(later[0]["status"]))
            for message in later:
                await send(message)

    def _answers(self, send: Send, path: str, later: list[Message]) -> Send:
        """Wrap ``send``: count statuses; refusals the limiter throttles go to ``later``; Ray Serve's plain-text
        errors become one-line JSON; ``/metrics`` gets the gate's counters appended."""
        state: dict[str, Any] = {"start": None, "body": []}

        async def out(message: Message) -> None:
            if later or (message["type"] == "http.response.start" and int(message["status"]) in THROTTLED):
                later.append(message)
            else:
                await send(message)

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                self.responses[status] += 1
                ctype = (_header(message.get("headers", []), b"content-type") or b"").lower()
                rewrite = status >= 400 and not ctype.startswith(b"application/json")
                if rewrite or (path == "/metrics" and status == 200):
                    state["start"] = message  # held until the body is complete
                    return
                await out(message)
                return
            if message["type"] == "http.response.body" and state["start"] is not None:
                state["body"].append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                start, body = state["start"], b"".join(state["body"])
                state["start"] = None
                if start["status"] == 200:  # /metrics
                    await self._send_metrics(send, start, body)
                else:
                    await self._send_rewritten(out, start)
                return
            await out(message)

        return wrapped

    async def _send_rewritten(self, send: Send, start: Message) -> None:
        status = int(start["status"])
        message = _RAY_ERRORS.get(status, f"HTTP {status}")
        if status == 408 and self.config.request_timeout_s:
            message += f" ({self.config.request_timeout_s:g} s)"
        extra = [("Retry-After", str(RETRY_AFTER_S))] if status == 503 else []
        request_id = _header(start.get("headers", []), b"x-request-id")
        if request_id:
            extra.append(("x-request-id", request_id.decode("latin-1")))
        await send_json(send, status, message, extra)

    async def _send_metrics(self, send: Send, start: Message, body: bytes) -> None:
        lines = ["# HELP instaflow_gate_responses_total answers leaving this HTTP proxy, by status (refusals by the "
                 "gate included; 499: client gone mid-body)", "# TYPE instaflow_gate_responses_total counter"]
        lines += [f'instaflow_gate_responses_total{{status="{s}"}} {n}' for s, n in sorted(self.responses.items())]
        lines += ["# HELP instaflow_gate_delayed_refusals_total refusals held back because their client had too many",
                  "# TYPE instaflow_gate_delayed_refusals_total counter",
                  f"instaflow_gate_delayed_refusals_total {self.delayed}"]
        lines += ["# HELP instaflow_gate_open_requests requests inside this HTTP proxy's gate",
                  "# TYPE instaflow_gate_open_requests gauge", f"instaflow_gate_open_requests {self.open}"]
        body = body + ("\n".join(lines) + "\n").encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Any]:
    """Ray Serve's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): the gate, configured from
    ``$INSTAFLOW_SERVE_GATE``."""
    from starlette.middleware import Middleware

    return [Middleware(Gate, config=GateConfig.from_env())]
