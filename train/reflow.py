"""``python -m train.reflow``: train the (k+1)-rectified flow on pairs from v_k (InstaFlow's reflow stage).

    python -m train.reflow --pairs pairs/ -o runs/2rf [--recipe train/recipes/instaflow_sd15.toml:reflow-1]
        [--max-steps 1000] [--batch-size 16] [--global-batch N | --grad-accum N] [--lr 1e-6] [--ema 0.9999]
        [--lr-schedule constant-with-warmup] [--warmup-steps N] [--max-grad-norm 1.0] [--mixed-precision auto]
        [--text-dropout 0.1] [--grad-checkpointing] [--save-every 500] [--keep 2] [--log-dir DIR]
        [--validate-every N] [--prefetch 8] [--text-embeddings auto]

Initialised from the teacher's UNet (``--init`` to override); loss ||(X1 - X0) - v(Xt, 1000 (1 - t) | T)||^2 with
Xt = t X1 + (1 - t) X0, t ~ U(0, 1); text dropout (default 10%) so that guidance works afterwards. Writes
``OUT/model``, a diffusers folder the runtime loads (few steps, optional CFG).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from runtime.cli import description, run_cli

from .common import parse_args
from .loop import Trainer, TrainConfig, add_common_args, config_from_args, reflow_loss


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.reflow", description=description(__doc__))
    add_common_args(p, TrainConfig(pairs="", out=""))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: _run(parse_args(build_parser(), argv)))


def _run(a: argparse.Namespace) -> None:
    Trainer(config_from_args(a, loss="reflow", extra={"default_steps": 4}), reflow_loss, "reflow").run()


if __name__ == "__main__":
    sys.exit(main())
