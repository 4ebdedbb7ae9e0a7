"""Checkpoint resolution: names -> local diffusers folders.

A checkpoint is named by

* an alias (``instaflow-0.9b``, ``2rf-sd1.5``, ``sd1.5``, ``tiny``; see :data:`ALIASES`),
* a Hugging Face hub id (``owner/name``), looked up in the local Hugging Face cache first and downloaded only when
  the hub is reachable and ``HF_HUB_OFFLINE`` is not set,
* or a local diffusers folder (``model_index.json`` plus one sub-folder per component).

Only safetensors weights are ever loaded (never pickles), and ``trust_remote_code`` is never used. The public
InstaFlow folders name a custom ``RectifiedFlowPipeline`` in ``model_index.json`` and also carry
``safety_checker/``, ``feature_extractor/`` and a leftover PNDM ``scheduler/`` config: we load the components we
need directly and ignore the rest. ``model_index.json``'s ``_class_name`` is what tells a rectified flow
(:data:`FLOW_PIPELINE_CLASS`, written by our own checkpoints too) from a diffusion model such as SD 1.5.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

from . import identity
from .errors import CheckpointError, InvalidInputError

#: Short names for the public checkpoints (hub ids).
ALIASES: dict[str, str] = {
    "instaflow-0.9b": "XCLiu/instaflow_0_9B_from_sd_1_5",
    "2rf-sd1.5": "XCLiu/2_rectified_flow_from_sd_1_5",
    "sd1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}

#: Models shipped inside the package (aliases -> folders).
ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED: dict[str, Path] = {"tiny": ASSETS / "tiny"}

#: ``model_index.json`` ``_class_name`` of a rectified flow (InstaFlow's own pipeline class; ours write it too).
FLOW_PIPELINE_CLASS = "RectifiedFlowPipeline"

#: Components needed to generate images.
PIPELINE_COMPONENTS: tuple[str, ...] = ("tokenizer", "text_encoder", "unet", "vae")

#: Components whose content identifies a checkpoint's images (hashes, fingerprints).
IDENTITY_COMPONENTS: tuple[str, ...] = ("text_encoder", "tokenizer", "unet", "vae")

#: ``_class_name`` of the tiny decoders (TAESD) that can replace a checkpoint's VAE (:mod:`runtime.decoders`).
TINY_DECODER_CLASS = "AutoencoderTiny"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Decoder:
    """A resolved tiny VAE decoder (see :mod:`runtime.decoders`): a local folder with ``config.json`` and
    safetensors weights, used instead of a checkpoint's own VAE."""

    name: str
    path: Path
    config: dict[str, Any]

    @cached_property
    def fingerprint(self) -> str:
        """:func:`runtime.identity.folder_fingerprint` of the folder, read once."""
        return identity.folder_fingerprint(self.path)

    def identity(self) -> dict[str, str]:
        """What exports record (and compare) about the decoder they hold."""
        return {"class": TINY_DECODER_CLASS, "name": self.name, "path": str(self.path.resolve()),
                "fingerprint": self.fingerprint}


#: What exports record for a checkpoint's own VAE decoder (and what exports made before decoders were recorded hold).
OWN_DECODER: dict[str, str] = {"class": "AutoencoderKL", "name": "the checkpoint's own VAE"}


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: a local diffusers folder plus what its ``model_index.json`` says, the tiny VAE
    decoder used instead of its own when one was asked for (:mod:`runtime.decoders`), and the LoRAs fused into its
    weights when they are loaded (:mod:`runtime.lora`)."""

    name: str
    path: Path
    index: dict[str, Any] = field(repr=False)
    repo_id: str | None = None
    decoder: Decoder | None = None
    loras: tuple[dict[str, Any], ...] = ()  # LoRAs fused at load (runtime.lora.lora_identity)

    @property
    def class_name(self) -> str:
        return str(self.index.get("_class_name", ""))

    @property
    def is_flow(self) -> bool:
        """True when ``model_index.json`` names :data:`FLOW_PIPELINE_CLASS` (InstaFlow, 2-RF, our checkpoints)."""
        return self.class_name == FLOW_PIPELINE_CLASS

    @property
    def is_bundled(self) -> bool:
        return self.name in BUNDLED

    def component(self, name: str) -> Path:
        """Folder of one component (``unet``, ``vae``, ...), checked to exist."""
        folder = self.path / name
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint {self.name!r} lacks the {name!r} component (no {folder})")
        return folder

    def fingerprint(self, components: tuple[str, ...] = IDENTITY_COMPONENTS) -> str:
        """Fast identity for load-time checks (:func:`runtime.identity.hash_folder` of each component, about 1 MB
        read per weight file), covering the tiny decoder in place of the VAE and the fused LoRAs."""
        h = hashlib.sha256()
        h.update((self.path / "model_index.json").read_bytes())
        for comp in components:
            if comp == "vae" and self.decoder is not None:
                h.update(f"decoder:{self.decoder.fingerprint}".encode())
            else:
                identity.hash_folder(h, self.component(comp), comp, weights=comp != "tokenizer")
        for lora in self.loras:
            h.update(f"lora:{lora['sha256']}:{lora['scale']!r}".encode())
        return h.hexdigest()

    def content_hash(self, components: tuple[str, ...] = IDENTITY_COMPONENTS) -> str:
        """Full identity of the checkpoint's own files: its model_index, every config and every weight file of
        ``components``, each hashed in full (what an export records it was made from)."""
        h = hashlib.sha256()
        h.update((self.path / "model_index.json").read_bytes())
        for comp in components:
            folder = self.component(comp)
            files = identity.config_files(folder)
            if comp != "tokenizer":
                files += identity.weight_files(folder)
            for f in files:
                h.update(f"{comp}/{f.name}:".encode())
                h.update(identity.sha256_file(f).encode())
        return h.hexdigest()

    def decoder_identity(self) -> dict[str, str]:
        """The VAE decoder an export of this checkpoint holds (recorded in manifests and engine indexes)."""
        return self.decoder.identity() if self.decoder is not None else dict(OWN_DECODER)


def hub_id(name: str) -> str | None:
    """The hub id an alias or id stands for, or None when ``name`` is neither."""
    if name in ALIASES:
        return ALIASES[name]
    if _HUB_ID.match(name) and not name.startswith((".", "~")):
        return name
    return None


def resolve(ckpt: str | os.PathLike[str], components: Iterable[str] = PIPELINE_COMPONENTS) -> Checkpoint:
    """Resolve an alias, hub id or local folder to a validated :class:`Checkpoint`.

    Every component in ``components`` must be present, and its safetensors weights (if it has any) must be whole.
    Raises :class:`~runtime.errors.CheckpointError` with a one-line message otherwise.
    """
    components = tuple(components)
    if not isinstance(ckpt, (str, os.PathLike)):
        raise CheckpointError(f"checkpoint must be a name or a folder path (str or os.PathLike), got "
                              f"{type(ckpt).__name__}")
    name = os.fspath(ckpt)
    if not name:
        raise CheckpointError("empty checkpoint name")
    repo = None
    if name in BUNDLED:
        path = BUNDLED[name]
        if not path.is_dir():
            raise CheckpointError(f"the bundled {name!r} model is missing from the installation ({path})")
    elif Path(name).expanduser().exists():
        path = Path(name).expanduser()
    elif (repo := hub_id(name)) is not None:
        path = _from_hub(name, repo, components)
    else:
        raise CheckpointError(
            f"checkpoint path does not exist: {name} (and it is neither an alias {sorted([*ALIASES, *BUNDLED])} "
            "nor a hub id owner/name)"
        )
    return _validate(name, path, repo, components)


def _validate(name: str, path: Path, repo: str | None, components: tuple[str, ...]) -> Checkpoint:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {name!r} is not a folder: {path}")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{path} is not a diffusers checkpoint (no model_index.json)")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable {index_file}: {e}") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"unreadable {index_file}: not a JSON object")
    ckpt = Checkpoint(name=name, path=path, index=index, repo_id=repo)
    for comp in components:
        folder = ckpt.component(comp)
        if comp in ("tokenizer", "scheduler"):
            continue
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"checkpoint {name!r}: component {comp!r} has no config.json in {folder}")
        for f in identity.weight_files(folder):
            identity.check_safetensors(f)
    return ckpt


def _hub_patterns(components: Iterable[str]) -> list[str]:
    patterns = ["model_index.json"]
    for c in components:
        patterns += [f"{c}/*.json", f"{c}/*.txt", f"{c}/*.safetensors"]
    return patterns


_HUB_IGNORE = ["*.bin", "*.ckpt", "*.msgpack", "*.onnx", "*.pb", "*.h5", "*.fp16.*", "*.non_ema.*", "*.ema.*"]


def _from_hub(name: str, repo: str, components: tuple[str, ...]) -> Path:
    return snapshot(name, repo, _hub_patterns(components))


def snapshot(name: str, repo: str, patterns: list[str]) -> Path:
    """Local snapshot of the files of ``repo`` matching ``patterns``: from the cache, else downloaded unless
    offline (one line naming the hub id otherwise)."""
    from huggingface_hub import snapshot_download  # imported lazily: no hub machinery at import time

    kwargs = dict(repo_id=repo, allow_patterns=patterns, ignore_patterns=_HUB_IGNORE)
    try:
        return Path(snapshot_download(local_files_only=True, **kwargs))
    except Exception:  # noqa: BLE001 - not in the cache (the hub's error types vary across versions)
        pass
    label = f"{name!r} ({repo})" if name != repo else repo
    how = f"fetch it on a machine with internet: `huggingface-cli download {repo}` (then copy the cache or folder)"
    if _offline():
        raise CheckpointError(f"{label} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {how}")
    try:
        return Path(snapshot_download(**kwargs))
    except Exception as e:  # noqa: BLE001 - network/auth/not-found: one line for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{label} is not in the Hugging Face cache and could not be downloaded "
                              f"({reason[:200]}); {how}") from None


def _offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any((f or "").strip().lower() in {"1", "true", "yes", "on"} for f in flags)


def check_is_flow(checkpoint: Checkpoint, treat_as_flow: bool = False) -> None:
    """Refuse a diffusion checkpoint (its UNet predicts noise, not a velocity) unless told otherwise."""
    if not checkpoint.is_flow and not treat_as_flow:
        kind = checkpoint.class_name or "no _class_name"
        raise InvalidInputError(
            f"{checkpoint.name} is a diffusion model ({kind}), not a rectified flow: use it as a teacher in "
            "`train`, or pass treat_as_flow=True (e.g. for random test models)")
