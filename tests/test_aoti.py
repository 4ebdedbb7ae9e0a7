"""AOTInductor: `python -m export.aoti` compiles the four graphs once (CPU here: C++; CUDA on a GPU), verified
against PyTorch like ONNX graphs; the `aoti` backend loads them without compiling, takes every batch and size of
their profile (dynamic dimensions really dynamic), refuses what they were not compiled for in one line, and `auto`
uses them. One compile of a micro model serves the module (the compile of each graph costs tens of seconds here)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from export.aoti import export_aoti, main
from runtime import BackendUnavailableError, ExportError, InvalidInputError, Pipeline
from runtime import cache
from runtime.backends import aoti_backend, choose
from runtime.manifest import read_manifest, write_manifest
from runtime.builders import TinySpec, write_tiny_checkpoint

#: the smallest model the graphs make sense for: compiles in about a third of the bundled model's time
MICRO = TinySpec(sample_size=4, unet_channels=(8, 16), attention_head_dim=4, unet_groups=4, text_hidden=16,
                 text_layers=1, text_heads=2, vae_channels=(8, 8), vae_groups=4, max_length=8)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """(checkpoint, packages folder, manifest): all four graphs compiled for the CPU, up to 3 images a call."""
    root = tmp_path_factory.mktemp("aoti")
    ckpt = write_tiny_checkpoint(root / "micro", MICRO, seed=5)
    manifest = export_aoti(str(ckpt), root / "pkg", device="cpu", max_batch=3)
    return ckpt, root / "pkg", manifest


@pytest.fixture(scope="module")
def reference(micro):
    return Pipeline.from_pretrained(micro[0], device="cpu", backend="torch")


def test_packages_are_verified_and_recorded(micro):
    ckpt, folder, manifest = micro
    assert manifest.kind == "aoti" and manifest.verification.passed
    assert set(manifest.components) == {"text_encoder", "unet", "vae_decoder", "onestep"}
    assert manifest.target == cache.device_target(torch.device("cpu"))
    assert manifest.target.torch == torch.__version__.split("+")[0]
    rows = manifest.verification.rows
    assert {r["shape"] for r in rows if r["component"] == "unet"} == {"B=1 4x4", "B=2 4x4", "B=1 6x2"}
    assert all(r["max_rel_err"] <= 1e-4 for r in rows)
    unet = manifest.components["unet"]
    assert unet.file == "unet.pt2" and unet.dtype == "float32"
    assert unet.profile["sample"][2] == (6, 4, 8, 8)  # guidance doubles the UNet's batch; sides up to twice
    assert manifest.components["vae_decoder"].profile["latents"][2][0] == 3
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk["kind"] == "aoti" and on_disk["target"]["device"] == "cpu"


def test_backend_matches_torch_at_every_batch_and_size(micro, reference):
    """One step (the fused package), guided steps (UNet and decoder packages), batches 1-3 and other sizes: the
    packages' dynamic dimensions are really dynamic, and the images are eager torch's."""
    ckpt, folder, _ = micro
    pipe = Pipeline.from_pretrained(ckpt, backend="aoti", export_dir=folder)
    assert pipe.backend.name == "aoti" and pipe.backend.has_one_step
    assert not isinstance(pipe.components.unet, torch.nn.Module)  # no torch weights loaded
    cases = [dict(prompt=["a cat"]), dict(prompt=["a cat", "a dog", "a red circle"]),
             dict(prompt=["a cat", "a dog"], num_inference_steps=3, guidance_scale=1.5, negative_prompt="blurry"),
             dict(prompt=["a cat"], height=12, width=4), dict(prompt=["a cat", "a dog"], height=16, width=16)]
    for kwargs in cases:
        a = pipe(seed=3, output_type="pt", **kwargs).images
        b = reference(seed=3, output_type="pt", **kwargs).images
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=str(kwargs))


def test_the_one_step_path_composed_of_unet_and_decoder_packages(micro, reference):
    """Without the fused package (on a GPU the backend then replays the UNet and decoder packages as one CUDA graph,
    tests/test_gpu.py) the composed path is the fused package's computation; on the CPU, without graphs, the
    pipeline runs the packages step by step."""
    import shutil

    ckpt, folder, manifest = micro
    pipe = Pipeline.from_pretrained(ckpt, backend="aoti", export_dir=folder)
    noise = pipe.prepare_latents(2, pipe.latent_shape(*pipe.components.default_size), seed=4)
    context = pipe.encode_prompt(["a cat", "a dog"])
    fused = pipe.backend.one_step(context, noise)
    torch.testing.assert_close(pipe.backend._composed_one_step(context, noise), fused, atol=1e-5, rtol=1e-5)
    unfused = folder.parent / "unfused"
    shutil.copytree(folder, unfused)
    (unfused / "onestep.pt2").unlink()
    doc = read_manifest(unfused)
    write_manifest(unfused, dataclasses.replace(doc, components={k: v for k, v in doc.components.items()
                                                                 if k != "onestep"}))
    step_by_step = Pipeline.from_pretrained(ckpt, backend="aoti", export_dir=unfused)
    assert not step_by_step.backend.has_one_step
    a = step_by_step(["a cat", "a dog"], seed=4, output_type="pt").images
    torch.testing.assert_close(a, reference(["a cat", "a dog"], seed=4, output_type="pt").images, atol=1e-4,
                               rtol=1e-4)


def test_packages_run_single_threaded(micro, reference, monkeypatch):
    """Packages are loaded with run_single_threaded: the thread-aware run records a CUDA event per call and queries
    it at the next, which fails once a call was captured in a CUDA graph (the GPU run of tests/test_gpu.py); a
    torch whose loader lacks the option is one line."""
    import torch._inductor as inductor

    ckpt, folder, _ = micro
    real, seen = inductor.aoti_load_package, []

    def recording(path, **kwargs):
        seen.append(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(inductor, "aoti_load_package", recording)
    pipe = Pipeline.from_pretrained(ckpt, backend="aoti", export_dir=folder)
    assert len(seen) == 4 and all(k.get("run_single_threaded") is True for k in seen), seen
    torch.testing.assert_close(pipe("a cat", seed=1, output_type="pt").images,
                               reference("a cat", seed=1, output_type="pt").images, atol=1e-4, rtol=1e-4)

    def old_torch(path, device_index=-1):  # the loader before run_single_threaded
        return real(path)

    monkeypatch.setattr(inductor, "aoti_load_package", old_torch)
    with pytest.raises(ExportError, match="needs a torch whose aoti_load_package takes run_single_threaded"):
        Pipeline.from_pretrained(ckpt, backend="aoti", export_dir=folder)


def test_what_the_packages_cannot_take_is_one_line(micro):
    ckpt, folder, _ = micro
    pipe = Pipeline.from_pretrained(ckpt, backend="aoti", export_dir=folder)
    with pytest.raises(InvalidInputError, match=r"4 images in one call, but the packages in .* were built for at "
                                                r"most 3; rebuild with `python -m export.aoti --max-batch 4`"):
        pipe(["a"] * 4)
    with pytest.raises(InvalidInputError, match=r"20x8 px is outside what the packages in .* were built for "
                                                r"\(4x4 .. 16x16 px\)"):
        pipe("a cat", height=20, width=8)
    with pytest.raises(InvalidInputError, match="outside what the text_encoder package was built for"):
        pipe.backend.encode(torch.zeros(7, 8, dtype=torch.long))  # 7 texts: past the guided batch of 6


def test_auto_uses_packages_built_here_and_refuses_others(micro, monkeypatch):
    """auto takes packages compiled for this torch and device; packages of another torch version (or GPU
    architecture) are skipped with one warning by auto and refused in one line by backend="aoti"."""
    ckpt, folder, _ = micro
    checkpoint = __import__("runtime").resolve(ckpt)
    cpu = torch.device("cpu")
    assert choose("auto", cpu, checkpoint, folder, {}) == ("aoti", {})
    assert Pipeline.from_pretrained(ckpt, export_dir=folder).backend.name == "aoti"  # the default is auto
    other = dataclasses.replace(cache.device_target(cpu), torch="9.9.9")
    monkeypatch.setattr(aoti_backend, "device_target", lambda device: other)
    with pytest.warns(RuntimeWarning, match=r"aoti not used \(the packages in .* were built with torch .* this is "
                                            r"torch 9.9.9"):
        assert choose("auto", cpu, checkpoint, folder, {})[0] == "torch"
    with pytest.raises(ExportError, match="re-export with `python -m export.aoti --ckpt") as info:
        Pipeline.from_pretrained(ckpt, backend="aoti", export_dir=folder)
    assert "\n" not in str(info.value)
    arch = dataclasses.replace(cache.device_target(cpu), arch="other-isa")  # another machine's instruction set
    monkeypatch.setattr(aoti_backend, "device_target", lambda device: arch)
    with pytest.warns(RuntimeWarning, match=r"aoti not used \(the packages in .* were built with torch .* this is "
                                            r"torch .* on cpu other-isa"):
        assert choose("auto", cpu, checkpoint, folder, {})[0] == "torch"
    with pytest.raises(ExportError, match="on cpu other-isa; re-export"):
        Pipeline.from_pretrained(ckpt, backend="aoti", export_dir=folder)


def test_default_folders_keep_cuda_and_cpu_packages_apart(micro, monkeypatch, tmp_path):
    """Without -o, packages go to the export cache's folder for their kind of device, where the backend looks: a
    machine's CUDA and CPU packages of one checkpoint do not replace each other."""
    from export.aoti import AOTIExporter
    from runtime.manifest import ExportSettings

    monkeypatch.setenv("INSTAFLOW_CACHE", str(tmp_path))
    checkpoint = __import__("runtime").resolve(micro[0])
    folders = {}
    for device in ("cpu", "cuda"):
        made = AOTIExporter(ExportSettings(), torch.device(device)).default_folder(checkpoint)
        assert made == aoti_backend.AOTIBackend.folder(checkpoint, None, torch.device(device))
        folders[device] = made
    assert folders["cpu"].name.endswith("-cpu") and folders["cuda"].name.endswith("-cuda")
    assert folders["cpu"].parent == folders["cuda"].parent == tmp_path / "aoti"


def test_unverified_and_corrupted_packages(micro, tmp_path):
    import shutil

    ckpt, folder, manifest = micro
    copy = tmp_path / "pkg"
    shutil.copytree(folder, copy)
    write_manifest(copy, dataclasses.replace(read_manifest(copy), verification=None))
    with pytest.raises(ExportError, match="was never verified"):
        Pipeline.from_pretrained(ckpt, backend="aoti", export_dir=copy)
    assert Pipeline.from_pretrained(ckpt, backend="aoti", export_dir=copy, allow_unverified=True).backend.name == "aoti"
    from export.verify import verify_export

    assert verify_export(copy).verification.passed  # export.verify knows packages too, and records the outcome
    assert Pipeline.from_pretrained(ckpt, backend="aoti", export_dir=copy).backend.name == "aoti"
    data = (copy / "unet.pt2").read_bytes()
    (copy / "unet.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="unet.pt2 does not match its manifest hash"):
        Pipeline.from_pretrained(ckpt, backend="aoti", export_dir=copy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackendUnavailableError, match="no AOTInductor packages of .* compile them with"):
        Pipeline.from_pretrained(ckpt, backend="aoti", export_dir=tmp_path / "empty")
    with pytest.raises(InvalidInputError, match="export_dir .* is not a folder"):
        Pipeline.from_pretrained(ckpt, backend="aoti", export_dir=tmp_path / "none")


def test_rerun_reuses_every_package(micro, capsys):
    ckpt, folder, manifest = micro
    again = export_aoti(str(ckpt), folder, device="cpu", max_batch=3)
    out = capsys.readouterr().out
    assert out.count(": cached") == 4 and "earlier verification kept" in out
    assert again.components == manifest.components


@pytest.fixture
def refused_compiles(micro, monkeypatch, tmp_path):
    """(checkpoint, a copy of the micro packages, the Inductor settings of every compile attempted): a compile is
    refused at once, so a test sees whether the packages were reused or compiled again, and with what."""
    import shutil

    import torch._inductor

    seen: list[dict] = []

    def compile_nothing(program, package_path=None, inductor_configs=None, **kw):
        seen.append(inductor_configs)
        raise RuntimeError("not compiled in this test")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_nothing)
    ckpt, folder, _ = micro
    shutil.copytree(folder, tmp_path / "pkg")
    return ckpt, tmp_path / "pkg", seen


def test_cpu_packages_are_frozen_and_other_settings_compile_again(micro, refused_compiles, monkeypatch):
    """CPU packages are compiled with Inductor's freezing (weights as constants, prepacked for oneDNN: without it
    the small SD-shaped subject ran 1.28x slower than eager); the settings are part of each package's reuse key, so
    packages compiled otherwise are compiled again rather than reused."""
    from export.aoti import AOTIExporter

    assert all(c.key["inductor"] == {"freezing": True} for c in micro[2].components.values())
    ckpt, folder, seen = refused_compiles
    monkeypatch.setattr(AOTIExporter, "inductor_configs", lambda self: {"freezing": False})
    with pytest.raises(ExportError, match="not compiled in this test"):
        export_aoti(str(ckpt), folder, device="cpu", max_batch=3)
    assert seen and seen[0]["freezing"] is False and seen[0]["aot_inductor.metadata"]["instaflow_graph"]


def test_autotune_compiles_again_with_inductors_tuning(refused_compiles, monkeypatch, tmp_path):
    """``--autotune`` adds Inductor's slow autotuning (runtime.inductor; that torch.compile takes those settings is
    tests/test_options.py's) to every package's settings on both devices: the packages compiled without it are
    compiled again, with it."""
    import export.aoti as aoti
    from runtime.manifest import ExportSettings

    settings = ExportSettings(fp16=True, dynamic_hw=True, fused=True)
    cuda = aoti.AOTIExporter(settings, torch.device("cuda"), autotune=True).inductor_configs()
    assert cuda["max_autotune"] and cuda["conv_1x1_as_mm"] and cuda["epilogue_fusion"] is False
    assert "max_autotune" not in aoti.AOTIExporter(settings, torch.device("cuda")).inductor_configs()
    ckpt, folder, seen = refused_compiles
    with pytest.raises(ExportError, match="not compiled in this test"):  # the untuned packages are not reused
        export_aoti(str(ckpt), folder, device="cpu", max_batch=3, autotune=True)
    assert seen[0]["freezing"] is True and seen[0]["max_autotune"] is True
    got = {}
    monkeypatch.setattr(aoti, "export_aoti", lambda *a, **kw: got.update(kw))
    assert main(["--ckpt", str(ckpt), "-o", str(tmp_path / "x"), "--device", "cpu", "--autotune"]) == 0
    assert got["autotune"] is True


def test_height_and_width_set_the_size_compiled_and_verified(micro, monkeypatch, tmp_path):
    """``--height/--width`` centre the packages' dynamic range on that size: ``torch.export`` traces it (a sample
    at the default size would lie outside the range and fail), and the verification runs it and a second size
    inside the range, not the checkpoint's default."""
    import torch._inductor

    from export.compare import built_size

    ckpt, _, manifest = micro
    programs = []

    def compile_nothing(program, package_path=None, inductor_configs=None, **kw):
        programs.append(program)
        raise RuntimeError("not compiled in this test")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_nothing)
    with pytest.raises(ExportError, match="not compiled in this test"):  # 16x12 px: latents 8x6 (VAE factor 2)
        export_aoti(str(ckpt), tmp_path / "pkg", device="cpu", max_batch=3, height=16, width=12, only=["unet"])
    sample = programs[0].example_inputs[0][0]
    assert tuple(sample.shape[2:]) == (8, 6)
    ranges = {str(v.lower) + ".." + str(v.upper) for v in programs[0].range_constraints.values()}
    assert {"2..8", "1..6"} <= ranges  # latent height 4..16 = 2 * [2, 8] (the UNet's multiple 2), width 2 * [1, 6]
    assert built_size(manifest) == (4, 4)  # the default size, from the profile
    unet = manifest.components["unet"]
    moved = dataclasses.replace(unet, profile={**unet.profile, "sample": (
        (1, 4, 4, 2), (1, 4, 8, 6), (6, 4, 16, 12))})
    assert built_size(dataclasses.replace(manifest, components={"unet": moved})) == (8, 6)
    assert manifest.dims.other_size((8, 6)) == (10, 4)  # inside 4..16 x 2..12


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "CUDA is not available on this machine"),
    (["--device", "cpu", "--max-batch", "0"], "--max-batch must be >= 1"),
    (["--device", "cpu", "--height", "20"], "multiples of 8 px"),
    (["--device", "cpu", "--height", "0"], "height must be a positive multiple of the VAE scale factor"),
    (["--device", "cpu", "--width", "-8"], "width must be a positive multiple of the VAE scale factor"),
    (["--device", "cpu", "--static", "--height", "64"], "drop --height/--width, or --static"),
])
def test_cli_errors(tiny_ckpt, tmp_path, capsys, args, message):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("this machine has a GPU")
    assert main(["--ckpt", str(tiny_ckpt), "-o", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
