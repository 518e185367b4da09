"""EDM teacher training (Karras et al. 2022, section 5 / ``training/loss.py`` EDMLoss).

Per sample ``ln sigma ~ N(P_mean, P_std^2)``, loss ``lambda(sigma) ||D(y + sigma n; sigma) - y||^2``
with ``lambda = (sigma^2 + sigma_data^2)/(sigma sigma_data)^2``, averaged over elements (EDM sums
and divides by the batch; the mean only rescales the learning rate).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fewstep.config import TeacherRunConfig, to_dict
from fewstep.core.precond import P_MEAN, P_STD, edm_loss_weight
from fewstep.core.utils import append_dims, mean_flat
from fewstep.data import Dataset, load_dataset
from fewstep.errors import ConfigError
from fewstep.models.io import build_denoiser, save_model
from fewstep.train import checkpoint as ckpt
from fewstep.train import dist
from fewstep.train.control import BadStep, Bookkeeper, LogAccumulator, StopSignals, out_of_time, reseed
from fewstep.train.ema import ema_beta, ema_update
from fewstep.train.phases import clip_and_check
from fewstep.train.rng import StepRandom, derive_seed
from fewstep.train.rundir import discard_unstarted_run, record_config, run_dir_status
from fewstep.train.runlog import RunLog


def describe_data(data: Dataset) -> dict:
    """What model.json records about the training data (to rebuild metrics and labels)."""
    return {"name": data.name, "kind": data.kind, "shape": list(data.shape),
            "num_classes": data.num_classes, **data.latent_record()}


def model_spec(cfg: TeacherRunConfig, data: Dataset) -> dict:
    """The architecture description stored in model.json (rebuilds the network)."""
    kind = cfg.model.type
    if kind == "auto":
        kind = "mlp" if data.kind == "vector" else "unet"
    if kind == "mlp":
        if data.kind != "vector":
            raise ConfigError(f"model.type=mlp needs vector data but {data.name} holds images; use "
                              "model.type=unet (or auto)")
        return {"type": "mlp", "dim": data.shape[0], "hidden": cfg.model.hidden,
                "depth": cfg.model.depth, "emb_dim": cfg.model.emb_dim,
                "num_classes": data.num_classes, "sigma_data": cfg.model.sigma_data}
    return {"type": "unet", "shape": list(data.shape), "block_out_channels": cfg.model.channels,
            "layers_per_block": cfg.model.layers_per_block, "num_classes": data.num_classes,
            "sigma_data": cfg.model.sigma_data}


def edm_loss(D, x: torch.Tensor, cond, rnd: StepRandom, sigma_data: float) -> torch.Tensor:
    """EDM denoising loss per sample ``[B]`` with noise drawn from ``rnd``."""
    sigma = (P_MEAN + P_STD * rnd.randn("sigma")).exp()
    n = rnd.randn("noise", *x.shape[1:]) * append_dims(sigma, x.ndim)
    weight = edm_loss_weight(sigma, sigma_data)
    return weight * mean_flat((D(x + n, sigma, cond) - x) ** 2)


@dataclass
class TeacherState:
    net: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    slices: list                   # this process's [lo, hi) micro-batches of the global batch
    model: torch.nn.Module | None = None  # what the loss calls: ``net``, or its DDP wrapper
    step: int = 0
    wall_s: float = 0.0
    bad_steps: int = 0
    log_acc: LogAccumulator = field(default_factory=LogAccumulator)

    def state_dict(self) -> dict:
        return {"step": self.step, "wall_s": self.wall_s, "bad_steps": self.bad_steps,
                "log_acc": self.log_acc.state_dict(), "net": self.net.state_dict(),
                "ema": self.ema.state_dict(), "opt": self.opt.state_dict(), "rng": ckpt.rng_state()}

    def load_state_dict(self, s: dict) -> None:
        self.net.load_state_dict(s["net"])
        self.ema.load_state_dict(s["ema"])
        self.opt.load_state_dict(s["opt"])
        self.step, self.wall_s, self.bad_steps = s["step"], s["wall_s"], s.get("bad_steps", 0)
        self.log_acc.load_state_dict(s.get("log_acc"))
        ckpt.set_rng_state(s["rng"])


def _lr(cfg: TeacherRunConfig, step: int) -> float:
    warm = cfg.optim.warmup
    return cfg.optim.lr * (min(1.0, (step + 1) / warm) if warm else 1.0)


def _micro_loss(state: TeacherState, data: Dataset, cfg: TeacherRunConfig, lo: int, hi: int, device):
    """The mean EDM loss of the global batch's ``[lo, hi)`` slice (draws made for the whole batch)."""
    rnd = StepRandom(cfg.train.seed, state.step, cfg.train.batch, lo, hi, device=device)
    x, y = data.train_batch(cfg.train.batch, rnd.generator("data"))
    x = x[lo:hi].to(device)
    y = y[lo:hi].to(device) if (y is not None and data.num_classes) else None
    return edm_loss(state.model or state.net, x, y, rnd, cfg.model.sigma_data).mean()


def _train_step(state: TeacherState, data: Dataset, cfg: TeacherRunConfig, device) -> float:
    """One optimiser step over this process's micro-batches; gradients are averaged over processes
    by DDP during the last backward. Raises ``BadStep`` (nothing applied) on a non-finite loss or
    gradient — every process sees the same averaged values, so all refuse together."""
    state.opt.zero_grad(set_to_none=True)
    local = sum(hi - lo for lo, hi in state.slices)
    total = 0.0
    for i, (lo, hi) in enumerate(state.slices):
        last = i == len(state.slices) - 1
        no_sync = getattr(state.model, "no_sync", None)
        with contextlib.nullcontext() if (last or no_sync is None) else no_sync():
            loss = _micro_loss(state, data, cfg, lo, hi, device)
            share = (hi - lo) / local
            (loss if share == 1 else loss * share).backward()
        total = total + loss.detach() * share
    loss = float(dist.all_mean(torch.as_tensor(total, dtype=torch.float64)))
    if not math.isfinite(loss):
        raise BadStep(f"term 'edm' is {loss}")
    clip_and_check(state.net.parameters(), cfg.optim.grad_clip, "teacher")
    for group in state.opt.param_groups:
        group["lr"] = _lr(cfg, state.step)
    state.opt.step()
    ema_update(state.ema, state.net, ema_beta(state.step, cfg.train.ema_halflife, cfg.train.ema_rampup))
    return loss


def build_teacher_net(cfg: TeacherRunConfig, data: Dataset):
    """``(spec, network)`` with weights initialised from the run seed (the same on every rank)."""
    spec = model_spec(cfg, data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.train.seed, "teacher-init"))
        return spec, build_denoiser(spec)


def train_teacher(cfg: TeacherRunConfig, out: Path, evaluate=None, progress: bool = True) -> Path:
    """Train (or resume, or skip if finished) a teacher into run directory ``out``.

    ``evaluate(model, step) -> dict`` is called every ``train.eval_every`` iterations and at the end.
    Under torchrun every process calls this; rank 0 writes the files.
    """
    out = Path(out)
    with dist.session(cfg.train.device, cfg.train.batch, cfg.train.micro_batch) as (env, device):
        data = load_dataset(cfg.data.name, conditional=cfg.data.conditional, vae=cfg.data.vae or None)
        spec, net = build_teacher_net(cfg, data)
        net = net.to(device)
        existed = out.exists()
        status = run_dir_status(env, out, to_dict(cfg), "teacher")
        if status == "done":
            return out
        state = TeacherState(net, copy.deepcopy(net).requires_grad_(False), _optimizer(net, cfg),
                             dist.shard(env, cfg.train.batch, cfg.train.micro_batch))
        with discard_unstarted_run(out, existed, enabled=env.is_main and status == "new"):
            if status == "resume":  # load before writing anything: a refused checkpoint changes nothing
                state.load_state_dict(ckpt.load_latest(out / "checkpoints", map_location=device))
            dist.on_main(record_config, out, to_dict(cfg))
            log = RunLog(out, enabled=env.is_main)
            dist.on_main(log.resume_from, state.step)
            if env.enabled:  # after loading: DDP broadcasts rank 0's weights at construction
                state.model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
            with StopSignals() as stop:
                _loop(state, data, cfg, out, log, device, evaluate, progress and env.is_main, stop)
            meta = {"role": "teacher", "iterations": state.step, "data": describe_data(data),
                    "train_wall_s": round(state.wall_s, 2), "sampler": cfg.sample.sampler,
                    "nfe": cfg.sample.nfe}
            dist.on_main(save_model, out, state.ema, spec, meta)
            log.close()
            state.model = None  # release DDP (its reducer holds the process group) before leaving
    return out


def _optimizer(net, cfg: TeacherRunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.AdamW(net.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay)


def _iteration(state: TeacherState, data, cfg, device) -> dict:
    """One iteration: a step, or a refused step (counted; the step index still advances)."""
    reseed(cfg.train.seed, state.step)
    try:
        logs = {"loss": _train_step(state, data, cfg, device), "lr": _lr(cfg, state.step)}
    except BadStep as e:
        state.bad_steps += 1
        logs = {"refused_step": str(e)}
    state.step += 1
    return logs


def _loop(state, data, cfg, out, log, device, evaluate, progress, stop) -> None:
    t, books = cfg.train, Bookkeeper(cfg.train, out, log, stop)
    bar = tqdm(total=t.iters, initial=state.step, desc="teacher", disable=not progress,
               dynamic_ncols=True)
    t0 = time.perf_counter() - state.wall_s
    eval_fn = (lambda: evaluate(state.ema, state.step)) if evaluate else None
    done = out_of_time(t, state.wall_s)
    while state.step < t.iters and not done:
        logs = _iteration(state, data, cfg, device)
        state.wall_s = time.perf_counter() - t0
        bar.update(1)
        done = out_of_time(t, state.wall_s)
        rec = books.after(state.step, state.wall_s, logs, state.log_acc, state.bad_steps,
                          state.state_dict, eval_fn, last=state.step == t.iters or done)
        if rec and "loss" in rec:
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
    bar.close()
    books.final(state.step, state.wall_s, eval_fn)
