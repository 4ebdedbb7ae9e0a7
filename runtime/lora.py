"""LoRA adapters, fused into the weights: a styled pipeline runs as fast as the base one and exports as plain graphs.

Files are read by diffusers' own LoRA loader (``lora_state_dict``: diffusers, kohya and A1111 key layouts) and
injected through peft (``load_lora_into_unet`` / ``load_lora_into_text_encoder``); each adapted layer then gets
``scale x`` its LoRA delta added to its weight in place, and the peft wrapper is removed, so no adapter code runs at
inference and tensors keep their addresses (captured CUDA graphs and compiled modules stay valid). The weights
before the first adapter are kept, for the adapted layers only, so :meth:`Fuser.unload` restores them bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoints import Checkpoint, hub_id, snapshot
from .errors import CheckpointError
from .identity import check_safetensors

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors",)


def resolve_lora(ref: str | os.PathLike[str]) -> Path:
    """A LoRA safetensors file: given directly, in a folder (``pytorch_lora_weights.safetensors`` or the only
    ``.safetensors`` there), or from a hub id (Hugging Face cache; offline one line). Pickles are refused."""
    if not isinstance(ref, (str, os.PathLike)) or not os.fspath(ref):
        raise CheckpointError(f"a LoRA is a file, a folder or a hub id, got {ref!r}")
    name = os.fspath(ref)
    path = Path(name).expanduser()
    if not path.exists():
        repo = hub_id(name)
        if repo is None:
            raise CheckpointError(f"LoRA not found: {name} (neither a file, a folder nor a hub id owner/name)")
        path = snapshot(name, repo, ["*.safetensors"])
    if path.is_dir():
        files = [path / n for n in LORA_WEIGHT_NAMES if (path / n).is_file()] or sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(f"{path} holds {len(files)} safetensors files; name the LoRA file itself")
        path = files[0]
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: LoRAs are loaded from safetensors only (never pickles)")
    check_safetensors(path)
    return path


def parse_loras(lora: Any) -> list[tuple[str, float]]:
    """``lora=`` as given (``"file"``, ``("file", 0.8)`` or a list of them; CLI ``FILE[:SCALE]``) -> (ref, scale)."""
    import math

    items = lora if isinstance(lora, (list, tuple)) and not _is_pair(lora) else [lora]
    out = []
    for item in items:
        ref, scale = item if _is_pair(item) else (item, 1.0)
        if isinstance(ref, str) and ":" in ref and not Path(ref).exists():
            head, _, tail = ref.rpartition(":")
            try:
                ref, scale = head, float(tail)
            except ValueError:
                pass
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise CheckpointError(f"a LoRA scale must be a finite number, got {scale!r}")
        out.append((ref, float(scale)))
    return out


def _is_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], (int, float)) and not isinstance(x[1], bool)


def with_loras(checkpoint: Checkpoint, lora: Any) -> Checkpoint:
    """``checkpoint`` with these LoRAs (resolved, hashed) to fuse when its components are loaded; unchanged when
    None or empty."""
    if not lora:
        return checkpoint
    return dataclasses.replace(checkpoint, loras=tuple(lora_identity(resolve_lora(ref), scale)
                                           for ref, scale in parse_loras(lora)))


def lora_identity(path: Path, scale: float) -> dict[str, Any]:
    """What exports record about a fused LoRA."""
    return {"file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "scale": scale}


class Fuser:
    """Fuses LoRAs into a set of components, and takes them out again exactly."""

    def __init__(self, components: Any) -> None:
        self.components = components
        self.fused: list[dict[str, Any]] = []  # identities, in loading order
        self._originals: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def load(self, ref: str | os.PathLike[str], scale: float = 1.0) -> dict[str, Any]:
        """Fuse the LoRA ``ref`` (file, folder or hub id) at ``scale``; returns its identity with which parts it
        changed."""
        ((ref, scale),) = parse_loras([(ref, scale)])  # the scale checked where every LoRA argument is
        return self.fuse(lora_identity(resolve_lora(ref), scale))

    def fuse(self, lora: dict[str, Any]) -> dict[str, Any]:
        """Fuse a LoRA already resolved (:func:`lora_identity`: a checkpoint's ``loras``), without reading it
        twice; returns its identity with which parts it changed."""
        try:
            import peft  # noqa: F401
        except ImportError:
            raise CheckpointError("LoRAs need peft: pip install 'instaflow-rt[lora]'") from None
        path = Path(lora["file"])
        state, alphas, metadata = self._read(path)
        name = f"lora{len(self.fused)}"
        changed = {}
        for part, prefix in (("unet", "unet."), ("text_encoder", "text_encoder.")):
            keys = {k: v for k, v in state.items() if k.startswith(prefix)}
            if keys:
                changed[part] = self._fuse(part, keys, alphas, metadata, name, float(lora["scale"]), path)
        if not changed:
            raise CheckpointError(f"{path} holds no UNet or text-encoder LoRA weights diffusers can read")
        identity = {**lora, "layers": changed}
        self.fused.append(identity)
        return identity

    def unload(self) -> bool:
        """Restore the weights from before the first LoRA, bit for bit; whether the text encoder changed."""
        modules = {"unet": self.components.unet, "text_encoder": self.components.text_encoder}
        with torch.no_grad():
            for (part, qualname), (weight, bias) in self._originals.items():
                layer = modules[part].get_submodule(qualname)
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
        text = any(part == "text_encoder" for part, _ in self._originals)
        for model in modules.values():
            refresh_fused_projections(model)
        self._originals.clear()
        self.fused.clear()
        return text

    # ---------------------------------------------------------------------------------------------- internals
    @staticmethod
    def _read(path: Path) -> tuple[dict[str, torch.Tensor], Any, Any]:
        """(weights, kohya-style alphas, the adapter configs saved with the file: alpha and rank come from them)."""
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        try:
            return StableDiffusionLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        except Exception as e:  # noqa: BLE001 - the loader's errors for unreadable or unknown layouts vary
            raise CheckpointError(f"cannot read the LoRA {path}: {str(e).splitlines()[0][:200]}") from None

    def _fuse(self, part: str, state: dict[str, torch.Tensor], alphas: Any, metadata: Any, name: str, scale: float,
              path: Path) -> int:
        from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = getattr(self.components, part)
        try:
            if part == "unet":
                Loader.load_lora_into_unet(state, alphas, model, adapter_name=name, metadata=metadata or None)
            else:
                _inject_text_encoder(state, alphas, metadata, model, name)
        except Exception as e:  # noqa: BLE001 - peft/diffusers raise ValueError/RuntimeError/KeyError for a misfit
            self._strip(model)
            raise CheckpointError(f"the LoRA {path.name} does not fit this checkpoint's {part}: "
                                  f"{str(e).splitlines()[0][:200]}") from None
        layers = [(q, m) for q, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        if not layers:
            self._strip(model)
            raise CheckpointError(f"the LoRA {path.name} matches no layer of this checkpoint's {part}")
        with torch.no_grad():
            for qualname, layer in layers:
                base = layer.get_base_layer()
                if (part, qualname) not in self._originals:
                    self._originals[(part, qualname)] = (base.weight.detach().clone(),
                                                         None if base.bias is None else base.bias.detach().clone())
                delta = layer.get_delta_weight(name).float() * scale
                base.weight.add_(delta.reshape(base.weight.shape).to(base.weight.dtype))
        self._strip(model)
        refresh_fused_projections(model)
        return len(layers)

    @staticmethod
    def _strip(model: torch.nn.Module) -> None:
        """Put every layer's base module back in place of its peft wrapper and forget the adapter configs."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for qualname, layer in [(q, m) for q, m in model.named_modules() if isinstance(m, BaseTunerLayer)]:
            parent_name, _, child = qualname.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer.get_base_layer())
        for attr in ("peft_config", "_hf_peft_config_loaded"):  # set on the instance by the loaders
            vars(model).pop(attr, None)


def refresh_fused_projections(model: torch.nn.Module) -> None:
    """Copy the query/key/value weights into the fused projections of attention layers that have them (diffusers'
    ``fuse_qkv_projections`` concatenates them into ``to_qkv`` or, for cross-attention, ``to_kv``, and runs those
    instead), in place: tensors keep their addresses, so captured CUDA graphs and compiled modules stay valid."""
    with torch.no_grad():
        for m in model.modules():
            if not getattr(m, "fused_projections", False):
                continue
            for fused, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_kv", ("to_k", "to_v"))):
                target = getattr(m, fused, None)
                if target is None:
                    continue
                target.weight.copy_(torch.cat([getattr(m, p).weight for p in parts]))
                if target.bias is not None:
                    target.bias.copy_(torch.cat([getattr(m, p).bias for p in parts]))


def _inject_text_encoder(state: dict[str, torch.Tensor], alphas: Any, metadata: Any, model: torch.nn.Module,
                         name: str) -> None:
    """diffusers' text-encoder LoRA loading, with peft injecting the layers itself: diffusers goes through
    transformers' ``load_adapter``, which asks for a newer peft than some environments have."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    state = {k.removeprefix("text_encoder."): v for k, v in state.items()}
    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    if not hasattr(model, "text_model"):  # flattened CLIPTextModel in recent transformers
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    rank = {k: v.shape[1] for k, v in state.items() if k.endswith("lora_B.weight")}
    alphas = {k.removeprefix("text_encoder."): v for k, v in (alphas or {}).items() if k.startswith("text_encoder.")}
    saved = {k.removeprefix("text_encoder."): v for k, v in (metadata or {}).items() if k.startswith("text_encoder.")}
    if saved:  # the adapter's own config, saved with the file
        fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        config = LoraConfig(**{k: v for k, v in saved.items() if k in fields and k not in ("peft_type", "task_type")})
    else:
        config = LoraConfig(**get_peft_kwargs(rank, alphas or None, state, is_unet=False))
    inject_adapter_in_model(config, model, adapter_name=name)
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{len(unexpected)} LoRA weights match no layer, e.g. {unexpected[0]}")
