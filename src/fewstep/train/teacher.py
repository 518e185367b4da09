"""EDM teacher training (Karras et al. 2022, section 5 / ``training/loss.py`` EDMLoss).

Per sample ``ln sigma ~ N(P_mean, P_std^2)``, loss ``lambda(sigma) ||D(y + sigma n; sigma) - y||^2``
with ``lambda = (sigma^2 + sigma_data^2)/(sigma sigma_data)^2``, averaged over elements (EDM sums
and divides by the batch; the mean only rescales the learning rate).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fewstep.config import TeacherRunConfig, to_dict
from fewstep.core.precond import P_MEAN, P_STD, edm_loss_weight
from fewstep.core.utils import append_dims, mean_flat
from fewstep.data import Dataset, load_dataset
from fewstep.models.io import build_denoiser, save_model
from fewstep.train import checkpoint as ckpt
from fewstep.train.device import resolve_device
from fewstep.train.ema import ema_beta, ema_update
from fewstep.train.rng import StepRandom
from fewstep.train.rundir import prepare_run_dir
from fewstep.train.runlog import RunLog


def describe_data(data: Dataset) -> dict:
    """What model.json records about the training data (to rebuild metrics and labels)."""
    return {"name": data.name, "kind": data.kind, "shape": list(data.shape),
            "num_classes": data.num_classes}


def model_spec(cfg: TeacherRunConfig, data: Dataset) -> dict:
    """The architecture description stored in model.json (rebuilds the network)."""
    kind = cfg.model.type
    if kind == "auto":
        kind = "mlp" if data.kind == "vector" else "unet"
    if kind == "mlp":
        if data.kind != "vector":
            raise ValueError("model.type=mlp needs vector data; use unet for images")
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
    step: int = 0
    wall_s: float = 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "wall_s": self.wall_s, "net": self.net.state_dict(),
                "ema": self.ema.state_dict(), "opt": self.opt.state_dict(), "rng": ckpt.rng_state()}

    def load_state_dict(self, s: dict) -> None:
        self.net.load_state_dict(s["net"])
        self.ema.load_state_dict(s["ema"])
        self.opt.load_state_dict(s["opt"])
        self.step, self.wall_s = s["step"], s["wall_s"]
        ckpt.set_rng_state(s["rng"])


def _lr(cfg: TeacherRunConfig, step: int) -> float:
    warm = cfg.optim.warmup
    return cfg.optim.lr * (min(1.0, (step + 1) / warm) if warm else 1.0)


def _train_step(state: TeacherState, data: Dataset, cfg: TeacherRunConfig, device) -> float:
    step = state.step
    rnd = StepRandom(cfg.train.seed, step, cfg.train.batch, device=device)
    x, y = data.train_batch(cfg.train.batch, rnd.generator("data"))
    x = x.to(device)
    y = y.to(device) if (y is not None and data.num_classes) else None
    loss = edm_loss(state.net, x, y, rnd, cfg.model.sigma_data).mean()
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.net.parameters(), cfg.optim.grad_clip)
    for group in state.opt.param_groups:
        group["lr"] = _lr(cfg, step)
    state.opt.step()
    ema_update(state.ema, state.net, ema_beta(step, cfg.train.ema_halflife, cfg.train.ema_rampup))
    state.step += 1
    return loss.item()


def train_teacher(cfg: TeacherRunConfig, out: Path, evaluate=None, progress: bool = True) -> Path:
    """Train (or resume, or skip if finished) a teacher into run directory ``out``.

    ``evaluate(model, step) -> dict`` is called every ``train.eval_every`` iterations and at the end.
    """
    out = Path(out)
    data = load_dataset(cfg.data.name, conditional=cfg.data.conditional)
    device = resolve_device(cfg.train.device)
    spec = model_spec(cfg, data)
    net = build_denoiser(spec).to(device)
    status = prepare_run_dir(out, to_dict(cfg))
    if status == "done":
        print(f"{out} already holds the finished teacher; nothing to do")
        return out
    state = TeacherState(net, copy.deepcopy(net).requires_grad_(False), _optimizer(net, cfg))
    log = RunLog(out)
    if status == "resume":
        state.load_state_dict(ckpt.load_latest(out / "checkpoints", map_location=device))
        log.resume_from(state.step)
    _loop(state, data, cfg, out, log, device, evaluate, progress)
    meta = {"role": "teacher", "iterations": state.step, "data": describe_data(data),
            "train_wall_s": round(state.wall_s, 2), "sampler": cfg.sample.sampler,
            "nfe": cfg.sample.nfe}
    save_model(out, state.ema, spec, meta)
    log.close()
    return out


def _optimizer(net, cfg: TeacherRunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.AdamW(net.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay)


def _loop(state, data, cfg, out, log, device, evaluate, progress) -> None:
    t = cfg.train
    bar = tqdm(total=t.iters, initial=state.step, desc="teacher", disable=not progress,
               dynamic_ncols=True)
    running, t0 = [], time.perf_counter() - state.wall_s
    while state.step < t.iters:
        running.append(_train_step(state, data, cfg, device))
        state.wall_s = time.perf_counter() - t0
        bar.update(1)
        step = state.step
        if step % t.log_every == 0 or step == t.iters:
            loss = sum(running) / len(running)
            running.clear()
            log.log({"iteration": step, "loss": loss, "lr": _lr(cfg, step - 1),
                     "wall_s": round(state.wall_s, 3)})
            bar.set_postfix(loss=f"{loss:.4f}")
        if evaluate and t.eval_every and step % t.eval_every == 0 and step < t.iters:
            log.log({"iteration": step, "wall_s": round(state.wall_s, 3), **evaluate(state.ema, step)})
        if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.iters:
            ckpt.save_checkpoint(out / "checkpoints", step, state.state_dict())
    bar.close()
    if evaluate:
        log.log({"iteration": state.step, "wall_s": round(state.wall_s, 3),
                 **evaluate(state.ema, state.step)})
