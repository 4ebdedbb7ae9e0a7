"""Checkpoint resolution: aliases, hub cache, local folders, and every broken-checkpoint error."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime import ALIASES, CheckpointError, Pipeline, resolve
from runtime.checkpoints import hub_id
from runtime.identity import check_safetensors


def test_aliases():
    assert ALIASES["instaflow-0.9b"] == "XCLiu/instaflow_0_9B_from_sd_1_5"
    assert ALIASES["2rf-sd1.5"] == "XCLiu/2_rectified_flow_from_sd_1_5"
    assert ALIASES["sd1.5"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert hub_id("owner/name") == "owner/name"
    assert hub_id("./owner/name") is None and hub_id("plain") is None


def test_local_folder_resolves_and_is_flow(tiny_ckpt, sd_style_ckpt):
    ck = resolve(tiny_ckpt)
    assert ck.path == tiny_ckpt and ck.is_flow and ck.repo_id is None
    assert not resolve(sd_style_ckpt).is_flow
    assert resolve("tiny").is_flow and resolve("tiny").is_bundled


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_path():
    with pytest.raises(CheckpointError, match="does not exist: /no/such/folder"):
        resolve("/no/such/folder")


def test_not_a_folder(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="is not a folder"):
        resolve(f)


def test_not_a_diffusers_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a diffusers checkpoint"):
        resolve(tmp_path)


def test_missing_component(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    shutil.rmtree(ck / "vae")
    with pytest.raises(CheckpointError, match="lacks the 'vae' component"):
        Pipeline.from_pretrained(ck)


def test_truncated_safetensors(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    f = ck / "unet" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted safetensors file .*truncated"):
        Pipeline.from_pretrained(ck)


def test_garbage_safetensors(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    (ck / "text_encoder" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupted safetensors"):
        resolve(ck)
    with pytest.raises(CheckpointError):
        check_safetensors(ck / "text_encoder" / "model.safetensors")


def test_pickle_weights_refused(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    w = ck / "vae" / "diffusion_pytorch_model.safetensors"
    w.rename(w.with_suffix(".bin"))
    with pytest.raises(CheckpointError, match="pickled weights"):
        resolve(ck)


def test_broken_model_index(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    (ck / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        resolve(ck)


def test_inconsistent_components(tiny_ckpt, odd_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path / "c")
    shutil.rmtree(ck / "text_encoder")
    shutil.copytree(odd_ckpt / "text_encoder", ck / "text_encoder")
    with pytest.raises(CheckpointError, match="inconsistent"):
        Pipeline.from_pretrained(ck)


def test_public_instaflow_layout_is_loaded(tiny_ckpt, tmp_path):
    """The public folders name RectifiedFlowPipeline and carry extra folders and a PNDM scheduler: ignored."""
    ck = _copy(tiny_ckpt, tmp_path / "instaflow")
    index = json.loads((ck / "model_index.json").read_text())
    index.update(scheduler=["diffusers", "PNDMScheduler"], safety_checker=["stable_diffusion", "X"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (ck / "model_index.json").write_text(json.dumps(index))
    for d in ("scheduler", "safety_checker", "feature_extractor"):
        (ck / d).mkdir()
    (ck / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler"}))
    pipe = Pipeline.from_pretrained(ck)
    assert len(pipe("a cat", seed=0).images) == 1


def _fake_hub_cache(root, repo, src):
    """Lay ``src`` out as the Hugging Face cache does: models--owner--name/{refs/main, snapshots/<sha>/...}."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, repo_dir / "snapshots" / sha)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(sha)
    return repo_dir / "snapshots" / sha


def test_alias_found_in_hub_cache(tiny_ckpt, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    snap = _fake_hub_cache(tmp_path, ALIASES["instaflow-0.9b"], tiny_ckpt)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    ck = resolve("instaflow-0.9b")
    assert ck.path == snap and ck.repo_id == "XCLiu/instaflow_0_9B_from_sd_1_5" and ck.is_flow
    assert resolve("XCLiu/instaflow_0_9B_from_sd_1_5").path == snap


def test_alias_missing_offline_is_one_clear_line(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        Pipeline.from_pretrained("instaflow-0.9b")
    msg = str(info.value)
    assert "XCLiu/instaflow_0_9B_from_sd_1_5" in msg and "huggingface-cli download" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("ckpt", [None, 42, ["tiny"]])
def test_checkpoint_of_the_wrong_type_is_one_line(ckpt):
    with pytest.raises(CheckpointError, match="checkpoint must be a name or a folder path") as info:
        Pipeline.from_pretrained(ckpt)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("component, key, value, match", [
    ("vae", "block_out_channels", [], r"VAE block_out_channels is \[\]"),
    ("unet", "sample_size", 0, "UNet sample_size is 0: the default image size needs a positive latent size"),
])
def test_broken_configs_blame_the_checkpoint(tiny_ckpt, tmp_path, component, key, value, match):
    """Configs that would fail deep inside torch (or be reported as the caller's size being wrong) are the
    checkpoint's fault, said in one line at load time."""
    folder = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, folder)
    config = folder / component / "config.json"
    doc = json.loads(config.read_text())
    doc[key] = value
    config.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=match) as info:
        Pipeline.from_pretrained(folder)
    assert "is inconsistent" in str(info.value) and "\n" not in str(info.value)
