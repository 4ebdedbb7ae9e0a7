"""The training loop shared by ``train.reflow`` and ``train.distill``: only the loss differs.

DDP through torch.distributed (torchrun); AdamW on fp32 master weights with an LR schedule (constant, constant with
warm-up, cosine) and gradient clipping; gradient accumulation (or a global batch that fixes it from the world size);
bf16 autocast (the default on GPUs that have it) or fp16 autocast with a gradient scaler; optional gradient
checkpointing and EMA. Pairs are read ahead on a background thread, with cached text embeddings when the pairs folder
has them for this text encoder (it is frozen: only the UNet trains). Resumable state every N steps through
``torch.distributed.checkpoint`` (``train.checkpoint``: every rank writes its part, atomic, the last K kept, exact
resume); TensorBoard logs and validation samples (``train.monitor``). The result is a diffusers folder
(``OUT/model``) whose ``model_index.json`` says it is a rectified flow.
"""

from __future__ import annotations

import math
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

from . import checkpoint as ckpt_io
from .common import Dist, TrainError, device_for, init_distributed, load_prompts, progress
from .pairset import Loader, PairSet, PairStream

Loss = Callable[["Batch"], torch.Tensor]
#: ``model_index.json`` class of the diffusion models this loop trains (SD's own)
DIFFUSION_PIPELINE_CLASS = "StableDiffusionPipeline"
LR_SCHEDULES = ("constant", "constant-with-warmup", "cosine")
PRECISIONS = ("auto", "no", "bf16", "fp16")
TEXT_EMBEDDINGS = ("auto", "cached", "encode")


@dataclass
class TrainConfig:
    """Settings of one training stage (every field is a command-line flag of ``train.reflow``/``train.distill``).
    Defaults follow the paper where it states a value (EMA 0.9999, reflow lr 1e-6); the recipe file
    ``train/recipes/instaflow_sd15.toml`` holds every stage's published settings."""

    pairs: str
    out: str
    init: str | None = None  # default: the teacher that made the pairs (v_k)
    max_steps: int = 1000
    batch_size: int = 16  # per rank and micro-batch
    grad_accum: int = 1
    global_batch: int | None = None  # pairs per optimizer step over all ranks; sets grad_accum from the world size
    lr: float = 1e-6
    weight_decay: float = 1e-2
    lr_schedule: str = "constant-with-warmup"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0: no clipping
    text_dropout: float = 0.1
    ema: float = 0.9999  # 0: off
    grad_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp16 with a scaler; fp32 on CPU), no, ...
    save_every: int = 500
    keep: int = 2  # resumable states kept
    seed: int = 0
    loss: str = "reflow"
    lpips_net: str = "vgg"
    lpips_random_backbone: bool = False  # tests only: LPIPS with an untrained backbone
    fresh_noise: bool = False  # draw new X0 every step (1-rectified flow from data: independent coupling)
    force: bool = False  # start over: discard the saved state of another run in the same folder
    prefetch: int = 8  # micro-batches read ahead on a background thread (0: read on the training thread)
    text_embeddings: str = "auto"  # auto: cached when the pairs have them for this text encoder; cached; encode
    log_dir: str | None = None  # TensorBoard
    log_every: int = 10
    validate_every: int = 0  # 0: off
    validation_prompts: str | None = None  # file; default: the first --validation-num prompts of the pairs
    validation_num: int = 8
    validation_steps: int | None = None  # default: the model's default steps (1 for students)
    validation_guidance: float | None = None
    recipe: str | None = None  # FILE:TABLE the settings came from (recorded, not part of the run's identity)
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


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """The learning rate of optimizer step ``step + 1`` relative to ``--lr``: linear warm-up over ``warmup`` steps,
    then constant, or cosine to 0 at ``total`` (diffusers' ``get_cosine_schedule_with_warmup``, half a cycle)."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant-with-warmup":
        return 1.0
    progress_ = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress_, 1.0))))


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that have it, fp16 (with a gradient scaler) on those that do not, fp32 on the CPU."""
    if mixed_precision != "auto":
        return mixed_precision
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


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
    encoder: Pipeline  # text embeddings (cached per prompt); also samples the validation images
    opt: Any
    sched: Any
    scaler: Any  # torch.amp.GradScaler, enabled for fp16 only
    ema: list[torch.Tensor] | None
    gen: torch.Generator
    empty: torch.Tensor  # the embedding of "" (text dropout)
    accum: int  # micro-batches per optimizer step
    precision: str  # resolved: no, bf16, fp16
    embeddings: str  # "encoded" or "cached:<key>"


class Trainer:
    """One stage (reflow or distillation): the loop reads top to bottom in :meth:`run`."""

    def __init__(self, cfg: TrainConfig, loss: Loss, stage: str,
                 diffusion_scheduler: dict[str, Any] | None = None) -> None:
        """``diffusion_scheduler``: the model trained is a diffusion model (:func:`epsilon_loss`), saved as a
        ``StableDiffusionPipeline`` folder with this ``scheduler/`` config; None: a rectified flow."""
        self.cfg, self.loss_fn, self.stage = cfg, loss, stage
        self.diffusion_scheduler = diffusion_scheduler
        self.skipped_steps = 0  # fp16: optimizer steps the gradient scaler skipped (inf/NaN gradients)

    def run(self) -> Path:
        from .monitor import Monitor

        cfg = self.cfg
        self._check_config()
        r = self._setup()
        state_dir = Path(cfg.out) / "state"
        if cfg.force and r.dist.main:
            shutil.rmtree(state_dir, ignore_errors=True)
        r.dist.barrier()
        step = self._resume(state_dir, r)
        loader = Loader(r.pairs, r.stream, start=step * r.accum, prefetch=cfg.prefetch, pin=r.device.type == "cuda")
        monitor = Monitor(self, r, step)
        amp = self._autocast(r)
        bar = progress(cfg.max_steps, self.stage, enabled=r.dist.main, unit="step")
        bar.update(step)
        t0, done0 = time.perf_counter(), step
        self.resumed_from = step  # the saved state's step this run continued from (0: a fresh start)
        self.losses: list[float] = []
        try:
            while step < cfg.max_steps:
                total, grad_norm = self._train_step(r, amp, loader, step)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}", steps_s=f"{(step - done0) / (time.perf_counter() - t0):.2f}")
                self.losses.append(total)
                monitor.step(step, total, grad_norm)
                if cfg.validate_every and step % cfg.validate_every == 0:
                    monitor.validate(step)
                if step % cfg.save_every == 0 or step == cfg.max_steps:
                    self._save_state(r, state_dir, step)
        finally:
            loader.close()
            monitor.close()
        bar.close()
        self.steps_per_s = (step - done0) / max(time.perf_counter() - t0, 1e-9)
        return self._write_model(r, step)

    def _check_config(self) -> None:
        cfg = self.cfg
        for name in ("max_steps", "batch_size", "grad_accum", "save_every", "keep", "log_every", "validation_num"):
            if getattr(cfg, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1")
        if cfg.global_batch is not None and cfg.global_batch < 1:
            raise TrainError(f"--global-batch must be >= 1, got {cfg.global_batch}")
        if cfg.validate_every < 0 or cfg.prefetch < 0:
            raise TrainError("--validate-every and --prefetch must be >= 0")
        if cfg.validation_steps is not None and cfg.validation_steps < 1:
            raise TrainError(f"--validation-steps must be >= 1, got {cfg.validation_steps}")
        if not 0.0 <= cfg.text_dropout < 1.0:
            raise TrainError(f"--text-dropout must be in [0, 1), got {cfg.text_dropout}")
        if not (math.isfinite(cfg.lr) and cfg.lr > 0):
            raise TrainError(f"--lr must be a positive number, got {cfg.lr}")
        if not 0.0 <= cfg.ema < 1.0:
            raise TrainError(f"--ema must be in [0, 1) (0 = off; the paper: 0.9999), got {cfg.ema}")
        if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0) or cfg.warmup_steps < 0:
            raise TrainError("--weight-decay and --warmup-steps must be >= 0")
        if not (math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm >= 0):
            raise TrainError(f"--max-grad-norm must be >= 0 (0 = no clipping), got {cfg.max_grad_norm}")
        if cfg.lr_schedule not in LR_SCHEDULES:
            raise TrainError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule!r}")
        if cfg.lr_schedule == "constant" and cfg.warmup_steps:
            raise TrainError("--lr-schedule constant has no warm-up; use constant-with-warmup with --warmup-steps")
        if cfg.mixed_precision not in PRECISIONS:
            raise TrainError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, got {cfg.mixed_precision!r}")
        if cfg.text_embeddings not in TEXT_EMBEDDINGS:
            raise TrainError(f"--text-embeddings must be one of {', '.join(TEXT_EMBEDDINGS)}")
        if cfg.log_dir:
            from .monitor import summary_writer

            summary_writer(None, None, check_only=True)  # tensorboard installed: before any work
        if cfg.validate_every and cfg.validation_prompts:
            load_prompts(cfg.validation_prompts)

    def _accumulation(self, d: Dist) -> int:
        cfg = self.cfg
        if cfg.global_batch is None:
            return cfg.grad_accum
        per_step = cfg.batch_size * d.world
        if cfg.global_batch % per_step:
            raise TrainError(f"--global-batch {cfg.global_batch} is not a multiple of --batch-size {cfg.batch_size} x "
                             f"{d.world} rank(s)")
        accum = cfg.global_batch // per_step
        if cfg.grad_accum not in (1, accum):
            raise TrainError(f"--grad-accum {cfg.grad_accum} contradicts --global-batch {cfg.global_batch} "
                             f"(= {cfg.batch_size} x {d.world} rank(s) x {accum}); give one of them")
        return accum

    def _setup(self) -> _Run:
        """Ranks, pairs, the model to train (from ``--init`` or the pairs' teacher), optimizer, schedule, EMA."""
        cfg = self.cfg
        d = init_distributed()
        dev = device_for(d)
        accum = self._accumulation(d)
        precision = resolve_precision(cfg.mixed_precision, dev)
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
        embeddings = self._embeddings(pairs, comps)
        unet = comps.unet.train().requires_grad_(True)
        if cfg.grad_checkpointing:
            unet.enable_gradient_checkpointing()
            if getattr(comps.vae, "_supports_gradient_checkpointing", False):
                comps.vae.enable_gradient_checkpointing()  # LPIPS distillation back-propagates through the decoder
        encoder = Pipeline(comps, device=dev, dtype=torch.float32, embedding_cache_size=4096)
        model: torch.nn.Module = unet
        if d.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[d.local_rank] if dev.type == "cuda"
                                                              else None)
        # fused: one kernel for every parameter (CPU and CUDA); 4x faster than the per-tensor loop on the CPU
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                fused=dev.type in ("cpu", "cuda"))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(cfg.lr_schedule, s, cfg.warmup_steps, cfg.max_steps))
        scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
        ema = [p.detach().clone() for p in unet.parameters()] if cfg.ema > 0 else None
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + d.rank)
        stream = PairStream(pairs, cfg.batch_size, seed=cfg.seed, rank=d.rank, world=d.world)
        return _Run(d, dev, pairs, stream, checkpoint, comps, unet, model, encoder, opt, sched, scaler, ema, gen,
                    empty=encoder.encode([""])[0], accum=accum, precision=precision, embeddings=embeddings)

    def _embeddings(self, pairs: PairSet, comps: Components) -> str:
        """Where text embeddings come from: the pairs folder's cache for this very text encoder (frozen during
        training, so an embedding never changes), or the encoder on the fly."""
        from .embed import text_encoder_identity

        mode = self.cfg.text_embeddings
        if mode == "encode":
            return "encoded"
        key = pairs.use_embeddings(text_encoder_identity(comps))
        if key is None:
            if mode == "cached":
                raise TrainError(f"{pairs.folder} has no text-embedding cache for this model's text encoder; make one "
                                 f"with `python -m train.embed --pairs {pairs.folder}`, or use --text-embeddings auto")
            return "encoded"
        return f"cached:{key}"

    def _train_step(self, r: _Run, amp: Any, loader: Loader, step: int) -> tuple[float, float]:
        """Optimizer step ``step + 1`` over the micro-batches; returns the loss and the gradient norm (before
        clipping)."""
        cfg, total = self.cfg, 0.0
        for micro in range(r.accum):
            x0, x1, texts, emb = next(loader)
            if emb is None:
                with torch.no_grad():
                    # each text in a call of its own: its embedding does not depend on the batch (exact resume, and
                    # equal to the cached embeddings of `python -m train.embed`)
                    emb = r.encoder.encode(texts, separately=True).clone()
            else:
                emb = emb.to(r.device, non_blocking=True)
            drop = torch.rand(cfg.batch_size, generator=r.gen) < cfg.text_dropout
            emb[drop.to(r.device)] = r.empty
            x1 = x1.to(r.device, non_blocking=True)
            x0 = torch.randn(x1.shape, generator=r.gen).to(r.device) if cfg.fresh_noise else x0.to(r.device)
            batch = Batch(r.model, x0, x1, emb, r.gen, r.components)
            sync = micro == r.accum - 1 or r.dist.world == 1
            with (nullcontext() if sync else r.model.no_sync()), amp:
                loss = self.loss_fn(batch) / r.accum
            r.scaler.scale(loss).backward()
            total += float(loss.detach())
        r.scaler.unscale_(r.opt)  # no-op unless fp16: clipping and the logged norm see the true gradients
        norm = torch.nn.utils.clip_grad_norm_(r.unet.parameters(), cfg.max_grad_norm or math.inf)
        scale = r.scaler.get_scale() if r.scaler.is_enabled() else None
        r.scaler.step(r.opt)  # fp16: skipped when a gradient is inf/NaN
        r.scaler.update()
        r.opt.zero_grad(set_to_none=True)
        if scale is not None and r.scaler.get_scale() < scale:  # skipped: schedule and EMA wait too
            self.skipped_steps += 1
            return total, float(norm)
        r.sched.step()
        if r.ema is not None:
            decay = ema_decay(cfg.ema, step)
            with torch.no_grad():
                torch._foreach_lerp_(r.ema, [p.detach() for p in r.unet.parameters()], 1.0 - decay)
        return total, float(norm)

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
    def _autocast(self, r: _Run) -> Any:
        """bf16 or fp16 autocast (on the CPU too, where autocast exists); the weights and AdamW stay fp32."""
        if r.precision == "no":
            return nullcontext()
        return torch.autocast(r.device.type, dtype=torch.float16 if r.precision == "fp16" else torch.bfloat16)

    def _identity(self, r: _Run) -> dict[str, Any]:
        """What a resumed run must share with the saved one: the stage, the pairs (their shard checksums) and every
        setting that changes the result. Not --max-steps (unless the cosine schedule depends on it), --save-every,
        --keep, logging, validation, prefetching or gradient checkpointing; not the world size or the micro-batch
        when the global batch is the same (a resume may reshard)."""
        cfg = self.cfg
        keep = ("init", "lr", "weight_decay", "lr_schedule", "warmup_steps", "max_grad_norm", "text_dropout", "ema",
                "seed", "loss", "lpips_net", "fresh_noise")
        out = {"stage": self.stage, "pairs": r.pairs.digest, "global_batch": cfg.batch_size * r.accum * r.dist.world,
               "mixed_precision": r.precision, "text_embeddings": r.embeddings,
               **{k: getattr(cfg, k) for k in keep}}
        if cfg.lr_schedule == "cosine":
            out["max_steps"] = cfg.max_steps
        return out

    def _state_tensors(self, r: _Run) -> dict[str, torch.Tensor]:
        """Everything a state holds as tensors, by name: model, EMA, AdamW state, this rank's RNG."""
        names = [n for n, _ in r.unet.named_parameters()]
        out = {f"model.{k}": v for k, v in r.unet.state_dict().items()}
        if r.ema is not None:
            out.update({f"ema.{n}": e for n, e in zip(names, r.ema)})
        for n, p in zip(names, r.unet.parameters()):
            for k, v in r.opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    out[f"optim.{n}.{k}"] = v
        out[f"rng.{r.dist.rank}"] = r.gen.get_state()
        return out

    def _save_state(self, r: _Run, folder: Path, step: int) -> None:
        groups = r.opt.state_dict()["param_groups"]
        meta = {"run": self._identity(r), "optimizer": groups, "scheduler": r.sched.state_dict(),
                "scaler": r.scaler.state_dict(), "skipped_steps": self.skipped_steps}
        ckpt_io.save(folder, step, self._state_tensors(r), meta, r.dist, self.cfg.keep)

    def _resume(self, folder: Path, r: _Run) -> int:
        """Continue from the newest state in ``folder``, if it is a state of this very run (else one line; --force
        starts over)."""
        found = ckpt_io.states(folder)
        if not found:
            old = ckpt_io.legacy_states(folder)
            if old:
                raise TrainError(f"{folder} holds a state of an earlier version of the trainer ({old[-1].name}); "
                                 "finish that run with that version, use another -o folder, or --force to start over")
            return 0
        path = found[-1]
        meta = ckpt_io.read_meta(path)
        saved, now = meta.get("run", {}), self._identity(r)
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if differ:
            shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in differ if k != "pairs")
            if "pairs" in differ:
                shown += (", " if shown else "") + "other pairs"
            raise TrainError(f"{folder.parent} holds a run with other settings ({shown}); use another -o folder, "
                             "or --force to start this one over")
        shapes = ckpt_io.saved_tensors(path)
        tensors = {k: v for k, v in self._state_tensors(r).items() if not k.startswith(("optim.", "rng."))}
        names = dict(r.unet.named_parameters())
        optim: dict[str, dict[str, torch.Tensor]] = {}
        for key, (shape, dtype) in shapes.items():
            if key.startswith("optim."):
                pname, k = key[len("optim."):].rsplit(".", 1)
                if pname not in names:
                    raise TrainError(f"{path} holds optimizer state for {pname}, which this model does not have: not "
                                     "a state of this model; use another -o folder, or --force to start over")
                dev = names[pname].device if shape else torch.device("cpu")
                tensors[key] = optim.setdefault(pname, {})[k] = torch.empty(shape, dtype=dtype, device=dev)
        rng_key = f"rng.{r.dist.rank}"
        same_world = meta.get("world") == r.dist.world and rng_key in shapes
        if same_world:
            tensors[rng_key] = torch.empty(shapes[rng_key][0], dtype=torch.uint8)
        missing = sorted(k for k in tensors if k not in shapes)
        if missing:
            raise TrainError(f"{path} lacks {missing[0]} ({len(missing)} tensors): not a state of this model; "
                             "use another -o folder, or --force to start over")
        ckpt_io.load(path, tensors, r.dist)
        index = {n: i for i, n in enumerate(names)}
        r.opt.load_state_dict({"state": {index[n]: s for n, s in optim.items()},
                               "param_groups": [{**g, "betas": tuple(g["betas"])} for g in meta["optimizer"]]})
        r.sched.load_state_dict(meta["scheduler"])
        if r.scaler.is_enabled() and meta["scaler"]:
            r.scaler.load_state_dict(meta["scaler"])
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        step = int(meta["step"])
        if same_world:
            r.gen.set_state(tensors[rng_key])
        else:  # resharded: the data order follows the new world size; a fresh RNG per rank, seeded from the step
            r.gen.manual_seed(self.cfg.seed * 1000 + r.dist.rank + 7919 * step)
            if r.dist.main:
                print(f"world size {meta.get('world')} -> {r.dist.world}: pairs continue {step} optimizer steps into "
                      "the run in the new world's order", flush=True)
        print(f"resumed {self.stage} from {path.name}", flush=True)
        return step


def ema_decay(ema: float, step: int) -> float:
    """EMA decay for the update after ``step`` optimizer steps: ``min(ema, (1 + step) / (10 + step))``, the usual
    warm-up, so that a run much shorter than 1 / (1 - ema) steps does not ship almost its initial weights."""
    return min(ema, (1 + step) / (10 + step))


def add_common_args(p: Any, defaults: TrainConfig) -> None:
    p.add_argument("--recipe", default=None,
                   help="FILE:TABLE of settings (e.g. train/recipes/instaflow_sd15.toml:reflow-1); flags override "
                        "it")
    p.add_argument("--pairs", required=True, help="pairs folder from `python -m train.pairs`")
    p.add_argument("-o", "--output", required=True, help="run folder: OUT/model (diffusers), OUT/state (resume)")
    p.add_argument("--init", default=None, help="checkpoint to start from [the teacher that made the pairs]")
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="pairs per rank and micro-batch")
    p.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    p.add_argument("--global-batch", type=int, default=defaults.global_batch,
                   help="pairs per optimizer step over all ranks (the paper's batch); sets --grad-accum")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--lr-schedule", default=defaults.lr_schedule, choices=LR_SCHEDULES)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm, help="gradient clipping, 0 = off")
    p.add_argument("--text-dropout", type=float, default=defaults.text_dropout)
    p.add_argument("--ema", type=float, default=defaults.ema,
                   help="EMA decay in [0, 1), 0 = off (paper: 0.9999), warmed up as min(ema, (1+step)/(10+step))")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (UNet, and the VAE decoder for LPIPS)")
    p.add_argument("--mixed-precision", default=defaults.mixed_precision, choices=PRECISIONS,
                   help="auto: bf16 on GPUs that have it, else fp16 with a gradient scaler; fp32 on the CPU")
    p.add_argument("--save-every", type=int, default=defaults.save_every)
    p.add_argument("--keep", type=int, default=defaults.keep, help="resumable states kept (newest)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--prefetch", type=int, default=defaults.prefetch,
                   help="micro-batches read ahead on a background thread (0 = off)")
    p.add_argument("--text-embeddings", default=defaults.text_embeddings, choices=TEXT_EMBEDDINGS,
                   help="auto: the pairs' cache (`python -m train.embed`) when it matches this text encoder")
    p.add_argument("--log-dir", default=None, help="TensorBoard folder (loss, lr, gradient norm, pairs/s, memory)")
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--validate-every", type=int, default=defaults.validate_every,
                   help="sample the validation prompts with the EMA weights every N steps (0 = off)")
    p.add_argument("--validation-prompts", default=None, help="prompt file [the pairs' first prompts]")
    p.add_argument("--validation-num", type=int, default=defaults.validation_num)
    p.add_argument("--validation-steps", type=int, default=None, help="[the model's default: 1 for students]")
    p.add_argument("--validation-guidance", type=float, default=None)
    p.add_argument("--force", action="store_true", help="start over, discarding the saved state in -o")


def config_from_args(a: Any, **extra: Any) -> TrainConfig:
    names = ("init", "max_steps", "batch_size", "grad_accum", "global_batch", "lr", "weight_decay", "lr_schedule",
             "warmup_steps", "max_grad_norm", "text_dropout", "ema", "grad_checkpointing", "mixed_precision",
             "save_every", "keep", "seed", "force", "prefetch", "text_embeddings", "log_dir", "log_every",
             "validate_every", "validation_prompts", "validation_num", "validation_steps", "validation_guidance",
             "recipe")
    return TrainConfig(pairs=a.pairs, out=a.output, **{k: getattr(a, k) for k in names}, **extra)
