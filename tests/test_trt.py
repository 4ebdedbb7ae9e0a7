"""TensorRT: without TensorRT or a GPU the ONNX export still happens and one line says what is missing; with both,
engines are built, compared with onnxruntime and used by the runtime (those tests skip only where TensorRT or a
GPU is absent)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from export.trt import main

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT and a GPU are present")
def test_without_tensorrt_exports_onnx_then_exits_2(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "engines"
    assert main(["--ckpt", str(tiny_ckpt), "-o", str(out), "--max-batch", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert ("TensorRT is not installed" in err) or ("no CUDA GPU" in err)
    doc = json.loads((out / "manifest.json").read_text())
    assert set(doc["components"]) == {"text_encoder", "unet", "vae_decoder", "onestep"}
    assert doc["settings"]["dynamic_hw"] and doc["verification"]["passed"]


def test_bad_batch_range(tiny_ckpt, tmp_path, capsys):
    assert main(["--ckpt", str(tiny_ckpt), "-o", str(tmp_path), "--min-batch", "4", "--max-batch", "2"]) == 2
    assert "--min-batch <= --max-batch" in capsys.readouterr().err


def test_tensorrt_backend_unavailable_is_one_line(tiny_ckpt, tmp_path):
    from runtime import BackendUnavailableError, Pipeline

    if HAVE_TRT:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(BackendUnavailableError) as info:
        Pipeline.from_pretrained(tiny_ckpt, backend="tensorrt", export_dir=tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT and a GPU")
def test_engines_build_and_match_torch(tiny_ckpt, tmp_path):
    from export.trt import build
    from runtime import InvalidInputError, Pipeline

    engines = build(str(tiny_ckpt), tmp_path, min_batch=1, max_batch=2)
    assert all(e["max_rel_err"] <= 2e-2 for e in engines["components"].values())
    ref = Pipeline.from_pretrained(tiny_ckpt, device="cpu")
    from runtime.backends.tensorrt_backend import _have_cuda_python

    graphs = [False] + ([True] if _have_cuda_python() else [])
    for cuda_graph in graphs:
        trt_pipe = Pipeline.from_pretrained(tiny_ckpt, device="cuda", backend="tensorrt", export_dir=tmp_path,
                                            cuda_graph=cuda_graph)
        assert trt_pipe.backend.cuda_graph == cuda_graph
        for kwargs in (dict(), dict(num_inference_steps=3, guidance_scale=1.5)):
            for prompts in (["a cat", "a dog"], ["a bird"], ["a fish", "a cow"]):  # graphs replay new inputs
                a = ref(prompts, seed=0, output_type="pt", **kwargs).images
                b = trt_pipe(prompts, seed=0, output_type="pt", **kwargs).images.cpu()
                assert (a - b).abs().max() < 3e-2, (cuda_graph, kwargs, prompts)
        with pytest.raises(InvalidInputError, match="outside what the"):
            trt_pipe(["a"] * 3, seed=0)
    with pytest.raises(Exception, match="built for"):
        doc = json.loads((tmp_path / "engines.json").read_text())
        doc["gpu"] = "another GPU"
        (tmp_path / "engines.json").write_text(json.dumps(doc))
        Pipeline.from_pretrained(tiny_ckpt, device="cuda", backend="tensorrt", export_dir=tmp_path)
