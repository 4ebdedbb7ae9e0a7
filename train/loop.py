"""The training loop shared by ``train.reflow`` and ``train.distill``: only the loss differs.

DDP through torch.distributed (torchrun), AdamW with warm-up, gradient accumulation, bf16/fp16 autocast on GPUs,
optional gradient checkpointing and EMA, checkpoints every N steps that resume exactly (model, optimizer, LR
schedule, EMA, RNG state, step), only rank 0 writes. The result is a diffusers folder (``OUT/model``) whose
``model_index.json`` says it is a rectified flow.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from runtime import Pipeline, flow
from runtime.checkpoints import resolve
from runtime.models import Components, load_components, save_checkpoint

from runtime.files import atomic_write_with

from .common import Dist, TrainError, device_for, init_distributed, progress
from .pairset import PairSet, PairStream

Loss = Callable[["Batch"], torch.Tensor]
#: ``model_index.json`` class of the diffusion models this loop trains (SD's own)
DIFFUSION_PIPELINE_CLASS = "StableDiffusionPipeline"


@dataclass
class TrainConfig:
    """Settings of one training stage (every field is a command-line flag of ``train.reflow``/``train.distill``)."""

    pairs: str
    out: str
    init: str | None = None  # default: the teacher that made the pairs (v_k)
    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    text_dropout: float = 0.1
    ema: float = 0.0  # 0: off; the paper uses 0.9999
    grad_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto (bf16 on GPU), no, bf16, fp16
    save_every: int = 500
    seed: int = 0
    loss: str = "reflow"
    lpips_net: str = "vgg"
    lpips_random_backbone: bool = False  # tests only: LPIPS with an untrained backbone
    fresh_noise: bool = False  # draw new X0 every step (1-rectified flow from data: independent coupling)
    force: bool = False  # start over: discard the saved state of another run in the same folder
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    model: torch.nn.Module
    x0: torch.Tensor
    x1: torch.Tensor
    emb: torch.Tensor
    gen: torch.Generator
    components: Components


def reflow_loss(b: Batch) -> torch.Tensor:
    """|| (X1 - X0) - v(Xt, 1000 (1 - t) | T) ||^2 with Xt = t X1 + (1 - t) X0, t ~ U(0, 1)."""
    t = torch.rand(b.x0.shape[0], generator=b.gen).to(b.x0.device)
    xt = flow.interpolate(b.x0, b.x1, t)
    v = b.model(xt, flow.unet_time(t), encoder_hidden_states=b.emb, return_dict=False)[0]
    return F.mse_loss(v.float(), flow.velocity_target(b.x0, b.x1))


def one_step_prediction(b: Batch) -> torch.Tensor:
    """The student's image latent: X0 + v(X0, 1000 | T) (one Euler step from the noise end)."""
    return flow.one_step_latents(
        lambda x, t: b.model(x, t, encoder_hidden_states=b.emb, return_dict=False)[0].float(), b.x0)


def l2_loss(b: Batch) -> torch.Tensor:
    return F.mse_loss(one_step_prediction(b), b.x1)


def pseudo_huber_loss(b: Batch) -> torch.Tensor:
    pred = one_step_prediction(b)
    c = 0.00054 * math.sqrt(pred[0].numel())
    return (torch.sqrt((pred - b.x1) ** 2 + c * c) - c).mean()


def epsilon_loss(scheduler_config: dict[str, Any]) -> Loss:
    """The diffusion (DDPM) loss of an epsilon-prediction model under ``scheduler_config``'s noise schedule (SD's
    scaled-linear one, say): ``|| eps - eps_theta(sqrt(a_t) X1 + sqrt(1 - a_t) eps, t | T) ||^2``, t uniform over
    the training timesteps, eps = X0 (train with ``fresh_noise``). Trains a teacher in SD's role."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    alphas_cumprod = DDPMScheduler(**{k: scheduler_config[k] for k in keys}).alphas_cumprod
    if scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise TrainError(f"epsilon_loss trains epsilon prediction, the schedule says "
                         f"{scheduler_config['prediction_type']!r}")

    def loss(b: Batch) -> torch.Tensor:
        t = torch.randint(len(alphas_cumprod), (b.x0.shape[0],), generator=b.gen)
        a = alphas_cumprod[t].reshape(-1, *([1] * (b.x1.dim() - 1))).to(b.x1.device)
        xt = a.sqrt() * b.x1 + (1 - a).sqrt() * b.x0
        eps = b.model(xt, t.to(b.x1.device), encoder_hidden_states=b.emb, return_dict=False)[0]
        return F.mse_loss(eps.float(), b.x0)

    return loss


@dataclass
class _Run:
    """What one training run holds while it runs."""

    dist: Dist
    device: torch.device
    pairs: PairSet
    stream: PairStream  # this rank's micro-batches, a pure function of (seed, rank, world, index)
    checkpoint: Any
    components: Components
    unet: torch.nn.Module
    model: torch.nn.Module  # the UNet, wrapped in DDP on several ranks
    encoder: Pipeline  # text embeddings (cached per prompt)
    opt: Any
    sched: Any
    ema: list[torch.Tensor] | None
    gen: torch.Generator
    empty: torch.Tensor  # the embedding of "" (text dropout)


class Trainer:
    """One stage (reflow or distillation): the loop reads top to bottom in :meth:`run`."""

    def __init__(self, cfg: TrainConfig, loss: Loss, stage: str,
                 diffusion_scheduler: dict[str, Any] | None = None) -> None:
        """``diffusion_scheduler``: the model trained is a diffusion model (:func:`epsilon_loss`), saved as a
        ``StableDiffusionPipeline`` folder with this ``scheduler/`` config; None: a rectified flow."""
        self.cfg, self.loss_fn, self.stage = cfg, loss, stage
        self.diffusion_scheduler = diffusion_scheduler

    def run(self) -> Path:
        cfg = self.cfg
        self._check_config()
        r = self._setup()
        state_dir = Path(cfg.out) / "state"
        if cfg.force and r.dist.main:
            shutil.rmtree(state_dir, ignore_errors=True)
        r.dist.barrier()
        step = self._resume(state_dir, r)
        self._batches = r.stream.batches(start=step * cfg.grad_accum)  # resumes mid-epoch exactly
        amp = self._autocast(r.device)
        bar = progress(cfg.max_steps, self.stage, enabled=r.dist.main, unit="step")
        bar.update(step)
        t0, done0 = time.perf_counter(), step
        self.losses: list[float] = []
        while step < cfg.max_steps:
            total = self._train_step(r, amp, step)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", steps_s=f"{(step - done0) / (time.perf_counter() - t0):.2f}")
            self.losses.append(total)
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                self._save_state(r, state_dir, step)
        bar.close()
        self.steps_per_s = (step - done0) / max(time.perf_counter() - t0, 1e-9)
        return self._write_model(r, step)

    def _check_config(self) -> None:
        cfg = self.cfg
        for name in ("max_steps", "batch_size", "grad_accum", "save_every"):
            if getattr(cfg, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0.0 <= cfg.text_dropout < 1.0:
            raise TrainError(f"--text-dropout must be in [0, 1), got {cfg.text_dropout}")
        if not (math.isfinite(cfg.lr) and cfg.lr > 0):
            raise TrainError(f"--lr must be a positive number, got {cfg.lr}")
        if not 0.0 <= cfg.ema < 1.0:
            raise TrainError(f"--ema must be in [0, 1) (0 = off; the paper: 0.9999), got {cfg.ema}")
        if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0) or cfg.warmup_steps < 0:
            raise TrainError("--weight-decay and --warmup-steps must be >= 0")

    def _setup(self) -> _Run:
        """Ranks, pairs, the model to train (from ``--init`` or the pairs' teacher), optimizer, schedule, EMA."""
        cfg = self.cfg
        d = init_distributed()
        dev = device_for(d)
        pairs = PairSet(cfg.pairs)
        teacher = pairs.settings["teacher"]
        checkpoint = resolve(cfg.init or teacher.get("path") or teacher["name"])
        if cfg.init is None and checkpoint.fingerprint() != teacher["fingerprint"]:
            raise TrainError(f"the teacher {checkpoint.path} changed after its pairs in {cfg.pairs} were made; "
                             "regenerate the pairs, or start from another model with --init")
        comps = load_components(checkpoint, device=dev, dtype=torch.float32)
        if list(pairs.settings["latent_shape"][:1]) != [comps.latent_channels]:
            raise TrainError(f"pairs have latents {pairs.settings['latent_shape']} but {checkpoint.name}'s UNet takes "
                             f"{comps.latent_channels} channels: pairs from another model family")
        unet = comps.unet.train().requires_grad_(True)
        if cfg.grad_checkpointing:
            unet.enable_gradient_checkpointing()
        encoder = Pipeline(comps, device=dev, dtype=torch.float32, embedding_cache_size=4096)
        model: torch.nn.Module = unet
        if d.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[d.local_rank] if dev.type == "cuda"
                                                              else None)
        # fused: one kernel for every parameter (CPU and CUDA); 4x faster than the per-tensor loop on the CPU
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                fused=dev.type in ("cpu", "cuda"))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)))
        ema = [p.detach().clone() for p in unet.parameters()] if cfg.ema > 0 else None
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + d.rank)
        stream = PairStream(pairs, cfg.batch_size, seed=cfg.seed, rank=d.rank, world=d.world)
        return _Run(d, dev, pairs, stream, checkpoint, comps, unet, model, encoder, opt, sched, ema, gen,
                    empty=encoder.encode([""])[0])

    def _train_step(self, r: _Run, amp: Any, step: int) -> float:
        """Optimizer step ``step + 1`` over ``grad_accum`` micro-batches; returns the loss."""
        cfg, total = self.cfg, 0.0
        for micro in range(cfg.grad_accum):
            x0, x1, texts = r.pairs.pairs(next(self._batches))
            with torch.no_grad():
                emb = r.encoder.encode(texts).clone()
            drop = torch.rand(cfg.batch_size, generator=r.gen) < cfg.text_dropout
            emb[drop.to(r.device)] = r.empty
            x1 = x1.to(r.device)
            x0 = torch.randn(x1.shape, generator=r.gen).to(r.device) if cfg.fresh_noise else x0.to(r.device)
            batch = Batch(r.model, x0, x1, emb, r.gen, r.components)
            sync = micro == cfg.grad_accum - 1 or r.dist.world == 1
            with (nullcontext() if sync else r.model.no_sync()), amp:
                loss = self.loss_fn(batch) / cfg.grad_accum
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(r.unet.parameters(), 1.0)
        r.opt.step()
        r.sched.step()
        r.opt.zero_grad(set_to_none=True)
        if r.ema is not None:
            decay = ema_decay(cfg.ema, step)
            with torch.no_grad():
                torch._foreach_lerp_(r.ema, [p.detach() for p in r.unet.parameters()], 1.0 - decay)
        return total

    def _write_model(self, r: _Run, step: int) -> Path:
        """The trained UNet (its EMA weights when EMA is on) as a diffusers folder, written by rank 0."""
        if r.ema is not None:
            with torch.no_grad():
                for e, p in zip(r.ema, r.unet.parameters()):
                    p.copy_(e)
        model_dir = Path(self.cfg.out) / "model"
        if r.dist.main:
            r.unet.eval()
            info = {"stage": self.stage, "init": r.checkpoint.name, "pairs": str(self.cfg.pairs), "steps": step,
                    "config": {k: v for k, v in asdict(self.cfg).items() if k != "extra"}, **self.cfg.extra}
            if self.diffusion_scheduler is None:
                save_checkpoint(r.components, model_dir, extra={"_instaflow": info})
            else:
                save_checkpoint(r.components, model_dir, class_name=DIFFUSION_PIPELINE_CLASS,
                                extra={"_instaflow": info}, scheduler_config=self.diffusion_scheduler)
            print(f"wrote {model_dir} ({step} steps)", flush=True)
        r.dist.barrier()
        return model_dir

    # ------------------------------------------------------------------------------------------ state
    def _autocast(self, dev: torch.device) -> Any:
        mp = self.cfg.mixed_precision
        if dev.type != "cuda" or mp == "no":
            return nullcontext()
        dtype = torch.float16 if mp == "fp16" else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)

    def _identity(self, r: _Run) -> dict[str, Any]:
        """What a resumed run must share with the saved one: the stage, the pairs (their shard checksums) and every
        setting that changes the result (not --max-steps, --save-every or gradient checkpointing)."""
        cfg = self.cfg
        keep = ("init", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "text_dropout", "ema",
                "mixed_precision", "seed", "loss", "lpips_net", "fresh_noise")
        return {"stage": self.stage, "pairs": r.pairs.digest, **{k: getattr(cfg, k) for k in keep}}

    def _save_state(self, r: _Run, folder: Path, step: int) -> None:
        d = r.dist
        gens = [r.gen.get_state()]
        if d.world > 1:  # every rank's sampling RNG, so that a resumed run draws the same batches
            import torch.distributed as dist

            gathered: list[Any] = [None] * d.world
            dist.all_gather_object(gathered, r.gen.get_state())
            gens = gathered
        if d.main:
            folder.mkdir(parents=True, exist_ok=True)
            state = {"step": step, "run": self._identity(r), "unet": r.unet.state_dict(),
                     "optimizer": r.opt.state_dict(), "scheduler": r.sched.state_dict(), "ema": r.ema,
                     "generators": gens}  # streamed to disk: at SD size this is ~10 GB, never held as bytes
            atomic_write_with(folder / f"step-{step:08d}.pt", lambda f: torch.save(state, f))
            for old in sorted(folder.glob("step-*.pt"))[:-2]:  # keep the last two
                old.unlink()
        d.barrier()

    def _resume(self, folder: Path, r: _Run) -> int:
        """Continue from the newest state in ``folder``, if it is a state of this very run (else one line; --force
        starts over)."""
        states = sorted(folder.glob("step-*.pt")) if folder.is_dir() else []
        if not states:
            return 0
        # our own files, but loaded the safe way: tensors and plain containers only
        state = torch.load(states[-1], map_location="cpu", weights_only=True)
        saved, now = state.get("run", {}), self._identity(r)
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if differ:
            shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in differ if k != "pairs")
            shown += ", other pairs" if "pairs" in differ else ""
            raise TrainError(f"{folder.parent} holds a run with other settings ({shown}); use another -o folder, "
                             "or --force to start this one over")
        r.unet.load_state_dict(state["unet"])
        r.opt.load_state_dict(state["optimizer"])
        r.sched.load_state_dict(state["scheduler"])
        if r.ema is not None and state["ema"] is not None:
            for e, s in zip(r.ema, state["ema"]):
                e.copy_(s)
        rank = int(os.environ.get("RANK", "0"))
        gens = state["generators"]
        r.gen.set_state(gens[rank] if rank < len(gens) else gens[0])
        print(f"resumed {self.stage} from {states[-1].name}", flush=True)
        return int(state["step"])


def ema_decay(ema: float, step: int) -> float:
    """EMA decay for the update after ``step`` optimizer steps: ``min(ema, (1 + step) / (10 + step))``, the usual
    warm-up, so that a run much shorter than 1 / (1 - ema) steps does not ship almost its initial weights."""
    return min(ema, (1 + step) / (10 + step))


def add_common_args(p: Any, defaults: TrainConfig) -> None:
    p.add_argument("--pairs", required=True, help="pairs folder from `python -m train.pairs`")
    p.add_argument("-o", "--output", required=True, help="run folder: OUT/model (diffusers), OUT/state (resume)")
    p.add_argument("--init", default=None, help="checkpoint to start from [the teacher that made the pairs]")
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--text-dropout", type=float, default=defaults.text_dropout)
    p.add_argument("--ema", type=float, default=defaults.ema,
                   help="EMA decay in [0, 1), 0 = off (paper: 0.9999), warmed up as min(ema, (1+step)/(10+step))")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    p.add_argument("--save-every", type=int, default=defaults.save_every)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--force", action="store_true", help="start over, discarding the saved state in -o")


def config_from_args(a: Any, **extra: Any) -> TrainConfig:
    return TrainConfig(pairs=a.pairs, out=a.output, init=a.init, max_steps=a.max_steps, batch_size=a.batch_size,
                       grad_accum=a.grad_accum, lr=a.lr, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
                       text_dropout=a.text_dropout, ema=a.ema, grad_checkpointing=a.grad_checkpointing,
                       mixed_precision=a.mixed_precision, save_every=a.save_every, seed=a.seed, force=a.force,
                       **extra)
