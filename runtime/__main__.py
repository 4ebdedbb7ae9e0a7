"""Command line: ``python -m runtime "PROMPT" [more prompts] --ckpt tiny -o out.png``.

Writes one PNG per image (``out.png``, or ``out-0.png``, ``out-1.png``, ... when there are several) and prints the
time of each stage. User mistakes print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime", description="One-step text-to-image generation with a rectified flow (InstaFlow).")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="text prompt(s); several run as one batch")
    p.add_argument("--ckpt", default="tiny",
                   help="alias (tiny, instaflow-0.9b, 2rf-sd1.5), hub id or local diffusers folder [tiny]")
    p.add_argument("--steps", type=int, default=1, help="Euler steps (1 for InstaFlow) [1]")
    p.add_argument("--guidance", type=float, default=0.0, help="CFG scale, used when > 1 [0]")
    p.add_argument("--negative", default=None, help="negative prompt (with --guidance > 1)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; image j uses seed + j [0]")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt [1]")
    p.add_argument("--height", type=int, default=None, help="pixels [the model's default]")
    p.add_argument("--width", type=int, default=None, help="pixels [the model's default]")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... [cuda if available]")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 [fp16 on cuda, fp32 on cpu]")
    p.add_argument("--backend", default="auto",
                   help="auto (the fastest path here that needs no long compilation) | torch | onnxruntime | "
                        "tensorrt | aoti [auto]")
    p.add_argument("--compile", action="store_true",
                   help="torch backend: torch.compile the UNet and decoder (minutes once per machine, then cached)")
    p.add_argument("--export-dir", default=None,
                   help="folder of the export (ONNX graphs, TensorRT engines, AOTInductor packages) [the export "
                        "cache]")
    p.add_argument("--vae", default=None,
                   help="tiny decoder instead of the checkpoint's VAE: taesd, a hub id or a folder [the checkpoint's]")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="fuse a LoRA (file, folder or hub id) into the weights; repeat for several")
    p.add_argument("--allow-unverified", action="store_true",
                   help="run an export made with --no-verify (ONNX graphs or AOTInductor packages) [only verified "
                        "exports]")
    p.add_argument("--treat-as-flow", action="store_true",
                   help="load a diffusion-type checkpoint as if it were a flow (random test models)")
    p.add_argument("-o", "--output", default="out.png",
                   help="output image; .png, .jpg/.jpeg or .webp (no suffix: .png) [out.png]")
    return p


#: output suffix -> the PIL format written
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def output_paths(output: str | os.PathLike[str], n: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png`` ... ``out-{n-1}.png`` for several. The suffix names the format
    (:data:`FORMATS`); no suffix means PNG; another suffix is refused."""
    from .errors import InvalidInputError

    out = Path(output)
    if out.is_dir():
        raise InvalidInputError(f"output path is a directory: {out} (give a file name such as {out / 'out.png'})")
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    if out.suffix.lower() not in FORMATS:
        raise InvalidInputError(f"cannot write {out.suffix!r} images; name the output .png, .jpg or .webp")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def check_writable(paths: Sequence[Path]) -> None:
    """Fail early (before loading models) when an output file cannot be written: probe its folder for real."""
    from .errors import InvalidInputError

    for path in paths:
        parent = path.parent
        if path.is_dir():
            raise InvalidInputError(f"output path is a directory: {path}")
        if not parent.is_dir():
            raise InvalidInputError(f"output folder does not exist: {parent}")
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
            os.close(fd)
            os.unlink(probe)
            if path.exists() and not os.access(path, os.W_OK):
                raise PermissionError(path)
        except OSError:
            raise InvalidInputError(f"output path is not writable: {path}") from None


def save_image(image, path: Path) -> None:
    """Encode in memory in the format the suffix names, then write atomically (see :mod:`runtime.files`)."""
    import io

    from .files import atomic_write_bytes

    buf = io.BytesIO()
    fmt = FORMATS[path.suffix.lower()]
    image.save(buf, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    atomic_write_bytes(path, buf.getvalue())


def run(args: argparse.Namespace) -> int:
    from .errors import InvalidInputError
    from .pipeline import Pipeline

    if args.num_images < 1:
        raise InvalidInputError(f"--num-images must be >= 1, got {args.num_images}")
    if args.steps < 1:
        raise InvalidInputError(f"--steps must be >= 1, got {args.steps}")
    from .inputs import Limits

    Limits().check_images(len(args.prompts) * args.num_images)  # before one output path is made or probed
    paths = output_paths(args.output, len(args.prompts) * args.num_images)
    check_writable(paths)
    t0 = time.perf_counter()
    if args.negative is not None and not args.guidance > 1:
        warn_line(f"--negative is used only with guidance: it has no effect with --guidance {args.guidance:g} "
                  "(pass --guidance > 1, e.g. 1.5)")
    pipe = Pipeline.from_pretrained(args.ckpt, device=args.device, dtype=args.dtype, backend=args.backend,
                                    treat_as_flow=args.treat_as_flow, export_dir=args.export_dir, vae=args.vae,
                                    lora=args.lora,
                                    **({"allow_unverified": True} if args.allow_unverified else {}),
                                    **({"compile": True} if args.compile else {}))
    load_s = time.perf_counter() - t0
    pipe.profile = True
    kwargs = dict(negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  height=args.height, width=args.width, num_images_per_prompt=args.num_images, seed=args.seed)
    out = pipe(args.prompts, **kwargs)
    for image, path in zip(out.images, paths):
        save_image(image, path)
    t = out.timings
    print(f"{pipe!r} loaded in {load_s:.2f} s")
    stages = " | ".join(f"{stage} {1e3 * seconds:.1f} ms" for stage, seconds in t.items())
    print(f"{len(paths)} image(s) {image.width}x{image.height}, {args.steps} step(s): {stages}")
    for path in paths:
        print(f"wrote {path}")
    return 0


def warn_line(message: str) -> None:
    """A warning as one line on stderr (the CLI's users need the message, not Python's file and line)."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .cli import run_cli

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda message, *rest, **kw: warn_line(str(message))
        return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
