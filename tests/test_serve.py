"""The HTTP service (`python -m runtime.serve`), started as a real process on a free loopback port and always torn
down. Two services, one after the other: an open one (responses, seed determinism inside one batch, health, metrics,
bad and hostile input, slow clients, a full queue, a drain on SIGTERM) and a guarded one (API key over TLS, other
sizes allowed, a request timeout that stops the work, a drain on SIGINT to the whole process group).
The service's parts without a process are tested in tests/test_serve_parts.py."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="the serve extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle at the top left"
KEY = "test-key-0123456789abcdef"
JSON = {"Content-Type": "application/json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(log: Path, args: list[str], new_session: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--device", "cpu", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=new_session)
    deadline = time.time() + 240
    while "serving " not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            _stop(proc)
            pytest.fail(f"the service did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The open service: batches of up to 8 gathered for 300 ms (so concurrent requests share a batch), a replica
    holding 8 queued requests and a running call of 8, 8 more waiting in the proxy, a small size menu and fixed limits (not measured: the tests
    must not depend on this machine's speed)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = _start(log, ["--port", str(port), "--max-batch", "8", "--max-wait-ms", "300", "--max-queue", "8",
                        "--sizes", "32x32,48x32,64x64,128x128", "--max-cost", "1000000", "--max-prompt-chars", "300",
                        "--request-timeout", "60", "--body-timeout", "2", "--max-body-bytes", "8192"])
    try:
        yield f"http://127.0.0.1:{port}", proc, log
    finally:
        _stop(proc)


def _post(url: str, body: bytes | dict, timeout: float = 60, headers: dict[str, str] | None = None,
          context: ssl.SSLContext | None = None) -> tuple[int, Any, bytes]:
    """(status, headers (case-insensitive), body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/generate", data=data, method="POST", headers=headers or JSON)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _get(url: str, path: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None
         ) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers or {}), timeout=30,
                                    context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def direct():
    from runtime import Pipeline

    pipe = Pipeline.from_pretrained("tiny", device="cpu")
    return lambda prompt, seed, **kw: np.asarray(pipe(prompt, seed=seed, **kw).images[0]).astype(int)


def _same_image(a: np.ndarray, b: np.ndarray) -> None:
    """The service's image is the direct call's: batched kernels may round a pixel one level the other way."""
    assert a.shape == b.shape and np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


def _error(raw: bytes) -> str:
    doc = json.loads(raw)
    assert set(doc) == {"error"} and "\n" not in doc["error"], doc
    return doc["error"]


def _count(metrics: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", metrics, re.M)
    return float(m.group(1)) if m else 0.0


def _together(n: int, call) -> list:
    """``call(i)`` for i < n from n threads released at once; the results in order."""
    barrier, results = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        barrier.wait()
        results[i] = call(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


# ------------------------------------------------------------------------------------------------ the open service
def test_png_and_json_responses_match_the_direct_call(service, direct):
    url, _, _ = service
    status, text = _get(url, "/healthz")
    doc = json.loads(text)
    assert status == 200 and doc["status"] == "ready" and doc["model"] == "tiny"
    assert doc["sizes"] == ["32x32", "48x32", "64x64", "128x128"] and doc["limits"]["max_cost"] == 1000000
    status, headers, png = _post(url, {"prompt": PROMPT, "seed": 11})
    assert status == 200 and headers["Content-Type"] == "image/png" and headers["X-Seed"] == "11"
    _same_image(_pixels(png), direct(PROMPT, 11))
    status, _, body = _post(url, {"prompt": PROMPT, "num_inference_steps": 3, "guidance_scale": 1.5,
                                  "negative_prompt": "blue", "seed": 4, "response_format": "b64_json"})
    doc = json.loads(body)
    assert status == 200 and doc["seed"] == 4 and "batch_size" in doc["timings"]
    _same_image(_pixels(base64.b64decode(doc["images"][0])),
                direct(PROMPT, 4, num_inference_steps=3, guidance_scale=1.5, negative_prompt="blue"))
    status, headers, png = _post(url, {"prompt": PROMPT})  # no seed: the server picks one and says which
    _same_image(_pixels(png), direct(PROMPT, int(headers["X-Seed"])))
    status, _, png = _post(url, {"prompt": PROMPT, "width": 48, "height": 32, "seed": 5})  # a menu size, WxH
    assert status == 200 and _pixels(png).shape == (32, 48, 3)


def test_concurrent_requests_share_a_batch_and_keep_their_seeds(service, direct):
    url, _, _ = service
    prompts = [f"a {c} circle at the center" for c in ("red", "green", "blue", "yellow")] * 2
    for attempt in range(3):  # the 8 must arrive within one 300 ms window; on a busy machine, try again
        results = _together(8, lambda i: _post(url, {"prompt": prompts[i], "seed": 100 + i,
                                                     "response_format": "b64_json"}))
        docs = [json.loads(r[2]) for r in results]
        assert all(r[0] == 200 for r in results), results
        if all(d["timings"]["group_size"] == 8 for d in docs):
            break
    else:
        pytest.fail(f"8 concurrent requests never shared one call: {[d['timings'] for d in docs]}")
    for i, d in enumerate(docs):
        assert d["seed"] == 100 + i
        _same_image(_pixels(base64.b64decode(d["images"][0])), direct(prompts[i], 100 + i))


def test_bad_input_is_one_line_before_queueing_and_the_service_keeps_serving(service):
    url, _, _ = service
    before = _get(url, "/metrics")[1]
    cases = [
        (b'{"prompt": "a cat"', 400, "malformed JSON"),
        (b"[" * 3000 + b"]" * 3000, 400, "JSON nested too deeply"),
        ({"prompt": 5}, 422, "prompt: Input should be a valid string"),
        ({"prompt": "a cat", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
        ({"prompt": "a cat", "num_inference_steps": True}, 422, "num_inference_steps: Input should be a valid int"),
        ({"prompt": "a cat", "num_inference_steps": "32"}, 422, "num_inference_steps: Input should be a valid int"),
        ({"prompt": "a cat", "height": 32.0}, 422, "height: Input should be a valid integer"),
        ({"prompt": "a cat", "num_inference_steps": 10**6}, 422, "over this pipeline's limit"),
        ({"prompt": "a cat", "height": 100000, "width": 32}, 422, "over this pipeline's limit"),
        ({"prompt": "a cat", "height": 30}, 422, "multiple of the VAE scale factor"),
        ({"prompt": "a cat", "height": 512, "width": 512}, 422, "512x512 (width x height) is not on this service's "
                                                                  "menu: 32x32, 48x32, 64x64, 128x128"),
        ({"prompt": "a cat", "height": 128, "width": 128, "num_inference_steps": 100}, 422,
         "128x128 px x 100 step(s) = 1,638,400 pixel-steps is over this service's limit of 1,000,000"),
        ({"prompt": "a cat " * 100}, 422, "prompt has 600 characters, over this service's limit of 300"),
        ({"prompt": "a cat", "guidance_scale": 1e308}, 422, "guidance_scale=1e+308 is over this service's limit"),
        ({"prompt": "a cat", "seed": 2**70}, 422, "seed"),
        ({"prompt": "a cat", "guidance_scale": "much"}, 422, "guidance_scale"),
    ]
    for body, status, match in cases:
        code, _, raw = _post(url, body)
        assert code == status and match in _error(raw), (body if isinstance(body, dict) else body[:40], code, raw)
    assert _post(url, {"prompt": PROMPT, "seed": 1})[0] == 200
    after = _get(url, "/metrics")[1]
    ok, bad = 'instaflow_requests_total{status="200"}', 'instaflow_requests_total{status="422"}'
    assert _count(after, bad) - _count(before, bad) == 14 and _count(after, ok) > _count(before, ok)
    assert _count(after, 'instaflow_requests_total{status="400"}') - \
        _count(before, 'instaflow_requests_total{status="400"}') == 2
    # none of the refused requests reached the batcher: only the good one made a pipeline call
    assert _count(after, "instaflow_batch_size_count") - _count(before, "instaflow_batch_size_count") == 1


def test_http_level_refusals_cost_no_replica(service):
    url, _, _ = service
    before = _get(url, "/metrics")[1]
    status, _, raw = _post(url, {"prompt": PROMPT}, headers={"Content-Type": "text/plain"})
    assert status == 415 and "Content-Type must be application/json" in _error(raw)
    status, _, raw = _post(url, {"prompt": PROMPT}, headers={**JSON, "Host": "attacker.example"})
    assert status == 400 and "Host 'attacker.example' is not one this service answers to" in _error(raw)
    status, _, raw = _post(url, b'{"prompt": "' + b"x" * 10000 + b'"}')
    assert status == 413 and "over this service's limit of 8,192" in _error(raw)
    for path in ("/docs", "/openapi.json", "/admin"):
        assert _get(url, path)[0] == 404
    after = _get(url, "/metrics")[1]
    gate = 'instaflow_gate_responses_total{status="%d"}'
    assert all(_count(after, gate % s) - _count(before, gate % s) >= 1 for s in (415, 400, 413, 404))
    replica = sum(_count(after, f'instaflow_requests_total{{status="{s}"}}') for s in (400, 404, 413, 415))
    assert replica == sum(_count(before, f'instaflow_requests_total{{status="{s}"}}') for s in (400, 404, 413, 415))


def test_one_bad_request_in_a_batch_fails_alone(service, direct):
    """A lone surrogate in a plain-string negative prompt and an overflowing guidance scale, sent with good guided
    requests in one batch window: each bad one gets its own 422, every good one its image."""
    url, _, _ = service
    good = {"prompt": PROMPT, "num_inference_steps": 2, "guidance_scale": 1.5, "negative_prompt": "blue"}
    bodies = [json.dumps({**good, "seed": 40 + i}).encode() for i in range(6)]
    bodies.append(json.dumps({**good, "seed": 46}).replace('"blue"', '"blue \\udcff"').encode())
    bodies.append(json.dumps({**good, "seed": 47, "guidance_scale": 1e308}).encode())
    results = _together(8, lambda i: _post(url, bodies[i]))
    assert [r[0] for r in results] == [200] * 6 + [422, 422], results
    assert "negative_prompt is not valid text" in _error(results[6][2])
    assert "guidance_scale=1e+308 is over" in _error(results[7][2])
    for i in range(6):
        _same_image(_pixels(results[i][2]), direct(PROMPT, 40 + i, num_inference_steps=2, guidance_scale=1.5,
                                                   negative_prompt="blue"))


def _slow_client(port: int, results: list, stop: threading.Event) -> None:
    """Sends its headers and then its body one byte every 0.3 s; records the status line it gets back."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{")
            s.settimeout(0.3)
            while not stop.is_set():
                try:
                    data = s.recv(200)
                    results.append(data.split(b"\r\n")[0].decode())
                    return
                except socket.timeout:
                    s.sendall(b" ")
    except OSError as e:
        results.append(f"error {e}")


def test_slow_clients_time_out_and_do_not_hold_back_others(service, direct):
    """40 clients trickling their bodies while 6 normal requests are served: the normal ones get their images, the
    slow ones 408 after --body-timeout (2 s), and none of them ever reached a replica."""
    url, _, _ = service
    port = int(url.rsplit(":", 1)[1])
    before = _get(url, "/metrics")[1]
    slow: list = []
    stop = threading.Event()
    threads = [threading.Thread(target=_slow_client, args=(port, slow, stop)) for _ in range(40)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    good = [_post(url, {"prompt": PROMPT, "seed": 200 + i}, timeout=30) for i in range(6)]
    for t in threads:
        t.join(30)
    stop.set()
    assert all(r[0] == 200 for r in good)
    _same_image(_pixels(good[0][2]), direct(PROMPT, 200))
    assert len(slow) == 40 and all(line.startswith("HTTP/1.1 408") for line in slow), slow[:3]
    after = _get(url, "/metrics")[1]
    gate = 'instaflow_gate_responses_total{status="408"}'
    assert _count(after, gate) - _count(before, gate) == 40
    replica = 'instaflow_requests_total{status="408"}'
    assert _count(after, replica) == _count(before, replica)


def test_a_full_service_answers_503_in_the_proxy_then_recovers(service):
    url, _, _ = service
    before = _get(url, "/metrics")[1]
    results = _together(48, lambda i: _post(url, {"prompt": PROMPT, "height": 128, "width": 128,
                                                  "num_inference_steps": 12, "seed": i}, timeout=120))
    codes = sorted(r[0] for r in results)
    # a replica holds 8 queued and 8 running, 8 more wait in the proxy: 24 of 48 are refused when all arrive within
    # a call's time
    assert set(codes) <= {200, 503} and codes.count(503) >= 12 and codes.count(200) >= 8, codes
    busy = next(r for r in results if r[0] == 503)
    assert busy[1]["Retry-After"] == "1" and "at capacity" in _error(busy[2])
    after = _get(url, "/metrics")[1]
    refused = _count(after, 'instaflow_gate_responses_total{status="503"}') - \
        _count(before, 'instaflow_gate_responses_total{status="503"}')
    assert refused == codes.count(503)  # counted where they were refused: in the proxy, not by a replica
    assert _count(after, 'instaflow_requests_total{status="503"}') == 0
    assert _post(url, {"prompt": PROMPT, "seed": 2})[0] == 200


def test_sigterm_drains_requests_in_flight_then_stops(service):
    """12 requests in flight (a call running, others queued) when SIGTERM reaches the main process: every one gets
    its image, a request after the signal gets 503 (or finds the port closed), and the service exits 0 soon after
    the last answer."""
    url, proc, log = service
    results: list = []
    answered: list[float] = []

    def call(i: int) -> None:
        results.append(_post(url, {"prompt": PROMPT, "height": 64, "width": 64, "num_inference_steps": 8,
                                   "seed": i}, timeout=120))
        answered.append(time.monotonic())

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    held, done, deadline = 0.0, 0, time.time() + 60  # signal once all 12 reached the replica (a busy machine is slow)
    while held + done < 12 and time.time() < deadline:
        done = len(results)  # before the metrics: a request answered in between is not counted twice
        metrics = _get(url, "/metrics")[1]
        held = sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("instaflow_queue_depth "))
        time.sleep(0.02)
    assert held + done >= 12, "the 12 requests never reached the replica"
    assert done < 12, "every request was answered before the signal: nothing left to drain"
    proc.send_signal(signal.SIGTERM)
    late: Any = None
    deadline = time.time() + 60
    while late is None and time.time() < deadline:  # once /healthz says the service drains, a new request is 503
        try:
            if _get(url, "/healthz")[0] == 503:
                late = _post(url, {"prompt": PROMPT}, timeout=10)[0]
        except (urllib.error.URLError, ConnectionError):
            late = "closed"
        time.sleep(0.05)
    for t in threads:
        t.join(120)
    assert proc.wait(90) == 0
    exited = time.monotonic()
    refused = [(r[0], r[2][:200]) for r in results if r[0] != 200]
    assert len(results) == 12 and not refused and late in (503, "closed"), (refused, late)
    assert exited - max(answered) < 30, "the service took long to stop after its last answer"
    text = log.read_text()
    assert "stopping: new requests get 503" in text and "stopping: every request answered" in text


def test_bad_command_line_is_one_line_before_ray_starts(capsys, tmp_path):
    from runtime.serve.__main__ import main

    assert main(["--max-batch", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max-batch must be an integer >= 1, got 0"
    assert main(["--max-batch", "16", "--max-queue", "8"]) == 2
    assert "--max-queue must be an integer >= --max-batch (16)" in capsys.readouterr().err
    for args, match in ((["--sizes", "512"], "--sizes takes WIDTHxHEIGHT"),
                        (["--api-key", "short"], "an API key must be at least 16 printable characters"),
                        (["--api-key-file", str(tmp_path / "none")], "cannot read the API key file"),
                        (["--ssl-keyfile", str(tmp_path / "k.pem")], "--ssl-keyfile and --ssl-certfile go together"),
                        (["--max-cost", "0"], "--max-cost must be an integer >= 1")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and match in err and "\n" not in err, err


def test_cluster_config_loads_and_builds_the_application(tmp_path):
    import importlib

    import yaml
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((ROOT / "runtime" / "serve" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(doc)
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.request_timeout_s == 60
    (app_doc,) = schema.applications
    module, attr = app_doc.import_path.split(":")
    (tmp_path / "api-key").write_text(KEY)  # the file the cluster's nodes would hold
    args = {**app_doc.args, "gate": {**app_doc.args["gate"], "api_key_file": str(tmp_path / "api-key")}}
    app = getattr(importlib.import_module(module), attr)(args)
    assert isinstance(app, serve.Application)
    (deployment,) = app_doc.deployments
    assert deployment.name == "ImageService" and deployment.ray_actor_options.num_gpus == 1
    from runtime.serve.app import deployment_options
    from runtime.serve.config import ServeConfig

    expected = deployment_options(ServeConfig.from_dict({k: v for k, v in app_doc.args.items() if k != "gate"}))
    assert deployment.max_ongoing_requests == expected["max_ongoing_requests"] == 72
    assert deployment.max_queued_requests == expected["max_queued_requests"] == 136
    assert deployment.graceful_shutdown_timeout_s == 65


# ------------------------------------------------------------------------------------------------ the guarded service
def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A key and a certificate for localhost / 127.0.0.1."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        try:
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True,
                           capture_output=True)
            return key, cert
        except (OSError, subprocess.CalledProcessError):
            pytest.skip("neither cryptography nor openssl can make a test certificate")
    pk = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pk.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
         .sign(pk, hashes.SHA256()))
    key.write_bytes(pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    return key, cert


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """An API key (from a file) over TLS, the checkpoint given as a folder path, other sizes allowed, a 5 s request
    timeout; in a session of its own, so that a test can signal its whole process group."""
    folder = tmp_path_factory.mktemp("guarded")
    key, cert = _self_signed(folder)
    (folder / "api-key").write_text(KEY + "\n")
    port = _free_port()
    log = folder / "serve.log"
    proc = _start(log, ["--ckpt", str(ROOT / "runtime" / "assets" / "tiny"), "--port", str(port), "--sizes", "32x32",
                        "--allow-other-sizes", "--max-cost", "100000000", "--request-timeout", "5",
                        "--api-key-file", str(folder / "api-key"), "--ssl-keyfile", str(key),
                        "--ssl-certfile", str(cert)], new_session=True)
    context = ssl.create_default_context(cafile=str(cert))
    try:
        yield f"https://localhost:{port}", proc, log, context
    finally:
        _stop(proc)


def _auth(key: str = KEY) -> dict[str, str]:
    return {**JSON, "Authorization": f"Bearer {key}"}


def test_guarded_service_needs_its_key_over_tls(guarded, direct):
    url, _, log, ctx = guarded
    assert "serving " in log.read_text() and "at https://" in log.read_text()
    status, text = _get(url, "/healthz", context=ctx)
    assert status == 200 and json.loads(text)["model"] == "tiny"  # the folder's name, not its path
    assert str(ROOT) not in text
    for headers in (JSON, _auth("wrong-key-0123456789abcdef"), {**JSON, "Authorization": KEY}):
        status, resp_headers, raw = _post(url, {"prompt": PROMPT}, headers=headers, context=ctx)
        assert status == 401 and "missing or wrong API key" in _error(raw)
        assert resp_headers["WWW-Authenticate"] == "Bearer"
    assert _get(url, "/metrics", context=ctx)[0] == 401
    assert _get(url, "/metrics", headers=_auth(), context=ctx)[0] == 200
    status, _, png = _post(url, {"prompt": PROMPT, "seed": 3}, headers=_auth(), context=ctx)
    assert status == 200
    _same_image(_pixels(png), direct(PROMPT, 3))
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):  # no plain HTTP on the TLS port
        _post(url.replace("https://", "http://"), {"prompt": PROMPT}, headers=_auth(), timeout=10)


def test_other_sizes_run_when_allowed(guarded, direct):
    url, _, _, ctx = guarded
    status, _, png = _post(url, {"prompt": PROMPT, "height": 64, "width": 40, "seed": 9}, headers=_auth(),
                           context=ctx)
    assert status == 200
    _same_image(_pixels(png), direct(PROMPT, 9, height=64, width=40))


def test_request_timeout_answers_408_and_stops_the_work(guarded):
    """A request that would run for a minute (allowed by its limits): 408 after the 5 s timeout, which a client
    cannot lift with Ray Serve's header, and the pipeline call stops between two steps (counted)."""
    url, _, _, ctx = guarded
    before = _get(url, "/metrics", headers=_auth(), context=ctx)[1]
    headers = {**_auth(), "x-request-timeout-seconds": "0"}
    status, _, raw = _post(url, {"prompt": PROMPT, "height": 128, "width": 128, "num_inference_steps": 1000},
                           headers=headers, context=ctx, timeout=60)
    assert status == 408 and "no answer within the service's request timeout (5 s)" in _error(raw)
    deadline = time.time() + 60
    while True:
        after = _get(url, "/metrics", headers=_auth(), context=ctx)[1]
        if _count(after, "instaflow_cancelled_calls") > _count(before, "instaflow_cancelled_calls"):
            break
        assert time.time() < deadline, "the abandoned call did not stop"
        time.sleep(0.5)
    assert _post(url, {"prompt": PROMPT, "seed": 1}, headers=_auth(), context=ctx)[0] == 200


def test_sigint_to_the_whole_process_group_drains_then_stops(guarded):
    """Ctrl-C in a terminal signals the whole process group: Ray's processes must outlive the drain, and the
    requests in flight get their images."""
    url, proc, log, ctx = guarded
    results: list = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        _post(url, {"prompt": PROMPT, "height": 64, "width": 64, "num_inference_steps": 8, "seed": i},
              headers=_auth(), context=ctx, timeout=120))) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    for t in threads:
        t.join(120)
    assert proc.wait(90) == 0
    assert sorted(r[0] for r in results) == [200] * 6, [r[:1] + (r[2][:100],) for r in results]
    assert "stopping: every request answered" in log.read_text()
