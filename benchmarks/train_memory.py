"""What one GPU needs to train the SD-1.5 UNet (reflow or distillation), computed without a GPU.

    python -m benchmarks.train_memory [--batch 1 8] [--latent 64]

The UNet is built on the ``meta`` device (no memory) and run forward in training mode under
``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd keeps for the backward pass: their
storages (parameters excluded, each storage once) are the activation memory, exactly, for fp32. Under bf16 autocast
most of them are half that (matmul and convolution outputs are bf16; norms keep some fp32), so both are shown. With
gradient checkpointing, what is kept is the checkpointed blocks' inputs; one block's activations are recomputed at a
time in the backward pass on top of that. Fixed costs with AdamW and fp32 master weights: weights, gradients and two
moments (16 bytes per parameter), plus DDP's gradient buckets (4 more) on several GPUs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

GiB = 2**30


def saved_activation_bytes(unet: Any, batch: int, latent: int, text_len: int, text_dim: int,
                           checkpointing: bool) -> int:
    """Bytes autograd keeps for the backward pass of one training forward of ``unet`` (on the meta device)."""
    params = {p.untyped_storage()._cdata for p in unet.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            kept[storage._cdata] = storage.nbytes()
        return t

    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    channels = unet.config.in_channels
    x = torch.randn(batch, channels, latent, latent, device="meta")
    emb = torch.randn(batch, text_len, text_dim, device="meta")
    t = torch.full((batch,), 500.0, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, t, encoder_hidden_states=emb, return_dict=False)
    return sum(kept.values())


def sd15_unet_on_meta() -> Any:
    from diffusers import UNet2DConditionModel

    from runtime.builders import SD15_SPEC

    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=SD15_SPEC.sample_size, in_channels=SD15_SPEC.latent_channels,
            out_channels=SD15_SPEC.latent_channels, block_out_channels=tuple(SD15_SPEC.unet_channels),
            layers_per_block=SD15_SPEC.layers_per_block, cross_attention_dim=SD15_SPEC.text_hidden,
            attention_head_dim=SD15_SPEC.attention_head_dim)


def table(unet: Any, batches: Sequence[int], latent: int, text_len: int, text_dim: int) -> list[dict[str, Any]]:
    n = sum(p.numel() for p in unet.parameters())
    fixed = 16 * n  # fp32 weights + gradients + AdamW's two moments
    rows = []
    for b in batches:
        for ckpt in (False, True):
            act = saved_activation_bytes(unet, b, latent, text_len, text_dim, ckpt)
            rows.append({"batch": b, "checkpointing": ckpt, "params": n, "activations_fp32": act,
                         "total_fp32": fixed + act, "total_bf16_autocast": fixed + act // 2,
                         "ddp_buckets": 4 * n})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_memory", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / ".results" / "train_memory.json"))
    a = p.parse_args(argv)
    from runtime.builders import SD15_SPEC

    unet = sd15_unet_on_meta()
    rows = table(unet, a.batch, a.latent, SD15_SPEC.max_length, SD15_SPEC.text_hidden)
    from runtime.files import atomic_write_json

    from .report import render_train_memory
    from .subjects import now

    doc = {"activations_of": "SD-1.5 UNet", "date": now(), "params": rows[0]["params"], "latent": a.latent,
           "command": "python -m benchmarks.train_memory", "rows": rows,
           "note": "checked against the full-size CPU run: batch 1 with checkpointing is 13.1 GiB here, and that "
                   "run's process peaked at 15.0 GiB with the text encoder, the VAE and one block's recomputation "
                   "on top. One 80 GB GPU trains batch 8 without checkpointing (with DDP's buckets); a 24 GB GPU "
                   "needs checkpointing."}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, doc)
    print("\n".join(render_train_memory(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
