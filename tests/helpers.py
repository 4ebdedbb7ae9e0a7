"""Helpers shared by test modules (tests/ is on sys.path under pytest)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch


def assert_threads_match_sequential(pipe: Any, jobs: list[dict], threads: int = 4, tol: float = 0.0) -> None:
    """``pipe(**job)`` for every job from ``threads`` threads at once gives the images of sequential calls (the
    embedding cache is cleared before each pass so that both do the same work)."""
    pipe.clear_cache()
    with ThreadPoolExecutor(threads) as pool:
        parallel = list(pool.map(lambda kw: pipe(**kw).images, jobs))
    pipe.clear_cache()
    sequential = [pipe(**kw).images for kw in jobs]
    for a, b in zip(parallel, sequential):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
