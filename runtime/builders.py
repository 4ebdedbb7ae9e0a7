"""Model builders: tiny and SD-shaped models built offline, for tests, benchmarks, the shapes recipe's teacher and
the bundled placeholder (public: users build tiny models for their own tests with these).

    >>> from runtime.builders import TinySpec, write_tiny_checkpoint          # doctest: +SKIP
    >>> folder = write_tiny_checkpoint("/tmp/tiny-flow", TinySpec(), seed=0)  # doctest: +SKIP
    >>> Pipeline.from_pretrained(folder)("a red circle")                       # doctest: +SKIP

Every shape is a :class:`TinySpec` field; :data:`SD15_SPEC` has SD 1.5's real shapes (random weights: a valid
latency subject, since latency does not depend on weight values).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoints import FLOW_PIPELINE_CLASS
from .models import Components, save_checkpoint

#: Words that get a token of their own in tiny tokenizers (the shapes-dataset grammar plus a few common words).
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "at", "of", "in", "on", "photo", "cat", "dog", "fox", "watercolor",
    "small", "large", "red", "green", "blue", "yellow", "circle", "square", "triangle", "shape",
    "top", "bottom", "left", "right", "center",
)


@dataclass
class TinySpec:
    """Shapes of a tiny text-to-image flow. Every field can be changed to make unusual checkpoints for tests."""

    sample_size: int | tuple[int, int] = 8  # latent height/width (int: square)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    unet_groups: int | None = None  # GroupNorm groups; None: min(32, first channel count)
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate: int | None = None  # None: 2 x hidden
    text_vocab: int | None = None  # embedding rows; None: the tokenizer's size (SD: 49408)
    max_length: int = 16  # tokenizer window
    vae_channels: tuple[int, ...] = (16, 32, 32)  # len - 1 = log2(VAE scale factor)
    vae_layers: int = 1
    vae_groups: int = 8
    scaling_factor: float = 0.18215
    words: Sequence[str] = field(default=TINY_WORDS)


#: SD 1.5's real shapes (UNet 860M, CLIP ViT-L/14 text encoder, VAE f8), for benchmarks with random weights.
SD15_SPEC = TinySpec(
    sample_size=64, latent_channels=4, unet_channels=(320, 640, 1280, 1280), layers_per_block=2,
    attention_head_dim=8, unet_groups=32, text_hidden=768, text_layers=12, text_heads=12, text_intermediate=3072,
    text_vocab=49408, max_length=77, vae_channels=(128, 256, 512, 512), vae_layers=2, vae_groups=32,
)

#: A small SD-shaped model for CPU benchmarks: 256x256 images, UNet (64, 128, 256) with 2 layers per block.
SMALL_SD_SPEC = TinySpec(
    sample_size=32, latent_channels=4, unet_channels=(64, 128, 256), layers_per_block=2, attention_head_dim=8,
    unet_groups=32, text_hidden=256, text_layers=4, text_heads=4, text_intermediate=1024, max_length=77,
    vae_channels=(32, 64, 128, 128), vae_layers=1, vae_groups=32,
)


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: 256 printable characters standing for the 256 byte values."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b if b in keep else next(extra)) for b in range(256)]


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one word: merge the best-ranked adjacent pair (every occurrence) until none
    applies."""
    while len(symbols) > 1:
        known = [(ranks[p], p) for p in zip(symbols, symbols[1:]) if p in ranks]
        if not known:
            break
        first, second = min(known)[1]
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == (first, second):
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def write_tiny_tokenizer(folder: str | os.PathLike[str], words: Sequence[str], max_length: int) -> Any:
    """Write a CLIP BPE tokenizer (byte-level alphabet + one merged token per word) and load it back.

    Merges are chosen by running BPE itself, so every word really becomes one token (a naive left-to-right chain
    of merges does not: ``green`` came out as four tokens after ``red`` had ranked ``r e`` first).

    Files are written and loaded with ``from_pretrained`` (ARCHITECTURE.md, "Conventions": transformers 5 ignores
    ``vocab_file=``/``merges_file=`` arguments), and the loaded vocabulary size is checked.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for tok in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(tok, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in words:  # merges that make the word one token under BPE's rank order, given the earlier merges
        while len(parts := _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)  # ranked last: words made one token earlier are unaffected
            vocab.setdefault(parts[0] + parts[1], len(vocab))
    merges = [f"{a} {b}" for a, b in ranks]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tiny tokenizer loaded with {len(tokenizer)} tokens, wrote {len(vocab)}")
    return tokenizer


def build_tiny_components(spec: TinySpec | None = None, seed: int = 0, tokenizer_dir: str | None = None
                          ) -> Components:
    """Randomly initialised tiny components (deterministic for a seed). The tokenizer is written to
    ``tokenizer_dir`` (when None, a temporary folder removed once the tokenizer is loaded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = spec or TinySpec()
    if tokenizer_dir:
        tokenizer = write_tiny_tokenizer(tokenizer_dir, spec.words, spec.max_length)
    else:  # the slow CLIP tokenizer holds its vocabulary in memory: the files need not outlive the load
        with tempfile.TemporaryDirectory(prefix="instaflow-tok-") as tok_dir:
            tokenizer = write_tiny_tokenizer(tok_dir, spec.words, spec.max_length)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=max(len(tokenizer), spec.text_vocab or 0), hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate or 2 * spec.text_hidden,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        max_position_embeddings=spec.max_length, projection_dim=spec.text_hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    n = len(spec.unet_channels)
    sample_size = spec.sample_size if isinstance(spec.sample_size, int) else list(spec.sample_size)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=spec.latent_channels, out_channels=spec.latent_channels,
        block_out_channels=tuple(spec.unet_channels), layers_per_block=spec.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=spec.text_hidden, attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.unet_groups or min(32, spec.unet_channels[0]),
    )
    k = len(spec.vae_channels)
    scale = 2 ** (k - 1)
    px = (sample_size if isinstance(sample_size, int) else max(sample_size)) * scale
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=spec.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * k, up_block_types=("UpDecoderBlock2D",) * k,
        block_out_channels=tuple(spec.vae_channels), layers_per_block=spec.vae_layers, norm_num_groups=spec.vae_groups,
        sample_size=px, scaling_factor=spec.scaling_factor,
    )
    return Components(tokenizer, text_encoder, unet, vae).eval()


#: An SD-1.5-style noise schedule, for tiny diffusion-type teachers.
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1,
}


def write_tiny_checkpoint(folder: str | os.PathLike[str], spec: TinySpec | None = None, seed: int = 0,
                          class_name: str = FLOW_PIPELINE_CLASS) -> Path:
    """Build random tiny components and save them as a diffusers folder (a rectified flow unless told otherwise;
    diffusion-type folders get an SD-style ``scheduler/``)."""
    with tempfile.TemporaryDirectory() as tok_dir:
        components = build_tiny_components(spec, seed=seed, tokenizer_dir=tok_dir)
        sched = None if class_name == FLOW_PIPELINE_CLASS else SD_SCHEDULER_CONFIG
        return save_checkpoint(components, folder, class_name=class_name, scheduler_config=sched)


def build_tiny_decoder(latent_channels: int = 4, scale_factor: int = 8, channels: int | None = 16,
                       seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``AutoencoderTiny`` (TAESD's architecture): ``channels`` per block (None: TAESD's
    real 64 and block depths, for benchmarks), ``log2(scale_factor) + 1`` blocks."""
    from diffusers import AutoencoderTiny

    blocks = int(math.log2(scale_factor)) + 1
    if 2 ** (blocks - 1) != scale_factor:
        raise ValueError(f"scale_factor must be a power of two, got {scale_factor}")
    torch.manual_seed(seed)
    width = (channels or 64,) * blocks
    depth = (1,) * blocks if channels else (1,) + (3,) * (blocks - 1)
    return AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=width,
                           decoder_block_out_channels=width, num_encoder_blocks=depth,
                           num_decoder_blocks=tuple(reversed(depth))).eval()


def write_tiny_decoder(folder: str | os.PathLike[str], latent_channels: int = 4, scale_factor: int = 8,
                       channels: int | None = 16, seed: int = 0) -> Path:
    """:func:`build_tiny_decoder`, saved as a decoder folder (``Pipeline.from_pretrained(..., vae=folder)``)."""
    folder = Path(folder)
    build_tiny_decoder(latent_channels, scale_factor, channels, seed).save_pretrained(folder, safe_serialization=True)
    return folder
