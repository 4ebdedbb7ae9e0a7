"""Watching a run while it trains: TensorBoard scalars and validation samples.

Every ``--log-every`` steps rank 0 writes to ``--log-dir`` (TensorBoard event files, flushed each time): the loss
(mean over the interval and the ranks), the learning rate, the gradient norm before clipping, throughput (pairs/s in
all and per rank), the gradient scaler's scale and skipped steps (fp16) and, on a GPU, peak memory. A resumed run
drops what the killed run logged after its last state (``purge_step``), so the curves continue without a fold.

Every ``--validate-every`` steps rank 0 samples a fixed set of prompts with fixed seeds from the current EMA weights
(the weights the run would ship), with the model's default number of steps (one for students, N for a 2-RF):
``OUT/validation/step-NNNNNNNN/{grid.png, 00.png, ...}`` and, with ``--log-dir``, the grid in TensorBoard. For a
reflow stage it also logs the straightness S of the N-step paths from a fixed noise batch (``train.metrics``). The
weights are swapped in and out in place (exact copies), and sampling uses its own seeds, so validating changes
nothing in the training result.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from runtime.files import atomic_write_bytes

from .common import TrainError, load_prompts

if TYPE_CHECKING:
    from .loop import Trainer, _Run

VALIDATION_SEED = 1234


def summary_writer(log_dir: str | None, purge_step: int | None, check_only: bool = False) -> Any:
    """TensorBoard's writer (a resumed run purges what was logged after ``purge_step``); one line without it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("--log-dir needs TensorBoard: pip install 'instaflow-rt[train]' (or tensorboard)") from None
    return None if check_only else SummaryWriter(log_dir=log_dir, purge_step=purge_step or None)


class Monitor:
    """Logging and validation of one run (a no-op on ranks other than 0, which only join the loss reduction)."""

    def __init__(self, trainer: "Trainer", r: "_Run", step: int) -> None:
        cfg = trainer.cfg
        self.trainer, self.r, self.cfg = trainer, r, cfg
        self.writer = summary_writer(cfg.log_dir, step) if cfg.log_dir and r.dist.main else None
        self._losses: list[float] = []
        self._norms: list[float] = []
        self._t, self._step = time.perf_counter(), step
        self.prompts: list[str] = []
        self.pipe: Any = None
        if cfg.validate_every:
            from runtime import Pipeline

            # a pipeline of its own: its embedding cache must not hand the trainer embeddings made in a batch
            self.pipe = Pipeline(r.components, device=r.device, dtype=torch.float32)
            source = load_prompts(cfg.validation_prompts) if cfg.validation_prompts else r.pairs.prompts
            self.prompts = list(source[:cfg.validation_num])
        if self.writer is not None and step == 0:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in vars(cfg).items()), 0)

    def step(self, step: int, loss: float, grad_norm: float) -> None:
        self._losses.append(loss)
        self._norms.append(grad_norm)
        if step % self.cfg.log_every and step != self.cfg.max_steps:
            return
        r = self.r
        mean = torch.tensor([sum(self._losses), len(self._losses)], dtype=torch.float64, device=r.device)
        if r.dist.world > 1:
            import torch.distributed as dist

            dist.all_reduce(mean)
        now = time.perf_counter()
        pairs = (step - self._step) * self.cfg.batch_size * r.accum * r.dist.world
        if self.writer is not None:
            w = self.writer
            w.add_scalar("train/loss", float(mean[0] / mean[1]), step)
            w.add_scalar("train/lr", r.opt.param_groups[0]["lr"], step)
            w.add_scalar("train/grad_norm", sum(self._norms) / len(self._norms), step)
            w.add_scalar("perf/pairs_per_s", pairs / max(now - self._t, 1e-9), step)
            w.add_scalar("perf/pairs_per_s_per_rank", pairs / max(now - self._t, 1e-9) / r.dist.world, step)
            if r.scaler.is_enabled():
                w.add_scalar("train/grad_scale", r.scaler.get_scale(), step)
                w.add_scalar("train/skipped_steps", self.trainer.skipped_steps, step)
            if r.device.type == "cuda":
                w.add_scalar("perf/max_memory_gib", torch.cuda.max_memory_allocated(r.device) / 2**30, step)
                torch.cuda.reset_peak_memory_stats(r.device)
            w.flush()
        self._losses, self._norms, self._t, self._step = [], [], now, step

    @torch.no_grad()
    def validate(self, step: int) -> Path | None:
        """Sample the validation prompts with the EMA weights (rank 0; the others wait)."""
        r = self.r
        folder = Path(self.cfg.out) / "validation" / f"step-{step:08d}"
        if r.dist.main:
            self._swap_ema()
            r.unet.eval()
            try:
                self._sample(step, folder)
            finally:
                r.unet.train()
                self._swap_ema()
        r.dist.barrier()
        return folder

    def _swap_ema(self) -> None:
        if self.r.ema is None:
            return
        for p, e in zip(self.r.unet.parameters(), self.r.ema):
            tmp = p.detach().clone()
            p.detach().copy_(e)
            e.copy_(tmp)

    def _sample(self, step: int, folder: Path) -> None:
        from torchvision.utils import make_grid

        from .metrics import pipeline_velocity, straightness

        cfg, pipe, extra = self.cfg, self.pipe, self.cfg.extra
        steps = cfg.validation_steps or int(extra.get("default_steps", 1))
        kwargs: dict[str, Any] = {"num_inference_steps": steps, "seed": VALIDATION_SEED, "output_type": "pt"}
        guidance = cfg.validation_guidance if cfg.validation_guidance is not None else extra.get("default_guidance")
        if guidance is not None:
            kwargs["guidance_scale"] = guidance
        images = pipe(self.prompts, **kwargs).images.float().cpu()
        folder.mkdir(parents=True, exist_ok=True)
        grid = make_grid(images, nrow=min(4, len(images)), padding=2)
        for i, img in enumerate(images):
            atomic_write_bytes(folder / f"{i:02d}.png", _png(img))
        atomic_write_bytes(folder / "grid.png", _png(grid))
        s = None
        if self.cfg.loss == "reflow":  # the 2-RF: how straight its paths are from a fixed noise batch
            c = pipe.components
            h, w = c.default_size
            z0 = pipe.prepare_latents(len(self.prompts), (c.latent_channels, h // c.vae_scale_factor,
                                                          w // c.vae_scale_factor), seed=VALIDATION_SEED)
            s = straightness(pipeline_velocity(pipe, self.prompts), z0, max(steps, 2))
        if self.writer is not None:
            self.writer.add_image("validation/samples", grid, step)
            if s is not None:
                self.writer.add_scalar("validation/straightness", s, step)
            self.writer.flush()
        print(f"validation at step {step}: {folder}" + (f", straightness {s:.4f}" if s is not None else ""),
              flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _png(img: torch.Tensor) -> bytes:
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
