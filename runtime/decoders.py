"""The VAE decoder a pipeline uses: the checkpoint's own ``AutoencoderKL``, or a tiny one (TAESD, diffusers'
``AutoencoderTiny``) that decodes the same latents at a fraction of the cost.

A decoder is named like a checkpoint: the alias ``taesd`` (``madebyollin/taesd``), a hub id (Hugging Face cache
first; downloaded only when online) or a local folder holding ``config.json`` and safetensors weights.

Latent convention, as in diffusers' own pipelines: the decoder is given ``latents / config.scaling_factor +
shift_factor`` with *its own* config's factors. TAESD's are 1.0 and 0.0 (it takes SD's scaled latents as they are),
and like ``AutoencoderKL.decode`` its ``decode`` returns images in [-1, 1]; so :mod:`runtime.flow` serves both.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from .checkpoints import TINY_DECODER_CLASS, Checkpoint, Decoder, hub_id, snapshot
from .errors import CheckpointError
from .identity import check_safetensors, weight_files

#: Short names of tiny decoders (hub ids).
DECODER_ALIASES: dict[str, str] = {"taesd": "madebyollin/taesd"}


def vae_scale_factor(config: Any) -> int:
    """Pixels per latent cell of a decoder config: ``AutoencoderKL``: ``2 ** (len(block_out_channels) - 1)``;
    ``AutoencoderTiny``: ``upsampling_scaling_factor ** (len(decoder_block_out_channels) - 1)``."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    tiny = get("decoder_block_out_channels")
    if tiny is not None:
        return int(get("upsampling_scaling_factor", 2)) ** (len(tiny) - 1)
    return 2 ** (len(get("block_out_channels")) - 1)


def resolve_decoder(ref: str | os.PathLike[str]) -> Decoder:
    """Resolve ``taesd``, a hub id or a folder to a checked :class:`Decoder` (one line for any problem)."""
    if not isinstance(ref, (str, os.PathLike)) or not os.fspath(ref):
        raise CheckpointError(f"vae must be 'taesd', a hub id or a folder, got {ref!r}")
    name = os.fspath(ref)
    if Path(name).expanduser().exists():
        path = Path(name).expanduser()
    elif (repo := DECODER_ALIASES.get(name) or hub_id(name)) is not None:
        path = snapshot(name, repo, ["config.json", "*.safetensors"])
    else:
        raise CheckpointError(f"decoder path does not exist: {name} (and it is neither an alias "
                              f"{sorted(DECODER_ALIASES)} nor a hub id owner/name)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a decoder folder (config.json: {e})") from None
    if not isinstance(config, dict) or config.get("_class_name") != TINY_DECODER_CLASS:
        found = config.get("_class_name") if isinstance(config, dict) else None
        raise CheckpointError(f"{path} holds a {found or 'model of unknown class'}, not an {TINY_DECODER_CLASS} "
                              "(TAESD)")
    for f in weight_files(path):
        check_safetensors(f)
    return Decoder(name=name, path=path, config=config)


def with_decoder(checkpoint: Checkpoint, vae: str | os.PathLike[str] | None) -> Checkpoint:
    """``checkpoint`` with the tiny decoder ``vae`` (resolved) instead of its own VAE; unchanged when None."""
    if vae is None:
        return checkpoint
    return replace(checkpoint, decoder=resolve_decoder(vae))


def check_decoder_fits(decoder: Decoder, checkpoint_vae: Any, latent_channels: int, name: str) -> None:
    """The tiny decoder must take the UNet's latents and give images of the checkpoint's size."""
    theirs = int(decoder.config.get("latent_channels", 4))
    if theirs != latent_channels:
        raise CheckpointError(f"the decoder {decoder.name} takes {theirs} latent channels, {name}'s UNet makes "
                              f"{latent_channels}")
    if vae_scale_factor(decoder.config) != vae_scale_factor(checkpoint_vae):
        raise CheckpointError(f"the decoder {decoder.name} upsamples {vae_scale_factor(decoder.config)}x, {name}'s "
                              f"VAE {vae_scale_factor(checkpoint_vae)}x: images would change size")


def load_decoder(decoder: Decoder) -> Any:
    """The ``AutoencoderTiny`` (fp32, CPU; the caller moves it)."""
    from diffusers import AutoencoderTiny

    try:
        return AutoencoderTiny.from_pretrained(decoder.path, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"cannot load the decoder from {decoder.path}: {str(e).splitlines()[0][:200]}"
                              ) from None
