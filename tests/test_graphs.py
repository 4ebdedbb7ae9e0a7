"""The CUDA-graph bookkeeping every backend shares (runtime/backends/graphs.py), checked on the CPU.

A real capture needs a GPU (tests/test_gpu.py); here a stand-in capture behaves like one where it matters: it
allocates the output once and computes only when replayed, from whatever the static input buffers hold. So a
forgotten input copy gives stale images, a forgotten clone gives aliased results, a wrong key mixes shapes.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import pytest
import torch

from runtime import Pipeline
from runtime.backends.graphs import Captured, GraphCache
from runtime.backends.torch_backend import TorchBackend


def stand_in_capture(fn, log, delay: float = 0.0):
    """A capture that runs only when replayed; ``delay`` passes between the replay's launch and its reading of the
    static inputs (a GPU's asynchrony), so that unserialised callers would overwrite each other's inputs."""

    def capture(statics):
        log.append(tuple(tuple(t.shape) for t in statics))
        out = torch.full_like(fn(*statics), float("nan"))  # a captured graph has not run yet

        def replay():
            time.sleep(delay)
            out.copy_(fn(*statics))

        return Captured(statics, out, replay)

    return capture


def test_graph_cache_replays_fresh_inputs_without_aliasing():
    log = []
    cache = GraphCache(stand_in_capture(lambda a, b: a * 2 + b, log))
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    first = cache(a, b)
    torch.testing.assert_close(first, a * 2 + b)
    second = cache(b, a)  # same shapes: replayed, not recaptured, with the new values
    torch.testing.assert_close(second, b * 2 + a)
    torch.testing.assert_close(first, a * 2 + b)  # the earlier result was not overwritten
    second.zero_()
    torch.testing.assert_close(cache(b, a), b * 2 + a)  # nor does mutating a result reach the graph
    assert log == [((2, 3), (2, 3))] and len(cache) == 1
    a.add_(1)  # the caller's tensors are not the static buffers
    torch.testing.assert_close(cache(torch.ones(2, 3), torch.zeros(2, 3)), torch.full((2, 3), 2.0))


def test_graph_cache_one_graph_per_shape_and_dtype_lru():
    log = []
    cache = GraphCache(stand_in_capture(lambda x: x + 1, log), max_graphs=2)
    cache(torch.zeros(1, 4))
    cache(torch.zeros(2, 4))
    cache(torch.zeros(1, 4))
    cache(torch.zeros(1, 4, dtype=torch.float64))  # third key: evicts the least recently used, (2, 4)
    assert len(cache) == 2 and len(log) == 3
    cache(torch.zeros(1, 4))
    assert len(log) == 3
    cache(torch.zeros(2, 4))
    assert len(log) == 4
    with pytest.raises(ValueError, match="max_graphs"):
        GraphCache(stand_in_capture(lambda x: x, []), max_graphs=0)


def test_graph_cache_threads_equal_sequential():
    """Threads share one graph's static buffers: copy-in, replay and copy-out must be one critical section. The
    stand-in replay sleeps mid-way, so without the cache's lock these threads interleave and results mix (checked
    below by running the same workload with the lock disabled)."""
    inputs = [torch.randn(3, 5) for _ in range(32)]

    def run(cache):
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(cache, inputs))

    cache = GraphCache(stand_in_capture(lambda x: x.sin() * x, [], delay=0.002))
    for x, y in zip(inputs, run(cache)):
        torch.testing.assert_close(y, x.sin() * x)
    unlocked = GraphCache(stand_in_capture(lambda x: x.sin() * x, [], delay=0.002))
    unlocked.lock = nullcontext()  # what a cache without the lock would do: the test can tell
    mixed = run(unlocked)
    assert any(not torch.allclose(y, x.sin() * x) for x, y in zip(inputs, mixed))


@pytest.fixture()
def graphed_pipe(tiny_pipe):
    """The torch backend's graph path (encode + fused one step through GraphCache) with stand-in captures."""
    backend = TorchBackend(tiny_pipe.components, device=torch.device("cpu"), dtype=torch.float32)
    log = []
    backend.cuda_graph = True
    backend._one_step_graphs = GraphCache(stand_in_capture(backend._one_step_eager, log))
    backend._encode_graphs = GraphCache(stand_in_capture(backend._encode_eager, log))
    pipe = Pipeline(tiny_pipe.components, backend=backend)
    pipe.capture_log = log
    return pipe


def test_torch_graph_path_matches_eager(tiny_pipe, graphed_pipe):
    assert graphed_pipe.backend.has_one_step
    for batch in (1, 3, 1):
        prompts = [f"a red circle {i}" for i in range(batch)]
        for seed in (1, 2):
            a = tiny_pipe(prompts, seed=seed, output_type="pt").images
            b = graphed_pipe(prompts, seed=seed, output_type="pt").images
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    # one encoder graph and one one-step graph per batch size; repeated prompts came from the embedding cache
    assert sorted(len(k) for k in graphed_pipe.capture_log) == [1, 1, 2, 2]
    out = graphed_pipe("a blue square", height=64, width=32, seed=0, output_type="np").images
    assert out.shape == (1, 64, 32, 3)  # another image size: another graph


def test_torch_graph_path_threads_equal_sequential(graphed_pipe):
    from helpers import assert_threads_match_sequential

    jobs = [dict(prompt=f"a cat {i % 5}", seed=i, output_type="pt") for i in range(16)]
    assert_threads_match_sequential(graphed_pipe, jobs)


def test_text_encoder_that_cannot_be_captured_runs_eagerly(tiny_pipe, graphed_pipe):
    def refuse(statics):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    graphed_pipe.backend._encode_graphs = GraphCache(refuse)
    graphed_pipe.clear_cache()
    with pytest.warns(RuntimeWarning, match=r"text encoder cannot be captured .* \(operation not permitted"):
        b = graphed_pipe("a red circle", seed=5, output_type="pt").images
    torch.testing.assert_close(b, tiny_pipe("a red circle", seed=5, output_type="pt").images, atol=1e-5, rtol=1e-5)
    assert graphed_pipe.backend._encode_graphs is None  # decided once: no second warning, same images
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        c = graphed_pipe("a blue square", seed=5, output_type="pt").images
    torch.testing.assert_close(c, tiny_pipe("a blue square", seed=5, output_type="pt").images, atol=1e-5, rtol=1e-5)


def test_graph_cache_falls_back_when_a_capture_fails():
    """A CaptureError is not a failed call when the cache has a fallback: that shape (or, for a driver error, every
    shape) runs through the fallback from then on, the owner is told once per failure, and no capture of it is
    tried again; without a fallback the error is raised."""
    from runtime.backends.graphs import CaptureError

    log, failures = [], []
    ok = stand_in_capture(lambda x: x * 3, log)

    def capture(statics):
        if statics[0].shape[0] == 2:
            log.append("refused")
            raise CaptureError("execute_async_v3 failed while capturing")
        return ok(statics)

    cache = GraphCache(capture, fallback=lambda x: x * 3, on_capture_error=lambda e, key: failures.append(key))
    for batch in (1, 2, 2, 1, 2):
        x = torch.randn(batch, 4)
        torch.testing.assert_close(cache(x), x * 3)
    assert log == [((1, 4),), "refused"] and len(failures) == 1 and len(cache) == 1
    assert failures[0] == (((2, 4), torch.float32),) and not cache.disabled

    def driver_error(statics):
        raise CaptureError("cudaStreamBeginCapture failed: cudaErrorInsufficientDriver", everywhere=True)

    everywhere = GraphCache(driver_error, fallback=lambda x: x + 1, on_capture_error=lambda e, key: failures.append(e))
    for batch in (1, 2, 1):
        torch.testing.assert_close(everywhere(torch.zeros(batch, 4)), torch.ones(batch, 4))
    assert everywhere.disabled and len(failures) == 2
    with pytest.raises(CaptureError, match="cudaErrorInsufficientDriver"):
        GraphCache(driver_error)(torch.zeros(1, 4))
