"""Model components: loading them from a diffusers folder, and builders for tiny models made offline.

The loaders read every shape-defining number (token window, hidden size, latent channels and size, VAE scale and
scaling factor) from the checkpoint's configs; nothing here assumes SD 1.5's 77 tokens, 768 dims, 0.18215 or 64x64.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoints import FLOW_PIPELINE_CLASS, Checkpoint
from .errors import CheckpointError

log = logging.getLogger(__name__)

_LOAD_FAILURES = (OSError, ValueError, KeyError, RuntimeError, TypeError, EnvironmentError)


@dataclass
class Components:
    """The four parts of a text-to-image flow, plus what the pipeline needs to know about their shapes."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: ``2 ** (len(vae.block_out_channels) - 1)`` (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def max_length(self) -> int:
        """Token window of the text encoder (77 for SD)."""
        return token_window(self.tokenizer, self.text_encoder)

    @property
    def default_size(self) -> tuple[int, int]:
        """Default (height, width) in pixels: the UNet's ``sample_size`` times the VAE scale factor."""
        s = self.unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder, "unet": self.unet, "vae": self.vae}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Components":
        for m in self.modules().values():
            kwargs: dict[str, Any] = {} if device is None else {"device": device}
            if dtype is not None and dtype != next(m.parameters()).dtype:
                kwargs["dtype"] = dtype
            if kwargs:
                m.to(**kwargs)
        return self

    def eval(self) -> "Components":
        for m in self.modules().values():
            m.eval().requires_grad_(False)
        return self


def quiet_loading() -> None:
    """Turn off transformers'/diffusers' per-file progress bars (for command-line tools)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def token_window(tokenizer: Any, text_encoder: torch.nn.Module) -> int:
    """The tokenizer's ``model_max_length``, or the encoder's position table when the tokenizer does not say."""
    positions = int(text_encoder.config.max_position_embeddings)
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n <= positions else positions


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def load_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(folder)
    except _LOAD_FAILURES as e:
        raise CheckpointError(f"cannot load the tokenizer from {folder}: {_first_line(e)}") from None


def load_text_encoder(folder: Path) -> torch.nn.Module:
    from transformers import CLIPTextModel

    try:
        return CLIPTextModel.from_pretrained(folder, use_safetensors=True)
    except _LOAD_FAILURES as e:
        raise CheckpointError(f"cannot load the text encoder from {folder}: {_first_line(e)}") from None


def load_unet(folder: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_pretrained(folder, use_safetensors=True)
    except _LOAD_FAILURES as e:
        raise CheckpointError(f"cannot load the UNet from {folder}: {_first_line(e)}") from None


def load_vae(folder: Path) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(folder, use_safetensors=True)
    except _LOAD_FAILURES as e:
        raise CheckpointError(f"cannot load the VAE from {folder}: {_first_line(e)}") from None


def load_components(
    ckpt: Checkpoint, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, weights: bool = True
) -> Components:
    """Load tokenizer, text encoder, UNet and VAE of a resolved checkpoint, in eval mode on ``device``/``dtype``.

    With ``weights=False`` only the tokenizer and the configs are read (for backends that run exported graphs):
    the three networks are then stand-ins that carry ``.config`` and nothing else.
    Other sub-folders (``scheduler/``, ``safety_checker/``, ``feature_extractor/``) are ignored on purpose.
    """
    if not weights:
        c = Components(
            tokenizer=load_tokenizer(ckpt.component("tokenizer")),
            text_encoder=_config_only(ckpt.component("text_encoder"), transformers_config=True),
            unet=_config_only(ckpt.component("unet")),
            vae=_config_only(ckpt.component("vae")),
        )
        check_compatible(c, ckpt.name)
        return c
    c = Components(
        tokenizer=load_tokenizer(ckpt.component("tokenizer")),
        text_encoder=load_text_encoder(ckpt.component("text_encoder")),
        unet=load_unet(ckpt.component("unet")),
        vae=load_vae(ckpt.component("vae")),
    )
    check_compatible(c, ckpt.name)
    return c.to(device=device, dtype=dtype).eval()


def _config_only(folder: Path, transformers_config: bool = False) -> Any:
    """A stand-in for a network: an object whose ``.config`` holds the folder's config.json."""
    from types import SimpleNamespace

    try:
        if transformers_config:
            from transformers import CLIPTextConfig

            return SimpleNamespace(config=CLIPTextConfig.from_pretrained(folder))
        return SimpleNamespace(config=SimpleNamespace(**json.loads((folder / "config.json").read_text())))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read the config in {folder}: {_first_line(e)}") from None


def check_compatible(c: Components, name: str) -> None:
    """Refuse component sets that would fail deep inside torch (mismatched sizes, a broken tokenizer)."""
    te, unet, vae = c.text_encoder.config, c.unet.config, c.vae.config
    n_tokens = len(c.tokenizer)
    problems = []
    if n_tokens < 3 or n_tokens > te.vocab_size:
        problems.append(f"tokenizer has {n_tokens} tokens but the text encoder's vocabulary is {te.vocab_size}")
    cross = unet.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    if cross != te.hidden_size:
        problems.append(f"UNet cross-attention dim {cross} != text encoder hidden size {te.hidden_size}")
    if unet.in_channels != vae.latent_channels or unet.out_channels != vae.latent_channels:
        problems.append(f"UNet channels {unet.in_channels}->{unet.out_channels} != VAE latents {vae.latent_channels}")
    if problems:
        raise CheckpointError(f"checkpoint {name!r} is inconsistent: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------------------
# Tiny models for tests, benchmarks and the bundled placeholder. Built entirely offline.
# --------------------------------------------------------------------------------------------------------------

#: Words that get a token of their own in tiny tokenizers (the shapes-dataset grammar plus a few common words).
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "at", "of", "in", "on", "photo", "cat", "dog", "fox", "watercolor",
    "small", "large", "red", "green", "blue", "yellow", "circle", "square", "triangle",
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


def write_tiny_tokenizer(folder: str | os.PathLike[str], words: Sequence[str], max_length: int) -> Any:
    """Write a CLIP BPE tokenizer (byte-level alphabet + one merged token per word) and load it back.

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
    merges: list[str] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for sym in symbols[1:]:
            merge = f"{current} {sym}"
            if merge not in merges:
                merges.append(merge)
            current += sym
            vocab.setdefault(current, len(vocab))
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
    ``tokenizer_dir`` (a temporary folder when None)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = spec or TinySpec()
    tok_dir = tokenizer_dir or tempfile.mkdtemp(prefix="instaflow-tok-")
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


def save_checkpoint(components: Components, folder: str | os.PathLike[str],
                    class_name: str = FLOW_PIPELINE_CLASS, extra: dict[str, Any] | None = None,
                    scheduler_config: dict[str, Any] | None = None) -> Path:
    """Write ``components`` as a diffusers folder (safetensors weights) whose ``model_index.json`` names
    ``class_name`` (a rectified flow by default). Written to a temporary sibling, then renamed: a crash never
    leaves a half-written checkpoint behind. An existing folder is replaced."""
    import diffusers
    import transformers

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        components.tokenizer.save_pretrained(tmp / "tokenizer")
        components.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        components.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        components.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        index = {
            "_class_name": class_name,
            "_diffusers_version": diffusers.__version__,
            "_transformers_version": transformers.__version__,
            "text_encoder": ["transformers", type(components.text_encoder).__name__],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", type(components.unet).__name__],
            "vae": ["diffusers", type(components.vae).__name__],
            **(extra or {}),
        }
        if scheduler_config is not None:
            (tmp / "scheduler").mkdir()
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
            index["scheduler"] = ["diffusers", scheduler_config.get("_class_name", "PNDMScheduler")]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp made it private; a checkpoint folder is an ordinary folder
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_tiny_checkpoint(folder: str | os.PathLike[str], spec: TinySpec | None = None, seed: int = 0,
                          class_name: str = FLOW_PIPELINE_CLASS) -> Path:
    """Build random tiny components and save them as a diffusers folder (a rectified flow unless told otherwise;
    diffusion-type folders get an SD-style ``scheduler/``)."""
    with tempfile.TemporaryDirectory() as tok_dir:
        components = build_tiny_components(spec, seed=seed, tokenizer_dir=tok_dir)
        sched = None if class_name == FLOW_PIPELINE_CLASS else SD_SCHEDULER_CONFIG
        return save_checkpoint(components, folder, class_name=class_name, scheduler_config=sched)
