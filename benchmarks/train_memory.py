"""What one GPU needs to train the SD-1.5 UNet (reflow and L2 distillation; LPIPS distillation), computed without
a GPU.

    python -m benchmarks.train_memory [--batch 1 8] [--latent 64]

The UNet is built on the ``meta`` device (no memory) and run forward in training mode under
``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd keeps for the backward pass: their
storages (parameters excluded, each storage once) are the activation memory, exactly, for fp32. Under bf16 autocast
most of them are half that (matmul and convolution outputs are bf16; norms keep some fp32), so both are shown. With
gradient checkpointing, what is kept is the checkpointed blocks' inputs; one block's activations are recomputed at a
time in the backward pass on top of that. Fixed costs with AdamW and fp32 master weights: weights, gradients and two
moments (16 bytes per parameter), plus DDP's gradient buckets (4 more) on several GPUs.

LPIPS distillation (``train.distill --loss lpips``) back-propagates through the student's UNet at t = 0, the VAE
decoder at full resolution (512x512 for 64x64 latents) and the LPIPS network (VGG-16 by default): its rows count all
three, with ``--grad-checkpointing`` checkpointing the UNet's and the decoder's blocks and the LPIPS network. The
frozen decoder's and LPIPS network's weights (fp32, no gradients or moments) are added to the fixed cost; the target's
decoding runs without gradients and keeps nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from runtime.cli import description

GiB = 2**30


def _saved_bytes(forward: Any, modules: Sequence[Any]) -> int:
    """Bytes of the tensors autograd keeps while ``forward()`` runs (each storage once, parameters excluded)."""
    params = {p.untyped_storage()._cdata for m in modules for p in m.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            kept[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(kept.values())


def _checkpointing(model: Any, on: bool) -> None:
    model.train()
    if on:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()


def saved_activation_bytes(unet: Any, batch: int, latent: int, text_len: int, text_dim: int,
                           checkpointing: bool) -> int:
    """Bytes autograd keeps for the backward pass of one training forward of ``unet`` (on the meta device)."""
    _checkpointing(unet, checkpointing)
    channels = unet.config.in_channels
    x = torch.randn(batch, channels, latent, latent, device="meta")
    emb = torch.randn(batch, text_len, text_dim, device="meta")
    t = torch.full((batch,), 500.0, device="meta")
    return _saved_bytes(lambda: unet(x, t, encoder_hidden_states=emb, return_dict=False), [unet])


def lpips_distill_activation_bytes(unet: Any, vae: Any, net: Any, batch: int, latent: int, text_len: int,
                                   text_dim: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for one LPIPS distillation forward (``train.distill.make_lpips_loss``: the student's
    one-step prediction, decoded with gradients, against a decoded target), all on the meta device."""
    from train.distill import make_lpips_loss
    from train.loop import Batch

    _checkpointing(unet, checkpointing)
    _checkpointing(vae, checkpointing)
    vae.requires_grad_(False)
    comps = type("C", (), {"vae": vae, "scaling_factor": 0.18215, "shift_factor": 0.0})()
    x0 = torch.randn(batch, unet.config.in_channels, latent, latent, device="meta")
    emb = torch.randn(batch, text_len, text_dim, device="meta")
    b = Batch(unet, x0, x0.clone(), emb, torch.Generator(), comps)  # type: ignore[arg-type]
    loss = make_lpips_loss(net, checkpointing=checkpointing)
    return _saved_bytes(lambda: loss(b), [unet, vae, net])


def sd15_unet_on_meta() -> Any:
    from diffusers import UNet2DConditionModel

    from runtime.builders import SD15_SPEC

    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=SD15_SPEC.sample_size, in_channels=SD15_SPEC.latent_channels,
            out_channels=SD15_SPEC.latent_channels, block_out_channels=tuple(SD15_SPEC.unet_channels),
            layers_per_block=SD15_SPEC.layers_per_block, cross_attention_dim=SD15_SPEC.text_hidden,
            attention_head_dim=SD15_SPEC.attention_head_dim)


def sd15_vae_and_lpips_on_meta(net: str = "vgg") -> tuple[Any, Any]:
    import warnings

    import lpips
    from diffusers import AutoencoderKL

    from runtime.builders import SD15_SPEC

    k = len(SD15_SPEC.vae_channels)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=SD15_SPEC.latent_channels,
                            down_block_types=("DownEncoderBlock2D",) * k, up_block_types=("UpDecoderBlock2D",) * k,
                            block_out_channels=tuple(SD15_SPEC.vae_channels), layers_per_block=SD15_SPEC.vae_layers,
                            norm_num_groups=SD15_SPEC.vae_groups)
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    return vae, model.eval().requires_grad_(False)


def table(unet: Any, batches: Sequence[int], latent: int, text_len: int, text_dim: int,
          lpips_parts: tuple[Any, Any] | None = None) -> list[dict[str, Any]]:
    n = sum(p.numel() for p in unet.parameters())
    fixed = 16 * n  # fp32 weights + gradients + AdamW's two moments
    rows = []
    stages: list[tuple[str, int]] = [("reflow / L2 distillation", 0)]
    if lpips_parts is not None:
        vae, net = lpips_parts
        frozen = 4 * sum(p.numel() for p in [*vae.decoder.parameters(), *vae.post_quant_conv.parameters(),
                                             *net.parameters()])
        stages.append(("LPIPS distillation", frozen))
    for stage, extra in stages:
        for b in batches:
            for ckpt in (False, True):
                if extra:
                    act = lpips_distill_activation_bytes(unet, lpips_parts[0], lpips_parts[1], b, latent, text_len,
                                                         text_dim, ckpt)
                else:
                    act = saved_activation_bytes(unet, b, latent, text_len, text_dim, ckpt)
                rows.append({"stage": stage, "batch": b, "checkpointing": ckpt, "params": n, "frozen_bytes": extra,
                             "activations_fp32": act, "total_fp32": fixed + extra + act,
                             "total_bf16_autocast": fixed + extra + act // 2, "ddp_buckets": 4 * n})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_memory", description=description(__doc__))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex", "squeeze"])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / ".results" / "train_memory.json"))
    a = p.parse_args(argv)
    from runtime.builders import SD15_SPEC

    unet = sd15_unet_on_meta()
    rows = table(unet, a.batch, a.latent, SD15_SPEC.max_length, SD15_SPEC.text_hidden,
                 sd15_vae_and_lpips_on_meta(a.lpips_net))
    from runtime.files import atomic_write_json

    from .report import render_train_memory
    from .subjects import now

    doc = {"activations_of": "SD-1.5 UNet", "date": now(), "params": rows[0]["params"], "latent": a.latent,
           "command": "python -m benchmarks.train_memory", "rows": rows,
           "note": "checked against the full-size CPU run: batch 1 with checkpointing is 13.1 GiB here, and that "
                   "run's process peaked at 15.0 GiB with the text encoder, the VAE and one block's recomputation "
                   "on top. One 80 GB GPU trains reflow or L2 distillation at batch 8 without checkpointing (with "
                   "DDP's buckets); a 24 GB GPU needs checkpointing. LPIPS distillation keeps 10.7 GiB of fp32 "
                   "activations per image without checkpointing (the decoder at 512x512 and VGG-16: 6.2 GiB more than "
                   "the UNet alone), so batch 8 needs 98 GiB in fp32 (~56 GiB under bf16 autocast); with "
                   "--grad-checkpointing (UNet and decoder "
                   "blocks and the LPIPS network checkpointed) it keeps 1.1 GiB per image, plus, during the "
                   "backward pass, the activations of the one block being recomputed (the largest is a decoder "
                   "block at 512x512)."}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, doc)
    print("\n".join(render_train_memory(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
