"""EDM teacher training (Karras et al. 2022, section 5 / ``training/loss.py`` EDMLoss).

Per sample ``ln sigma ~ N(P_mean, P_std^2)``, loss ``lambda(sigma) ||D(y + sigma n; sigma) - y||^2``
with ``lambda = (sigma^2 + sigma_data^2)/(sigma sigma_data)^2``, averaged over elements (EDM sums
and divides by the batch; the mean only rescales the learning rate).

Class-conditional teachers train with label dropout (Ho & Salimans 2022; specs/guidance.md 1): each
label becomes the null label -1 (zero one-hot) with probability ``train.p_uncond``, drawn from the
step's ``p_uncond`` stream, so the teacher has an unconditional branch for classifier-free guidance.
Unconditional runs (and ``p_uncond = 0``) make no such draw.

Text teachers (``data.text``, ``fewstep teacher --text``) train their pipeline's UNet with its own
epsilon objective on template prompts of each label (``train/text_teacher.py``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from fewstep.config import TeacherRunConfig, check_text_teacher, to_dict
from fewstep.core.guidance import NULL_LABEL
from fewstep.core.precond import P_MEAN, P_STD, edm_denoising_loss, flow_matching_loss
from fewstep.data import Dataset, load_dataset
from fewstep.errors import ConfigError
from fewstep.models.io import build_denoiser, save_model
from fewstep.train import checkpoint as ckpt
from fewstep.train import dist
from fewstep.train.control import BadStep, LogAccumulator
from fewstep.train.ema import ema_beta, ema_update
from fewstep.train.loop import lr_at, make_optimizer, run_training
from fewstep.train.phases import clip_and_check
from fewstep.train.precision import Precision, enable_checkpointing, make_scalers, step, unscale
from fewstep.train.rng import StepRandom, derive_seed
from fewstep.train.text_teacher import ddpm_eps_loss, template_conditions


def describe_data(data: Dataset) -> dict:
    """What model.json records about the training data (to rebuild metrics and labels); user data
    also records its absolute path and content hash (data/provenance.py)."""
    from fewstep.data.provenance import source_record

    return {"name": data.name, "kind": data.kind, "shape": list(data.shape),
            "num_classes": data.num_classes, **source_record(data.path), **data.latent_record()}


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
                "num_classes": data.num_classes, "sigma_data": cfg.model.sigma_data,
                "objective": cfg.model.objective}
    return {"type": "unet", "shape": list(data.shape), "block_out_channels": cfg.model.channels,
            "layers_per_block": cfg.model.layers_per_block, "num_classes": data.num_classes,
            "sigma_data": cfg.model.sigma_data, "objective": cfg.model.objective}


def edm_loss(D, x: torch.Tensor, cond, rnd: StepRandom, sigma_data: float) -> torch.Tensor:
    """EDM denoising loss per sample ``[B]`` with ``ln sigma ~ N(P_mean, P_std^2)`` and the noise
    drawn from ``rnd`` (the one loss of ``core.precond.edm_denoising_loss``)."""
    sigma = (P_MEAN + P_STD * rnd.randn("sigma")).exp()
    return edm_denoising_loss(D, x, sigma, rnd.randn("noise", *x.shape[1:]), cond, sigma_data)


FLOW_T_RANGE = (1e-4, 1 - 1e-4)  # t = 1 has no EDM sigma; 1 - 1e-4 is sigma ~ 1e4


def flow_loss(D, x: torch.Tensor, cond, rnd: StepRandom, flow_t: str = "logit_normal") -> torch.Tensor:
    """Rectified-flow loss per sample ``[B]`` (SD3): ``t = sigmoid(N(0, 1))`` (logit-normal) or
    ``U(0, 1)``, clipped to ``FLOW_T_RANGE``, and the noise drawn from ``rnd``."""
    u = rnd.randn("flow_t").sigmoid() if flow_t == "logit_normal" else rnd.rand("flow_t")
    t = u.double().clamp(*FLOW_T_RANGE).to(x.dtype)
    return flow_matching_loss(D, x, t, rnd.randn("noise", *x.shape[1:]), cond)


@dataclass
class TeacherState:
    """A teacher run as the shared loop (``train/loop.py``) trains it."""

    net: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    slices: list                   # this process's [lo, hi) micro-batches of the global batch
    cfg: TeacherRunConfig | None = None
    data: Dataset | None = None
    spec: dict | None = None       # model.json spec of the network
    device: torch.device | None = None
    model: torch.nn.Module | None = None  # what the loss calls: ``net``, or its DDP wrapper
    step: int = 0
    wall_s: float = 0.0
    bad_steps: int = 0
    log_acc: LogAccumulator = field(default_factory=LogAccumulator)
    precision: Precision | None = None  # autocast of the network's forwards (train.precision)
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    pipeline: object | None = None      # text teachers: the pipeline's parts (train/text_teacher.py)

    def prepare(self, env, device) -> None:
        pass

    def start(self, env, device) -> None:
        if env.enabled:  # after loading: DDP broadcasts rank 0's weights at construction
            self.model = DistributedDataParallel(self.net, device_ids=[device.index]
                                                 if device.type == "cuda" else None)

    def finish(self) -> None:
        self.model = None  # release DDP (its reducer holds the process group) before leaving

    def iteration(self, log_norms: bool = False) -> dict:
        """One step, or a refused step (counted; the step index still advances)."""
        try:
            with self.precision.training() if self.precision else contextlib.nullcontext():
                logs = {"loss": _train_step(self, self.data, self.cfg, self.device),
                        "lr": lr_at(self.cfg.optim, self.step)}
            if self.scaler is not None:
                logs["amp_scale"] = float(self.scaler.get_scale())
        except BadStep as e:
            self.bad_steps += 1
            logs = {"refused_step": str(e)}
        self.step += 1
        return logs

    def eval_model(self) -> torch.nn.Module:
        return self.ema

    def export(self, out: Path) -> None:
        meta = {"role": "teacher", "iterations": self.step, "data": describe_data(self.data),
                "train_wall_s": round(self.wall_s, 2), "sampler": self.cfg.sample.sampler,
                "nfe": self.cfg.sample.nfe}
        if self.data.num_classes:  # guidable when trained with label dropout (models.io reads this)
            p = self.cfg.train.p_uncond
            meta.update({"p_uncond": p, "null_label": NULL_LABEL if p > 0 else None})
        if self.pipeline is not None:
            from fewstep.train.text_teacher import export_text_pipeline

            meta["text"] = {"objective": "ddpm_eps", "prompts": "templates"}
            export_text_pipeline(out, self.pipeline, self.ema)  # before model.json: the run is done last
        save_model(out, self.ema, self.spec, meta)

    def state_dict(self) -> dict:
        s = {"step": self.step, "wall_s": self.wall_s, "bad_steps": self.bad_steps,
             "log_acc": self.log_acc.state_dict(), "net": self.net.state_dict(),
             "ema": self.ema.state_dict(), "opt": self.opt.state_dict(), "rng": ckpt.rng_state()}
        if self.scaler is not None:
            s["scaler"] = self.scaler.state_dict()
        return s

    def load_state_dict(self, s: dict) -> None:
        self.net.load_state_dict(s["net"])
        self.ema.load_state_dict(s["ema"])
        self.opt.load_state_dict(s["opt"])
        if self.scaler is not None and "scaler" in s:
            self.scaler.load_state_dict(s["scaler"])
        self.step, self.wall_s, self.bad_steps = s["step"], s["wall_s"], s.get("bad_steps", 0)
        self.log_acc.load_state_dict(s.get("log_acc"))
        ckpt.set_rng_state(s["rng"])


def _micro_loss(state: TeacherState, data: Dataset, cfg: TeacherRunConfig, lo: int, hi: int, device):
    """The mean EDM loss of the global batch's ``[lo, hi)`` slice (draws made for the whole batch)."""
    rnd = StepRandom(cfg.train.seed, state.step, cfg.train.batch, lo, hi, device=device)
    x, y = data.train_batch(cfg.train.batch, rnd.generator("data"))
    x = x[lo:hi].to(device)
    y = y[lo:hi].to(device) if (y is not None and data.num_classes) else None
    if y is not None and cfg.data.text:
        y = template_conditions(y, rnd)
    if y is not None and cfg.train.p_uncond > 0:
        y = drop_labels(y, rnd, cfg.train.p_uncond)
    D = state.model or state.net
    if cfg.data.text:
        return ddpm_eps_loss(D, x, y, rnd, state.net.net.sigma_table).mean()
    if cfg.model.objective == "flow":
        return flow_loss(D, x, y, rnd, cfg.model.flow_t).mean()
    return edm_loss(D, x, y, rnd, cfg.model.sigma_data).mean()


def drop_labels(y: torch.Tensor, rnd: StepRandom, p: float) -> torch.Tensor:
    """Label dropout: each label ``[B]`` becomes the null label with probability ``p`` (the draw is
    made for the global batch and sliced, so it does not depend on the number of processes)."""
    drop = rnd.rand("p_uncond").to(y.device) < p
    return torch.where(drop, torch.full_like(y, NULL_LABEL), y)


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
            scaled = loss if share == 1 else loss * share
            (scaled if state.scaler is None else state.scaler.scale(scaled)).backward()
        total = total + loss.detach() * share
    loss = float(dist.all_mean(torch.as_tensor(total, dtype=torch.float64)))
    if not math.isfinite(loss):
        raise BadStep(f"term 'edm' is {loss}")
    unscale(state.opt, state.scaler)  # fp16: an overflow then skips the step (and lowers the scale)
    clip_and_check(state.net.parameters(), cfg.optim.grad_clip, "teacher", scaled=state.scaler is not None)
    for group in state.opt.param_groups:
        group["lr"] = lr_at(cfg.optim, state.step)
    step(state.opt, state.scaler)
    if state.scaler is not None:
        state.scaler.update()
    ema_update(state.ema, state.net, ema_beta(state.step, cfg.train.ema_halflife, cfg.train.ema_rampup))
    return loss


def build_teacher_net(cfg: TeacherRunConfig, data: Dataset):
    """``(spec, network)`` with weights initialised from the run seed (the same on every rank)."""
    if cfg.data.text:
        spec, net, _ = build_text_net(cfg, data)
        return spec, net
    spec = model_spec(cfg, data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.train.seed, "teacher-init"))
        return spec, build_denoiser(spec)


def train_teacher(cfg: TeacherRunConfig, out: Path, evaluate=None, progress: bool = True) -> Path:
    """Train (or resume, or skip if finished) a teacher into run directory ``out``.

    ``evaluate(model, step) -> dict`` is called every ``train.eval_every`` iterations and at the end.
    Under torchrun every process calls this; rank 0 writes the files.
    """
    with dist.session(cfg.train.device, cfg.train.batch, cfg.train.micro_batch) as (env, device):
        check_text_teacher(cfg)
        data = load_dataset(cfg.data.name, conditional=cfg.data.conditional or cfg.data.text,
                            vae=cfg.data.vae or None)
        if cfg.data.text:
            spec, net, pipeline = build_text_net(cfg, data)
        else:
            (spec, net), pipeline = build_teacher_net(cfg, data), None
        net = net.to(device)
        state = TeacherState(net, copy.deepcopy(net).requires_grad_(False),
                             make_optimizer(net.parameters(), cfg.optim),
                             dist.shard(env, cfg.train.batch, cfg.train.micro_batch), cfg, data, spec, device,
                             pipeline=pipeline)
        set_teacher_precision(state, cfg.train, device)
        return run_training(env, device, out, to_dict(cfg), "teacher", state, cfg.train, evaluate,
                            progress, desc="teacher", defaults=to_dict(TeacherRunConfig()))


def build_text_net(cfg: TeacherRunConfig, data: Dataset):
    """``(spec, PromptDenoiser, pipeline parts)`` of a text teacher, initialised from the run seed."""
    from fewstep.train.text_teacher import build_text_teacher

    net, parts = build_text_teacher(cfg, data, derive_seed(cfg.train.seed, "teacher-init"))
    return net.spec, net, parts


def set_teacher_precision(state: TeacherState, t, device) -> None:
    """``train.precision`` and ``train.checkpointing`` on the trained network (after its EMA copy is
    made, so the EMA, which is evaluated and exported, has no hooks and runs in float32)."""
    if t.checkpointing:
        enable_checkpointing(state.net, "teacher")
    state.precision = Precision(t.precision, device)
    state.precision.install([state.net])
    state.scaler = make_scalers(state.precision, ["teacher"]).get("teacher")
