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

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .errors import CheckpointError, InvalidInputError

if TYPE_CHECKING:
    from .decoders import Decoder

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

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: a local diffusers folder plus what its ``model_index.json`` says, the tiny VAE
    decoder used instead of its own when one was asked for (:mod:`runtime.decoders`), and the LoRAs fused into its
    weights when they are loaded (:mod:`runtime.lora`)."""

    name: str
    path: Path
    index: dict[str, Any] = field(repr=False)
    repo_id: str | None = None
    decoder: "Decoder | None" = None
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
        for f in weight_files(folder):
            check_safetensors(f)
    return ckpt


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding one component's weights (single file or sharded with an index).

    Raises :class:`CheckpointError` when there are none; pickled ``.bin`` weights are refused, never loaded.
    """
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"unreadable shard index {indexes[0]}: {e}") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder} is missing weight shards: {', '.join(missing)}")
        return files
    files = sorted(f for f in folder.glob("*.safetensors") if len(f.suffixes) == 1)  # not the .fp16. variants
    if files:
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")):
        raise CheckpointError(
            f"{folder} holds only pickled weights (.bin/.ckpt); instaflow-rt loads safetensors only "
            "(convert them with a trusted tool first)"
        )
    raise CheckpointError(f"no safetensors weights in {folder}")


def check_safetensors(path: Path) -> None:
    """Check that a safetensors file is whole: a readable header whose tensors end exactly at the end of the file.

    Catches truncated downloads and most corruption without reading the tensor data.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or n > min(size - 8, _MAX_SAFETENSORS_HEADER):
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupted safetensors file {path} ({e})") from None
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        raise CheckpointError(
            f"corrupted safetensors file {path}: {size} bytes, header says {expected} (truncated download?)"
        )


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
