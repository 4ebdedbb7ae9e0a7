"""Model components: loading them from a diffusers folder, and saving them as one (tiny test-model builders live in
:mod:`runtime.builders`).

The loaders read every shape-defining number (token window, hidden size, latent channels and size, VAE scale and
scaling factor) from the checkpoint's configs; nothing here assumes SD 1.5's 77 tokens, 768 dims, 0.18215 or 64x64.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch

from .checkpoints import FLOW_PIPELINE_CLASS, Checkpoint, resolve
from .decoders import check_decoder_fits, load_decoder, vae_scale_factor, with_decoder
from .errors import CheckpointError
from .lora import Fuser, with_loras

log = logging.getLogger(__name__)

_LOAD_FAILURES = (OSError, ValueError, KeyError, RuntimeError, TypeError, EnvironmentError)


@dataclass
class Components:
    """The four parts of a text-to-image flow, plus what the pipeline needs to know about their shapes."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    #: the LoRAs fused into these weights, and the originals to restore them (runtime.lora.Fuser), if any
    lora: Any = field(default=None, repr=False, compare=False)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD): see :func:`runtime.decoders.vae_scale_factor`."""
        return vae_scale_factor(self.vae.config)

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
    """Turn off transformers'/diffusers' per-file progress bars for the whole process (command-line tools)."""
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


#: ``INSTAFLOW_VERBOSE=1`` shows the libraries' loading progress bars and warnings again
VERBOSE_ENV = "INSTAFLOW_VERBOSE"


@contextmanager
def quiet() -> Iterator[None]:
    """Loading without transformers'/diffusers' progress bars and info/warning chatter (such as diffusers'
    "modules that should be kept in float32" when casting to fp16), restored afterwards; verbose on request."""
    if os.environ.get(VERBOSE_ENV) == "1":
        yield
        return
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = (tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled(), tlog.get_verbosity(),
             dlog.get_verbosity())
    tlog.disable_progress_bar()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        (tlog.enable_progress_bar if saved[0] else tlog.disable_progress_bar)()
        (dlog.enable_progress_bar if saved[1] else dlog.disable_progress_bar)()
        tlog.set_verbosity(saved[2])
        dlog.set_verbosity(saved[3])


def token_window(tokenizer: Any, text_encoder: torch.nn.Module) -> int:
    """The tokenizer's ``model_max_length``, or the encoder's position table when the tokenizer does not say."""
    positions = int(text_encoder.config.max_position_embeddings)
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n <= positions else positions


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _load(cls: Any, folder: Path, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder)``; a failure is one line naming ``what`` and the folder."""
    try:
        return cls.from_pretrained(folder, **kwargs)
    except _LOAD_FAILURES as e:
        raise CheckpointError(f"cannot load the {what} from {folder}: {_first_line(e)}") from None


def load_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    return _load(CLIPTokenizer, folder, "tokenizer")


def load_text_encoder(folder: Path) -> torch.nn.Module:
    from transformers import CLIPTextModel

    return _load(CLIPTextModel, folder, "text encoder", use_safetensors=True)


def load_unet(folder: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return _load(UNet2DConditionModel, folder, "UNet", use_safetensors=True)


def load_vae(folder: Path) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return _load(AutoencoderKL, folder, "VAE", use_safetensors=True)


def resolve_checkpoint(ckpt: str | os.PathLike[str] | Checkpoint, vae: str | os.PathLike[str] | None = None,
                       lora: Any = None) -> Checkpoint:
    """A checkpoint as a pipeline or an export uses it: resolved (:func:`runtime.checkpoints.resolve`), with the
    tiny decoder ``vae`` instead of its own VAE (:mod:`runtime.decoders`) and the LoRAs ``lora`` to fuse at load
    (:mod:`runtime.lora`)."""
    checkpoint = ckpt if isinstance(ckpt, Checkpoint) else resolve(ckpt)
    return with_loras(with_decoder(checkpoint, vae), lora)


def load_components(
    ckpt: Checkpoint, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, weights: bool = True
) -> Components:
    """Load tokenizer, text encoder, UNet and VAE of a resolved checkpoint, in eval mode on ``device``/``dtype``.

    With ``weights=False`` only the tokenizer and the configs are read (for backends that run exported graphs):
    the three networks are then stand-ins that carry ``.config`` and nothing else.
    Other sub-folders (``scheduler/``, ``safety_checker/``, ``feature_extractor/``) are ignored on purpose.
    """
    with quiet():
        return _load_components(ckpt, device, dtype, weights)


def _load_components(ckpt: Checkpoint, device: torch.device | str, dtype: torch.dtype, weights: bool
                     ) -> Components:
    tokenizer = load_tokenizer(ckpt.component("tokenizer"))
    configs = Components(  # configs first: a broken one is the checkpoint's fault, said before gigabytes are read
        tokenizer=tokenizer,
        text_encoder=_config_only(ckpt.component("text_encoder"), transformers_config=True),
        unet=_config_only(ckpt.component("unet")),
        vae=_config_only(ckpt.component("vae")),
    )
    check_compatible(configs, ckpt.name)
    if ckpt.decoder is not None:  # a tiny decoder instead of the checkpoint's VAE, checked against it
        check_decoder_fits(ckpt.decoder, configs.vae.config, configs.latent_channels, ckpt.name)
        configs.vae = SimpleNamespace(config=SimpleNamespace(**ckpt.decoder.config))
    if not weights:
        return configs
    c = Components(
        tokenizer=tokenizer,
        text_encoder=load_text_encoder(ckpt.component("text_encoder")),
        unet=load_unet(ckpt.component("unet")),
        vae=load_decoder(ckpt.decoder) if ckpt.decoder is not None else load_vae(ckpt.component("vae")),
    )
    if ckpt.decoder is None:
        check_compatible(c, ckpt.name)
    c = c.to(device=device, dtype=dtype).eval()
    if ckpt.loras:
        c.lora = Fuser(c)
        for lora in ckpt.loras:
            c.lora.fuse(lora)
    return c


def _config_only(folder: Path, transformers_config: bool = False) -> Any:
    """A stand-in for a network: an object whose ``.config`` holds the folder's config.json."""
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
    # raw config.json files may leave out what diffusers fills in with its defaults (given here)
    cross = getattr(unet, "cross_attention_dim", 1280)
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    if cross != te.hidden_size:
        problems.append(f"UNet cross-attention dim {cross} != text encoder hidden size {te.hidden_size}")
    unet_in, unet_out = getattr(unet, "in_channels", 4), getattr(unet, "out_channels", 4)
    latents = getattr(vae, "latent_channels", 4)
    if unet_in != latents or unet_out != latents:
        problems.append(f"UNet channels {unet_in}->{unet_out} != VAE latents {latents}")
    blocks = getattr(vae, "block_out_channels", (64,))
    if not isinstance(blocks, (list, tuple)) or not blocks:
        problems.append(f"VAE block_out_channels is {blocks!r}: a decoder needs at least one block")
    size = getattr(unet, "sample_size", None)
    sizes = [size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else [None]
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        problems.append(f"UNet sample_size is {size!r}: the default image size needs a positive latent size")
    if problems:
        raise CheckpointError(f"checkpoint {name!r} is inconsistent: " + "; ".join(problems))


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
