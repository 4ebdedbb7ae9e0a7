"""``python -m train.distill``: the one-step student X0 + v(X0, 1000 | T) ~ X1 = ODE[v_k](X0) (InstaFlow).

    python -m train.distill --pairs pairs_2rf/ -o runs/student --loss l2 [--max-steps 1000] [...]
    python -m train.distill --pairs pairs_2rf/ -o runs/student_lpips --loss lpips --init runs/student/model
    python -m train.distill --recipe train/recipes/instaflow_sd15.toml:distill-lpips --pairs ... -o ... --init ...

The flags are train.reflow's (``python -m train.reflow -h``) plus the loss.

Initialised from v_k (the flow that made the pairs; ``--init`` to continue from an earlier stage, e.g. LPIPS after
L2 as in the paper). Losses: ``l2`` or ``pseudo-huber`` in latent space, or ``lpips`` between the VAE decodings of
prediction and target (the ``lpips`` package; its ImageNet backbone comes from the torch hub cache, and a missing
file is one error line saying which file to put where). With ``--grad-checkpointing`` the VAE decoder's blocks and
the LPIPS network are checkpointed too, not only the UNet. Writes ``OUT/model``, whose default is one step, no CFG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from runtime import flow
from runtime.cli import description, run_cli

from .common import TrainError, parse_args
from .loop import Batch, Loss, Trainer, TrainConfig, add_common_args, config_from_args, l2_loss, \
    one_step_prediction, pseudo_huber_loss

#: torchvision backbone files lpips loads (names as in the torch hub cache)
LPIPS_BACKBONES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth",
                   "squeeze": "squeezenet1_1-b8a52dc0.pth"}


def lpips_model(net: str = "vgg", random_backbone: bool = False) -> torch.nn.Module:
    """LPIPS with its ImageNet backbone from the torch hub cache (no download attempted); ``random_backbone`` is
    for tests only."""
    try:
        import lpips
    except ImportError:
        raise TrainError("--loss lpips needs the lpips package: pip install 'instaflow-rt[train]'") from None
    if net not in LPIPS_BACKBONES:
        raise TrainError(f"unknown LPIPS network {net!r}; choose {', '.join(LPIPS_BACKBONES)}")
    weights = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[net]
    if not random_backbone and not weights.is_file():
        raise TrainError(f"LPIPS needs the {net} ImageNet backbone: put {weights.name} into {weights.parent} "
                         f"(https://download.pytorch.org/models/{weights.name})")
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=random_backbone, verbose=False)
    except Exception as e:  # noqa: BLE001 - a damaged file surfaces as pickle/zip/runtime errors from torch.load
        raise TrainError(f"LPIPS cannot load its {net} backbone {weights} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else 'damaged file'}); delete it and put a good "
                         f"copy there (https://download.pytorch.org/models/{weights.name})") from None
    return model.eval().requires_grad_(False)


def make_lpips_loss(model: torch.nn.Module, checkpointing: bool = False) -> Loss:
    """LPIPS between the VAE decodings of the student's prediction and of the target. The prediction is not clamped
    (a clamp would zero its gradient wherever decoded pixels leave [-1, 1]); only the target is.

    ``checkpointing`` (``--grad-checkpointing``): the LPIPS network's activations are recomputed in the backward pass
    instead of kept (the VAE decoder's blocks are checkpointed by the trainer, which enables diffusers' gradient
    checkpointing on the VAE): at 512x512 the decoder and VGG activations, not the UNet's, dominate a distillation
    step's memory (``python -m benchmarks.train_memory``)."""
    placed: dict[torch.device, torch.nn.Module] = {}

    def loss(b: Batch) -> torch.Tensor:
        net = placed.setdefault(b.x0.device, model.to(b.x0.device))
        vae, c = b.components.vae, b.components
        pred = one_step_prediction(b)
        image = vae.decode(flow.vae_input(pred, c.scaling_factor, c.shift_factor), return_dict=False)[0]
        with torch.no_grad():
            target = vae.decode(flow.vae_input(b.x1, c.scaling_factor, c.shift_factor), return_dict=False)[0]
        target = target.clamp(-1, 1)
        if checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(net, image, target, use_reentrant=False).mean()
        return net(image, target).mean()

    return loss


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.distill", description=description(__doc__))
    add_common_args(p, TrainConfig(pairs="", out="", text_dropout=0.0))
    p.add_argument("--loss", default="l2", choices=["l2", "pseudo-huber", "lpips"])
    p.add_argument("--lpips-net", default="vgg", choices=sorted(LPIPS_BACKBONES))
    p.add_argument("--lpips-random-backbone", action="store_true", help="tests only: untrained LPIPS backbone")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: _run(parse_args(build_parser(), argv)))


def _run(a: argparse.Namespace) -> None:
    if a.loss == "lpips":
        # built once, before any work
        fn = make_lpips_loss(lpips_model(a.lpips_net, a.lpips_random_backbone), checkpointing=a.grad_checkpointing)
    else:
        fn = l2_loss if a.loss == "l2" else pseudo_huber_loss
    cfg = config_from_args(a, loss=a.loss, lpips_net=a.lpips_net, lpips_random_backbone=a.lpips_random_backbone,
                           extra={"default_steps": 1, "default_guidance": 0.0})
    Trainer(cfg, fn, f"distill-{a.loss}").run()


if __name__ == "__main__":
    sys.exit(main())
