"""pytest-benchmark plumbing: rounds, a session store of medians, the ratio gate and the results file.

Options (all optional):
  --bench-quick            few rounds (CI: keeps the suites working; numbers are not meaningful)
  --bench-margin 0.25      fail when a ratio exceeds its stored baseline by more than this fraction
  --bench-baseline PATH    stored baseline (default benchmarks/baseline.json)
  --bench-update-baseline  write this run's ratios (and medians) as the new baseline
  --bench-absolute         also gate absolute medians against the baseline (only on a fixed machine)
  --bench-out DIR          where the run's results JSON goes (default benchmarks/.results)
  --bench-compile          also time the torch.compile cases, ours and diffusers' (minutes of compilation)
  --bench-autotune         the compiled path with Inductor's autotuning too (with --bench-compile), and the aoti
                           packages compiled with --autotune (with --bench-aoti, or when cold_start made them)
  --bench-aoti             compile the subject's AOTInductor packages when missing (minutes) and time them
  --bench-work DIR         subject checkpoints and packages (default benchmarks/.work; see benchmarks/cold_start.py)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from runtime.files import atomic_write_json  # noqa: E402 - after the environment, which the hub reads at import

from .subjects import machine_info, now  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS: dict[str, dict] = {}  # subject -> {"description", "cases": {case: {median_s, min_s, rounds, peak_mem}}}
CALLS: dict[str, dict] = {}  # subject -> {case: (callable, rounds, device)} for the interleaved ratio runs

#: ratio name -> (numerator case, denominator case); lower is better for every one
RATIOS = {
    "ours/raw_chain": ("ours_1step", "raw_chain"),
    "ours/diffusers_1step": ("ours_1step", "diffusers_1step"),
    "ours/sd_25step_cfg": ("ours_1step", "sd_25step_cfg"),
    "onnxruntime/torch": ("ours_1step_onnxruntime", "ours_1step"),
    "ours/ours_eager": ("ours_1step", "ours_1step_eager"),  # GPU: CUDA graphs vs the same pipeline eager
    "channels_last/ours": ("ours_1step_channels_last", "ours_1step"),  # CPU: channels-last vs default format
    "compiled/ours": ("ours_1step_compiled", "ours_1step"),  # --bench-compile: torch.compile on top
    "autotuned/compiled": ("ours_1step_compiled_autotune", "ours_1step_compiled"),  # --bench-autotune too
    "compiled/diffusers_1step": ("ours_1step_compiled", "diffusers_1step"),
    "compiled/diffusers_compiled": ("ours_1step_compiled", "diffusers_compiled_1step"),  # both with the recipe
    "compiled/sd_25step_cfg": ("ours_1step_compiled", "sd_25step_cfg"),
    "aoti/ours": ("ours_1step_aoti", "ours_1step"),  # AOTInductor packages vs the default (CPU: torch eager)
    "aoti/diffusers_compiled": ("ours_1step_aoti", "diffusers_compiled_1step"),
    "ours/diffusers_compiled": ("ours_1step", "diffusers_compiled_1step"),  # the default vs diffusers' recipe
    "aoti/ours (batch 8)": ("ours_batch8_aoti", "ours_batch8"),
    "aoti autotuned/aoti": ("ours_1step_aoti_autotune", "ours_1step_aoti"),  # both sets of packages in one run
    "aoti autotuned/ours": ("ours_1step_aoti_autotune", "ours_1step"),
    "ours/diffusers_batch8": ("ours_batch8", "diffusers_batch8"),
    "taesd/ours": ("ours_1step_taesd", "ours_1step"),  # the pipeline with TAESD's decoder vs the subject's VAE
    "taesd/sd_vae (decode)": ("decode_taesd", "decode_sd_vae"),  # the decoders alone, SD's real architectures
    "fast_group_norm/ours": ("ours_1step_fast_group_norm", "ours_1step"),  # whether it joins the defaults
    "fast_group_norm/ours (batch 8)": ("ours_batch8_fast_group_norm", "ours_batch8"),
    "split/native group norm (decode)": ("decode_sd_vae_split_gn", "decode_sd_vae"),
}


def pytest_addoption(parser):
    g = parser.getgroup("instaflow benchmarks")
    g.addoption("--bench-quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1")
    g.addoption("--bench-margin", type=float, default=0.25)
    g.addoption("--bench-baseline", default=str(HERE / "baseline.json"))
    g.addoption("--bench-update-baseline", action="store_true")
    g.addoption("--bench-absolute", action="store_true")
    g.addoption("--bench-out", default=os.environ.get("BENCH_OUT", str(HERE / ".results")))
    g.addoption("--bench-compile", action="store_true", default=os.environ.get("BENCH_COMPILE") == "1")
    g.addoption("--bench-autotune", action="store_true", default=os.environ.get("BENCH_AUTOTUNE") == "1")
    g.addoption("--bench-aoti", action="store_true", default=os.environ.get("BENCH_AOTI") == "1")
    g.addoption("--bench-work", default=os.environ.get("BENCH_WORK", str(HERE / ".work")))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


@pytest.fixture
def measure(benchmark, request):
    """``measure(subject, case, fn, rounds, warmup=1, note=None)``: time ``fn`` with pytest-benchmark, record
    the median (and the peak memory of one extra call) in the session store; ``note`` says what the case ran where
    the name does not (printed under the report's table)."""
    quick = request.config.getoption("--bench-quick")

    def run(subject, case: str, fn, rounds: int, warmup: int = 1, note: str | None = None):
        import torch

        device = subject.pipe.device

        def call():
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

        r = 2 if quick else rounds
        benchmark.group = subject.name
        benchmark.extra_info.update(subject=subject.name, case=case)
        benchmark.pedantic(call, rounds=r, warmup_rounds=min(warmup, 1) if quick else warmup, iterations=1)
        from .subjects import gpu_activity, peak_memory

        stats = benchmark.stats.stats
        CALLS.setdefault(subject.name, {})[case] = (call, r)
        entry = RESULTS.setdefault(subject.name, {"description": subject.description, "cases": {}})
        peak, extra = peak_memory(call, device)
        entry["cases"][case] = {"median_s": stats.median, "min_s": stats.min, "rounds": r,
                                "peak_mem_bytes": peak, "extra_mem_bytes": extra, **({"note": note} if note else {})}
        if device.type == "cuda":  # how much of the wall time the GPU is busy, and idle between its first and last kernel
            entry["cases"][case].update(gpu_activity(fn) or {})
        save_results(request.config)  # as it goes: a run killed by its time limit keeps what it measured
        return stats.median

    return run


def interleaved_ratios(subject: str) -> tuple[dict[str, float], dict[str, float]]:
    """Time the cases that form ratios round-robin (rotating the order every round), so that both sides of a
    ratio see the same machine state, and return (ratios, interleaved medians). Block-wise pytest-benchmark
    medians drift by 10-30% on a small shared CPU; interleaving cancels most of that."""
    import statistics

    calls = CALLS.get(subject, {})
    needed = sorted({c for a, b in RATIOS.values() if a in calls and b in calls for c in (a, b)})
    times: dict[str, list[float]] = {c: [] for c in needed}
    rounds = max((calls[c][1] for c in needed), default=0)
    for r in range(rounds):
        order = needed[r % len(needed):] + needed[: r % len(needed)]
        for case in order:
            fn, case_rounds = calls[case]
            if len(times[case]) < case_rounds:
                t0 = time.perf_counter()
                fn()
                times[case].append(time.perf_counter() - t0)
    med = {c: statistics.median(v) for c, v in times.items() if v}
    ratios = {k: med[a] / med[b] for k, (a, b) in RATIOS.items() if a in med and b in med}
    return ratios, med


@pytest.fixture
def gate(request):
    """``gate(subject)``: compare this run's ratios (and optionally medians) with the stored baseline."""

    def check(subject: str) -> dict[str, float]:
        ratios, medians = interleaved_ratios(subject)
        if not ratios:
            pytest.skip(f"no {subject} cases ran in this session")
        RESULTS[subject]["ratios"] = ratios
        RESULTS[subject]["interleaved_medians_s"] = medians
        save_results(request.config)
        if request.config.getoption("--bench-quick"):
            return ratios  # too few rounds to judge; the suites still ran end to end
        path = Path(request.config.getoption("--bench-baseline"))
        baseline = json.loads(path.read_text()) if path.is_file() else {}
        stored = baseline.get(subject, {})
        margin = request.config.getoption("--bench-margin")
        failures = [f"{k}: {v:.3f} > {stored['ratios'][k]:.3f} x {1 + margin:.2f}"
                    for k, v in ratios.items() if k in stored.get("ratios", {})
                    and v > stored["ratios"][k] * (1 + margin)]
        if request.config.getoption("--bench-absolute"):
            for case, res in RESULTS[subject]["cases"].items():
                ref = stored.get("medians_s", {}).get(case)
                if ref and res["median_s"] > ref * (1 + margin):
                    failures.append(f"{case}: {res['median_s'] * 1e3:.1f} ms > {ref * 1e3:.1f} ms x {1 + margin:.2f}")
        if request.config.getoption("--bench-update-baseline"):
            baseline[subject] = {"ratios": ratios,
                                 "medians_s": {k: v["median_s"] for k, v in RESULTS[subject]["cases"].items()},
                                 "machine": machine_info(), "date": now()}
            atomic_write_json(path, baseline)
        assert not failures, f"{subject} latency regression: " + "; ".join(failures)
        return ratios

    return check


def save_results(config) -> None:
    """Write the results JSON (``gpu.json`` on a GPU, else ``cpu.json``) with everything measured so far."""
    if not RESULTS:
        return
    out = Path(config.getoption("--bench-out"))
    out.mkdir(parents=True, exist_ok=True)
    doc = {"date": now(), "machine": machine_info(), "quick": config.getoption("--bench-quick"),
           "command": " ".join(["pytest", *sys.argv[1:]]), "subjects": RESULTS}
    atomic_write_json(out / ("gpu.json" if "gpu" in doc["machine"] else "cpu.json"), doc)


def pytest_sessionfinish(session, exitstatus):
    save_results(session.config)
