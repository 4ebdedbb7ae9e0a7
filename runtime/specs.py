"""One spec per exported component: the single source of tensor names, dtypes, symbolic shapes, dynamic axes,
TensorRT profiles (with the guidance batch rule), output shapes, sample inputs and file names.

``export.onnx`` exports by it, ``export.verify`` and ``export.trt`` check and build by it, and the onnxruntime and
TensorRT backends bind buffers by it. Every number comes from the checkpoint (:meth:`ModelDims.of`) or from the
manifest an export wrote (:meth:`ModelDims.from_json`), never from SD's defaults.

Symbolic dimensions: ``B`` batch, ``h``/``w`` latent height/width, ``H``/``W`` = VAE factor x ``h``/``w`` pixels.

The guidance batch rule: with classifier-free guidance the pipeline encodes prompts and negatives in one text-encoder
call and runs the UNet on ``[uncond, cond]``, so both see up to twice the number of images of a call; the VAE
decoder and the fused one-step graph (used only without guidance) see the images themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import InvalidInputError
from .inputs import check_pixels
from .models import Components

Dim = int | str

#: dtype names as manifests write them -> torch dtypes (the one map; backends derive theirs from it)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                                  "int64": torch.int64, "int32": torch.int32}

#: every graph an export can hold, in build order
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "onestep")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (the inverse of :data:`DTYPES`)."""
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class ModelDims:
    """The numbers the specs need, read from a checkpoint's configs or an export's manifest."""

    text_length: int  # tokenizer window (77 for SD)
    text_hidden: int  # text-encoder hidden size (768 for SD 1.5)
    vocab_size: int
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    latent_size: tuple[int, int]  # the checkpoint's default latent height, width
    #: latent sides an exported UNet takes are multiples of this: 2 ** (number of downsamplings). A traced graph
    #: fixes each upsampling to x2, so other sizes fail inside it (the torch UNet pads instead).
    latent_multiple: int = 1

    @classmethod
    def of(cls, c: Components) -> "ModelDims":
        blocks = len(getattr(c.unet.config, "block_out_channels", ()) or (1,))
        h, w = c.default_size
        f = c.vae_scale_factor
        return cls(text_length=c.max_length, text_hidden=int(c.text_encoder.config.hidden_size),
                   vocab_size=int(c.text_encoder.config.vocab_size), latent_channels=c.latent_channels,
                   vae_scale_factor=f, latent_size=(h // f, w // f), latent_multiple=2 ** (blocks - 1))

    def to_json(self) -> dict[str, Any]:
        """The ``latent`` and ``text`` sections of a manifest."""
        return {"latent": {"channels": self.latent_channels, "height": self.latent_size[0],
                           "width": self.latent_size[1], "vae_scale_factor": self.vae_scale_factor,
                           "multiple": self.latent_multiple},
                "text": {"max_length": self.text_length, "hidden_size": self.text_hidden,
                         "vocab_size": self.vocab_size}}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "ModelDims":
        lat, text = doc["latent"], doc["text"]
        return cls(text_length=int(text["max_length"]), text_hidden=int(text["hidden_size"]),
                   vocab_size=int(text["vocab_size"]), latent_channels=int(lat["channels"]),
                   vae_scale_factor=int(lat["vae_scale_factor"]),
                   latent_size=(int(lat["height"]), int(lat["width"])), latent_multiple=int(lat["multiple"]))

    def check_latent_size(self, h: int, w: int, what: str = "this export") -> None:
        """One line when an exported graph cannot take latents of ``h x w`` (see :attr:`latent_multiple`)."""
        m = self.latent_multiple
        if h % m or w % m:
            px = m * self.vae_scale_factor
            raise InvalidInputError(f"{what} takes heights and widths that are multiples of {px} px (its UNet "
                                    f"downsamples {m}x), got {h * self.vae_scale_factor}x{w * self.vae_scale_factor}")

    def export_size(self, height: int | None, width: int | None, static: bool = False,
                    what: str = "an exported UNet") -> tuple[int, int]:
        """The latent size an export is built around, from ``--height``/``--width`` in pixels (``None``: the
        checkpoint's default), checked in one line: positive multiples of the VAE scale factor, sides the UNet's
        downsamplings take (:meth:`check_latent_size`); a ``static`` export only at the default size."""
        f = self.vae_scale_factor
        h, w = check_pixels(self.latent_size[0] * f if height is None else height,
                            self.latent_size[1] * f if width is None else width, f)
        hw = (h // f, w // f)
        self.check_latent_size(*hw, what=what)
        if static and hw != self.latent_size:
            raise InvalidInputError("a static export is built at the checkpoint's default size only; drop "
                                    "--height/--width, or --static")
        return hw

    def size_range(self, hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """Latent sizes a dynamic-size engine is built for around ``hw``: half to twice each side, in multiples
        of :attr:`latent_multiple`."""
        m = self.latent_multiple
        lo = tuple(max(m, (s // 2) // m * m) for s in hw)
        hi = tuple(s * 2 for s in hw)
        return (lo[0], lo[1]), (hi[0], hi[1])

    def other_size(self, hw: tuple[int, int] | None = None) -> tuple[int, int]:
        """A second, non-square latent size every dynamic-size graph built around ``hw`` (default: the default
        size) must take, inside :meth:`size_range` (used to verify the export)."""
        m, (h, w) = self.latent_multiple, hw or self.latent_size
        return h + m, max(m, w - m)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[Dim, ...]
    dtype: str  # "int64", "float32", or "model" (the export precision)

    def concrete(self, symbols: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else symbols[d] for d in self.shape)

    def torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.dtype == "model" else DTYPES[self.dtype]

    def resolved(self, model_dtype: torch.dtype) -> "TensorSpec":
        """This tensor with the ``"model"`` dtype replaced by the export's precision (as manifests record it)."""
        return TensorSpec(self.name, self.shape, dtype_name(self.torch_dtype(model_dtype)))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "TensorSpec":
        return cls(str(raw["name"]), tuple(raw["shape"]), str(raw["dtype"]))


@dataclass(frozen=True)
class ComponentSpec:
    """An exported graph: its inputs and outputs, and whether classifier-free guidance doubles its batch."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: ModelDims
    guided: bool = False  # sees prompts + negatives / [uncond, cond]: up to twice the images of a call

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def symbols(self, batch: int, h: int, w: int) -> dict[str, int]:
        f = self.dims.vae_scale_factor
        return {"B": batch, "h": h, "w": w, "H": h * f, "W": w * f}

    def max_batch(self, images: int) -> int:
        """The largest batch this graph sees in a call of at most ``images`` images (the guidance rule)."""
        return 2 * images if self.guided else images

    def dynamic_axes(self, dynamic_hw: bool) -> dict[str, dict[int, str]]:
        """Legacy-exporter ``dynamic_axes``: batch always, spatial sizes on request."""
        names = {"B": "batch", "h": "height", "w": "width", "H": "image_height", "W": "image_width"}
        dyn = {"B"} | ({"h", "w", "H", "W"} if dynamic_hw else set())
        return {t.name: {i: names[d] for i, d in enumerate(t.shape) if isinstance(d, str) and d in dyn}
                for t in (*self.inputs, *self.outputs)}

    def sample_inputs(self, batch: int, h: int | None = None, w: int | None = None,
                      dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
        """Fresh random inputs (never zeros): token ids over the whole vocabulary, UNet times in [0, 1000],
        Gaussian latents/embeddings; at the default latent size unless ``h``/``w`` are given."""
        h, w = (h, w) if h is not None and w is not None else self.dims.latent_size
        g = torch.Generator().manual_seed(seed)
        symbols = self.symbols(batch, h, w)
        out = {}
        for t in self.inputs:
            shape = t.concrete(symbols)
            if t.dtype == "int64":
                out[t.name] = torch.randint(0, self.dims.vocab_size, shape, generator=g)
            elif t.name == "timestep":
                out[t.name] = torch.rand(shape, generator=g) * 1000.0
            else:
                out[t.name] = torch.randn(shape, generator=g).to(t.torch_dtype(dtype))
        return out

    def profile(self, min_images: int, opt_images: int, max_images: int, hw: tuple[int, int],
                hw_range: tuple[tuple[int, int], tuple[int, int]] | None = None
                ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile for calls of ``min_images .. max_images`` images: input name -> (min,
        opt, max) shapes, the maximum batch following the guidance rule."""
        (h_min, w_min), (h_max, w_max) = hw_range or (hw, hw)
        lo = self.symbols(min_images, h_min, w_min)
        opt = self.symbols(opt_images, *hw)
        hi = self.symbols(self.max_batch(max_images), h_max, w_max)
        return {t.name: (t.concrete(lo), t.concrete(opt), t.concrete(hi)) for t in self.inputs}

    def output_shape(self, inputs: Sequence[torch.Tensor], index: int = 0) -> tuple[int, ...]:
        """Concrete shape of output ``index`` for these inputs (symbols read off the inputs' shapes)."""
        symbols: dict[str, int] = {}
        for t, x in zip(self.inputs, inputs):
            symbols.update({d: int(n) for d, n in zip(t.shape, x.shape) if isinstance(d, str)})
        if "h" in symbols:
            f = self.dims.vae_scale_factor
            symbols.update(H=symbols["h"] * f, W=symbols["w"] * f)
        return self.outputs[index].concrete(symbols)


def component_specs(dims: ModelDims, fused: bool = False) -> list[ComponentSpec]:
    """Specs of ``text_encoder``, ``unet``, ``vae_decoder`` (and ``onestep`` when ``fused``)."""
    L, D, C = dims.text_length, dims.text_hidden, dims.latent_channels
    latent, image, emb = ("B", C, "h", "w"), ("B", 3, "H", "W"), ("B", L, D)
    specs = [
        ComponentSpec("text_encoder", (TensorSpec("input_ids", ("B", L), "int64"),),
                      (TensorSpec("text_embeddings", emb, "model"),), dims, guided=True),
        ComponentSpec("unet", (TensorSpec("sample", latent, "model"), TensorSpec("timestep", ("B",), "float32"),
                               TensorSpec("encoder_hidden_states", emb, "model")),
                      (TensorSpec("velocity", latent, "model"),), dims, guided=True),
        ComponentSpec("vae_decoder", (TensorSpec("latents", latent, "model"),),
                      (TensorSpec("image", image, "model"),), dims),
    ]
    if fused:
        # the image leaves the fused graph in fp32 (it is in [0, 1]; the cast is free next to the decoder), so the
        # graph's output type does not change with --vae-fp32
        specs.append(ComponentSpec("onestep", (TensorSpec("text_embeddings", emb, "model"),
                                               TensorSpec("noise", latent, "model")),
                                   (TensorSpec("image", image, "float32"),), dims))
    return specs


def specs_by_name(dims: ModelDims) -> dict[str, ComponentSpec]:
    """All specs (the fused one included), by component name."""
    return {s.name: s for s in component_specs(dims, fused=True)}
