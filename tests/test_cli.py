"""``python -m runtime``: images written, stage times printed, user mistakes as one line and exit status 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def test_cli_writes_one_png_and_prints_stage_times(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["a red circle at the top left", "--ckpt", str(tiny_ckpt), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "encode" in text and "unet" in text and "decode" in text and "total" in text
    im = Image.open(out)
    assert im.size == (32, 32) and im.mode == "RGB"


def test_cli_numbers_several_images_and_matches_api(tiny_ckpt, tmp_path):
    from runtime import Pipeline

    out = tmp_path / "batch.png"
    assert main(["a cat", "a dog", "--ckpt", str(tiny_ckpt), "--num-images", "2", "--seed", "3",
                 "--steps", "2", "--guidance", "1.5", "--negative", "blurry", "-o", str(out)]) == 0
    files = sorted(tmp_path.glob("batch-*.png"))
    assert [f.name for f in files] == [f"batch-{i}.png" for i in range(4)]
    api = Pipeline.from_pretrained(tiny_ckpt)(["a cat", "a dog"], num_images_per_prompt=2, seed=3,
                                              num_inference_steps=2, guidance_scale=1.5,
                                              negative_prompt="blurry").images
    for f, im in zip(files, api):
        np.testing.assert_array_equal(np.asarray(Image.open(f)), np.asarray(im))


@pytest.mark.parametrize("args, message", [
    (["x", "--ckpt", "/no/such/ckpt"], "does not exist"),
    (["x", "--steps", "0"], "--steps must be >= 1"),
    (["x", "--guidance", "nan"], "guidance_scale must be a finite number"),
    (["x", "--height", "30"], "multiple of the VAE scale factor"),
    (["x", "-o", "/no/such/dir/out.png"], "output folder does not exist"),
    (["x", "--backend", "nope"], "unknown backend"),
    (["x", "--num-images", "0"], "--num-images must be >= 1"),
])
def test_cli_errors_are_one_line(tiny_ckpt, tmp_path, capsys, args, message):
    if "--ckpt" not in args:
        args = [*args, "--ckpt", str(tiny_ckpt)]
    if "-o" not in args:
        args = [*args, "-o", str(tmp_path / "o.png")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_unwritable_output(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    assert main(["x", "--ckpt", str(tiny_ckpt), "-o", str(tmp_path / "adir")]) == 2
    assert "is a directory" in capsys.readouterr().err
    # /proc refuses new files even for root; a read-only folder does for other users
    target = Path("/proc/out.png") if os.geteuid() == 0 else tmp_path / "ro" / "out.png"
    if os.geteuid() != 0:
        target.parent.mkdir(mode=0o500)
    assert main(["x", "--ckpt", str(tiny_ckpt), "-o", str(target)]) == 2
    assert "not writable" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_cli_subprocess_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "runtime", "x", "--ckpt", "instaflow-0.9b", "-o",
                        str(tmp_path / "o.png")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "XCLiu/instaflow_0_9B_from_sd_1_5" in r.stderr and "huggingface-cli download" in r.stderr


@pytest.mark.parametrize("argv, message", [
    ([b"a \xff cat"], b"is not valid text: it holds a lone surrogate"),  # invalid UTF-8 on the command line
    ([b"x", b"--num-images", b"1000000"], b"1000000 images in one call is over this pipeline's limit of 64"),
    ([b"x", b"--seed", str(2**64).encode()], b"seed must be in"),
])
def test_cli_hostile_arguments_subprocess(tiny_ckpt, tmp_path, argv, message):
    """Through a real process (argv as bytes, as a shell passes them): one line, exit 2, no traceback, quickly
    (a million output paths are never made or probed)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable.encode(), b"-m", b"runtime", *argv, b"--ckpt", str(tiny_ckpt).encode(), b"-o",
           str(tmp_path / "o.png").encode()]
    r = subprocess.run(cmd, capture_output=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2 and b"Traceback" not in r.stderr, r.stderr[-500:]
    assert r.stderr.startswith(b"error: ") and message in r.stderr and r.stderr.count(b"\n") == 1


def test_cli_output_formats_warnings_and_export_dir(tiny_ckpt, tmp_path, capsys):
    """-o names the format (JPEG, WebP, PNG; others refused); warnings are one line; --export-dir is used."""
    assert main(["a cat", "--ckpt", str(tiny_ckpt), "-o", str(tmp_path / "x.jpg")]) == 0
    assert Image.open(tmp_path / "x.jpg").format == "JPEG" and not (tmp_path / "x.jpg.png").exists()
    assert main(["a cat", "--ckpt", str(tiny_ckpt), "-o", str(tmp_path / "x.webp")]) == 0
    assert Image.open(tmp_path / "x.webp").format == "WEBP"
    capsys.readouterr()
    assert main(["a cat", "--ckpt", str(tiny_ckpt), "-o", str(tmp_path / "x.gif")]) == 2
    assert "cannot write '.gif' images" in capsys.readouterr().err
    long = " ".join(["red circle"] * 40)
    assert main([long, "--negative", "blurry", "--ckpt", str(tiny_ckpt), "-o", str(tmp_path / "w.png")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("warning: --negative is used only with guidance") for line in err)
    assert any(line.startswith("warning: 1 prompt(s) longer than the 16-token window were cut to their first 16")
               for line in err)
    assert all(line.startswith("warning: ") for line in err)  # no Python file/line/source echo

    from export.onnx import ExportSettings, export

    export(str(tiny_ckpt), tmp_path / "onnx", ExportSettings(), verify=False)
    ort = ["a cat", "--ckpt", str(tiny_ckpt), "--backend", "onnxruntime", "--export-dir", str(tmp_path / "onnx"),
           "-o", str(tmp_path / "ort.png")]
    assert main(ort) == 2  # never verified: refused in one line
    err = capsys.readouterr().err
    assert err.startswith("error: the export in ") and "--allow-unverified" in err and len(err.splitlines()) == 1
    assert main(ort + ["--allow-unverified"]) == 0
    assert "backend=onnxruntime" in capsys.readouterr().out


_COMMANDS = ["runtime.serve.__main__", "export.verify", "export.aoti", "train.reflow", "train.distill", "train.pairs",
             "train.embed", "train.metrics", "train.evaluate", "train.recipes.shapes", "benchmarks.cold_start",
             "benchmarks.layouts", "benchmarks.report", "benchmarks.profile", "benchmarks.serve_load",
             "benchmarks.train_data", "benchmarks.train_checkpoint", "benchmarks.train_memory",
             "benchmarks.engine_memory"]


@pytest.mark.parametrize("module", _COMMANDS)
def test_help_describes_the_command_in_whole_sentences(module, capsys):
    """``--help`` shows the module docstring's whole first paragraph, not its first line cut mid-sentence."""
    import importlib

    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    first_paragraph = " ".join(mod.__doc__.strip().split("\n\n")[0].split())
    assert first_paragraph.endswith((".", ":", ")")), f"{module}: its docstring's first paragraph is not a sentence"
    plain = re.sub(r":\w+:`~?", "", first_paragraph).replace("`", "")  # without reStructuredText markup
    assert plain in shown
    assert "``" not in shown and ":mod:" not in shown and ":func:" not in shown
