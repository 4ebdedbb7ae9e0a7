"""Cold start: a fresh process, from its start to its first image, for the ways a product or a service replica
starts the pipeline; then the steady latency in that process.

    python -m benchmarks.cold_start --subject sd15 --work DIR --out OUT/cold_start.json      (GPU)
    python -m benchmarks.cold_start --subject tiny --work DIR                                  (CPU rehearsal)
    python -m benchmarks.cold_start --subject sd15 --work DIR --prepare-only [--aoti]          (checkpoint, packages)

Cases, each in a new Python process (``python -c``), timed from before ``import runtime`` to the first image in
memory, and split into import, load (``from_pretrained``) and first call:

* ``default``: ``Pipeline.from_pretrained(ckpt)``, no options (``auto``);
* ``compile_cold``: ``compile=True`` with an empty compile cache (what every process paid before the cache);
* ``compile_warm``: ``compile=True`` again, a new process finding the cache the cold one (or, with ``--cache``,
  an earlier run such as the benchmarks') filled;
* ``aoti``: ``backend="aoti"`` over packages made by ``python -m export.aoti`` (made here when ``--aoti`` is given
  and they are missing; on a GPU that compile takes minutes).

The subject checkpoint (random weights, see :mod:`benchmarks.subjects`) is written once into ``--work``; results
are written to ``--out`` after every case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from runtime.cli import description
from runtime.files import atomic_write_json

from .subjects import PROMPT, machine_info, now

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, statistics, sys, time
t0 = time.perf_counter()
import torch
from runtime import Pipeline
t_import = time.perf_counter()
ckpt, prompt, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
pipe = Pipeline.from_pretrained(ckpt, embedding_cache_size=0, **options)
t_load = time.perf_counter()
image = pipe(prompt, seed=0).images[0]
t_first = time.perf_counter()
steady = []
for i in range(int(sys.argv[4])):
    t = time.perf_counter()
    pipe(f"{prompt} {i}", seed=i)
    steady.append(time.perf_counter() - t)
print(json.dumps({"backend": pipe.backend.name, "import_s": t_import - t0, "load_s": t_load - t_import,
                  "first_call_s": t_first - t_load, "to_first_image_s": t_first - t0,
                  "steady_median_s": statistics.median(steady) if steady else None, "size": list(image.size)}))
"""


def subject_checkpoint(name: str, work: Path) -> Path:
    """The subject's checkpoint folder in ``work`` (written once: the same weights as
    :func:`benchmarks.subjects.make_subject` builds; SD-1.5 shapes in fp16, 2 GB)."""
    from runtime.checkpoints import BUNDLED
    from runtime.models import save_checkpoint
    from runtime.builders import SD15_SPEC, SMALL_SD_SPEC, build_tiny_components

    if name == "tiny":
        return BUNDLED["tiny"]
    folder = work / name
    if not (folder / "model_index.json").is_file():
        spec = {"sd15": SD15_SPEC, "small-sd": SMALL_SD_SPEC}[name]
        comps = build_tiny_components(spec, seed=0)
        if name == "sd15":
            comps = comps.to(dtype=torch.float16)
        save_checkpoint(comps, folder)
    return folder


def aoti_dir(name: str, work: Path, autotune: bool = False) -> Path:
    """The subject's AOTInductor packages: ``aoti-NAME``, or ``aoti-NAME-autotune`` for those compiled with
    ``--autotune`` (kept apart, so that neither is timed as the other)."""
    return work / (f"aoti-{name}-autotune" if autotune else f"aoti-{name}")


def export_aoti_packages(name: str, work: Path, max_batch: int = 8, autotune: bool = False,
                         fused: bool = True) -> Path:
    """AOTInductor packages of the subject (``python -m export.aoti [--autotune]``), reused when already made;
    ``fused=False`` leaves out the fused one-step package (``--only text_encoder unet vae_decoder``: about half the
    compile; on a GPU the backend replays the UNet and decoder packages as one CUDA graph instead)."""
    from export.aoti import export_aoti

    folder = aoti_dir(name, work, autotune)
    only = None if fused else ["text_encoder", "unet", "vae_decoder"]
    export_aoti(str(subject_checkpoint(name, work)), folder, max_batch=max_batch, autotune=autotune, only=only)
    return folder


def run_case(ckpt: Path, options: dict, env: dict[str, str], rounds: int, timeout: float) -> dict:
    """One fresh process; its timings (or the error it ended with)."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, str(ckpt), PROMPT, json.dumps(options), str(rounds)],
                       capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:300], "process_s": wall}
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "process_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cold_start", description=description(__doc__))
    p.add_argument("--subject", default="sd15" if torch.cuda.is_available() else "tiny",
                   choices=["tiny", "small-sd", "sd15"])
    p.add_argument("--work", default=str(ROOT / "benchmarks" / ".work"), help="checkpoints, packages, caches")
    p.add_argument("--out", default=None, help="results JSON [WORK/cold_start.json]")
    p.add_argument("--cases", default="default,compile_cold,compile_warm,aoti")
    p.add_argument("--aoti", action="store_true", help="compile the AOTInductor packages when missing")
    p.add_argument("--aoti-unfused", action="store_true",
                   help="compile the packages without the fused one-step package (about half the compile time; on "
                        "a GPU the UNet and decoder packages are then replayed as one CUDA graph)")
    p.add_argument("--aoti-autotune", action="store_true",
                   help="compile the packages with --autotune (into aoti-SUBJECT-autotune; the cold-start case "
                        "aoti_autotune times them)")
    p.add_argument("--prepare-only", action="store_true", help="write the checkpoint (and packages), time nothing")
    p.add_argument("--rounds", type=int, default=10, help="steady calls after the first image [10]")
    p.add_argument("--timeout", type=float, default=600, help="seconds per process [600]")
    p.add_argument("--cache", default=None, help="INSTAFLOW_CACHE of the compile cases [a new, empty one]")
    args = p.parse_args(argv)
    if args.subject == "sd15" and not torch.cuda.is_available():
        print("error: the sd15 subject needs a CUDA GPU", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = subject_checkpoint(args.subject, work)
    if args.aoti and not (aoti_dir(args.subject, work, args.aoti_autotune) / "manifest.json").is_file():
        export_aoti_packages(args.subject, work, autotune=args.aoti_autotune, fused=not args.aoti_unfused)
    if args.prepare_only:
        return 0
    out = Path(args.out) if args.out else work / "cold_start.json"
    doc = {"cold_start": True, "date": now(), "machine": machine_info(), "subject": args.subject, "command": " ".join(
        ["python -m benchmarks.cold_start", *(argv if argv is not None else sys.argv[1:])]), "rounds": args.rounds,
        "cases": {}}
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    base_env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    cache = work / f"cache-{args.subject}-{int(time.time())}"  # a cache no earlier run filled
    compiled = args.cache or str(cache / "compiled")
    plans = {"default": ({}, {"INSTAFLOW_CACHE": str(cache / "plain")}),
             "compile_cold": ({"compile": True}, {"INSTAFLOW_CACHE": compiled}),
             "compile_warm": ({"compile": True}, {"INSTAFLOW_CACHE": compiled}),
             "aoti": ({"backend": "aoti", "export_dir": str(aoti_dir(args.subject, work))},
                      {"INSTAFLOW_CACHE": str(cache / "plain")}),
             "aoti_autotune": ({"backend": "aoti", "export_dir": str(aoti_dir(args.subject, work, True))},
                               {"INSTAFLOW_CACHE": str(cache / "plain")})}
    for case in [c for c in args.cases.split(",") if c]:
        if case not in plans:
            print(f"error: unknown case {case!r}; choose from {', '.join(plans)}", file=sys.stderr)
            return 2
        tuned = case == "aoti_autotune"
        if case.startswith("aoti") and not (aoti_dir(args.subject, work, tuned) / "manifest.json").is_file():
            doc["cases"][case] = {"error": "no AOTInductor packages (pass --aoti" + (" --aoti-autotune" if tuned
                                                                                     else "") + " to compile them)"}
            continue
        options, env = plans[case]
        result = run_case(ckpt, options, {**base_env, **env}, args.rounds, args.timeout)
        doc["cases"][case] = result
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}
        print(f"[{case}] {shown}", flush=True)
        atomic_write_json(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
