"""The distillation engine: one base method plus weighted extras, update phases, TTUR, EMA,
checkpoints, in-loop evaluation (DESIGN.md "Data flow of one distillation iteration").

Per iteration: draw the real batch and the student noise for the global batch (sliced to this
process and its micro-batches), then run the generator and critic updates (``train/phases.py``) in
the order and ratio of the schedule. Every term's value and, on logging steps, the norm of its
gradient on the generator output are logged. Under torchrun, rank 0 writes every file and the
other ranks wait for it (``train/dist.py``, docs/scaling.md).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from fewstep.config import DistillRunConfig, to_dict
from fewstep.data import Dataset, load_dataset
from fewstep.errors import FewstepError
from fewstep.losses import BASES, EXTRAS
from fewstep.losses.base import Batch, Method, Nets
from fewstep.models.io import load_teacher, save_model
from fewstep.models.student import Student, default_sigmas
from fewstep.models.taps import bottleneck_path, forward_with_taps
from fewstep.train import checkpoint as ckpt
from fewstep.train import dist
from fewstep.train.control import BadStep, Bookkeeper, LogAccumulator, StopSignals, out_of_time, reseed
from fewstep.train.phases import DISC, FAKE, GEN, critic_update, generator_update
from fewstep.train.rng import StepRandom, derive_seed
from fewstep.train.rundir import discard_unstarted_run, record_config, run_dir_status
from fewstep.train.runlog import RunLog

__all__ = ["build_run", "make_batch", "train_iteration", "generator_update", "critic_update",
           "run_state", "load_run_state", "train_distill"]


@dataclass
class Context:
    """What a method's ``build`` may know about the run (no networks to own, no files)."""

    sigma_data: float
    shape: tuple
    num_classes: int
    kind: str
    seed: int
    iters: int
    bottleneck_channels: int = 0
    bottleneck_spatial: bool = False
    teacher: torch.nn.Module | None = None


@dataclass
class Run:
    cfg: DistillRunConfig
    data: Dataset
    nets: Nets
    methods: list[Method]
    weights: dict
    opts: dict
    ema: torch.nn.Module | None
    device: torch.device
    rollout_mode: str
    ctx: Context | None = None
    dp_detach: bool = True
    step: int = 0
    wall_s: float = 0.0
    bad_steps: int = 0
    slices: list = field(default_factory=list)  # this process's [lo, hi) micro-batches of the batch
    log_acc: LogAccumulator = field(default_factory=LogAccumulator)

    def terms(self, phases) -> list:
        return [t for m in self.methods for t in m.terms if t.phase in phases]


# ---------------------------------------------------------------------------------------------
# building the run
# ---------------------------------------------------------------------------------------------
def _probe_bottleneck(teacher, shape, device) -> tuple[int, bool]:
    try:
        path = bottleneck_path(teacher)
    except FewstepError:
        return 0, False
    x = torch.zeros(2, *shape, device=device)
    with torch.no_grad():
        _, feats = forward_with_taps(teacher, x, torch.ones(2, device=device), None, [path])
    h = feats[path]
    return h.shape[1], h.ndim == 4


def build_student(teacher, cfg: DistillRunConfig, boundary: bool) -> Student:
    G = copy.deepcopy(teacher).requires_grad_(True)
    if boundary:
        if not hasattr(G, "boundary"):
            raise FewstepError("consistency distillation needs a teacher with a boundary "
                               "parameterisation (a fewstep or diffusers DDPM-family teacher); "
                               "this one has none")
        G.boundary = True
    s = cfg.student
    sigmas = list(s.sigmas) or default_sigmas(s.steps, float(getattr(teacher, "sigma_max", 80.0)))
    if s.init_sigma > 0 and not s.sigmas and s.steps == 1:
        # a 1-step setting (DI's 1.0, SiD's 2.5): multi-step levels come from student.sigmas
        sigmas[0] = s.init_sigma
    return Student(G, sigmas, renoise=s.renoise)


def _optimizer(params, o) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay)


def build_run(cfg: DistillRunConfig, device, teacher=None, teacher_meta: dict | None = None,
              data: Dataset | None = None) -> Run:
    """Load the teacher and data (or take them in-memory, for tests) and build every network."""
    if teacher is None:
        teacher, teacher_meta = load_teacher(cfg.teacher)
    tmeta = teacher_meta or {}
    teacher = teacher.to(device).eval().requires_grad_(False)
    data_name = cfg.data.name or tmeta.get("data", {}).get("name")
    if data is None:
        if not data_name:
            raise FewstepError("the teacher does not record its data set; pass data.name=NAME|PATH")
        data = load_dataset(data_name, conditional=getattr(teacher, "num_classes", 0) > 0)
    shape = tuple(tmeta.get("data", {}).get("shape") or data.shape)
    if tuple(data.shape) != shape:
        raise FewstepError(f"data '{data_name}' has samples of shape {tuple(data.shape)} but the "
                           f"teacher makes {shape}; pass the teacher's data set")
    classes = int(getattr(teacher, "num_classes", 0))
    if data.num_classes > classes > 0:
        raise FewstepError(f"data '{data_name}' has labels 0..{data.num_classes - 1} but the teacher "
                           f"knows {classes} classes; pass data whose labels are below {classes}")
    ctx = Context(sigma_data=float(getattr(teacher, "sigma_data", 0.5)), shape=shape,
                  num_classes=int(getattr(teacher, "num_classes", 0)), kind=data.kind,
                  seed=cfg.train.seed, iters=cfg.train.iters, teacher=teacher)
    ctx.bottleneck_channels, ctx.bottleneck_spatial = _probe_bottleneck(teacher, shape, device)
    conf_cls, build, _ = BASES[cfg.method]
    methods = [build(getattr(cfg, cfg.method), ctx)]
    weights = {t.name: getattr(t, "weight", 1.0) for t in methods[0].terms}
    for name, w in cfg.extras.items():
        _, build_extra = EXTRAS[name]
        m = build_extra(getattr(cfg, name), ctx, w)
        methods.append(m)
        weights.update({t.name: getattr(t, "weight", w) for t in m.terms})
    run = _assemble(cfg, data, teacher, methods, weights, device)
    run.ctx = ctx
    return run


def _assemble(cfg, data, teacher, methods, weights, device) -> Run:
    base = methods[0]
    student = build_student(teacher, cfg, base.boundary).to(device)
    nets = Nets(teacher=teacher, student=student)
    opts = {GEN: _optimizer(student.parameters(), cfg.optim)}
    if base.needs_fake:
        nets.fake = copy.deepcopy(teacher).requires_grad_(True).train()
        opts[FAKE] = _optimizer(nets.fake.parameters(), cfg.fake_optim)
    if base.needs_head is not None:
        nets.head = base.needs_head.to(device)
        opts[DISC] = _optimizer(nets.head.parameters(), cfg.disc_optim)
    if base.needs_target:
        nets.target = copy.deepcopy(student).requires_grad_(False)
    modes = {m.rollout for m in methods if m.rollout}
    mode = "dp" if "dp" in modes else cfg.student.rollout
    if mode == "dp" and student.num_steps > 1 and student.renoise != "ddim":
        raise FewstepError("DP-DMD trains a deterministic chain: set student.renoise=ddim "
                           "(so sampling uses the same chain)")
    dp_detach = all(getattr(m, "dp_detach", True) for m in methods)
    ema = copy.deepcopy(student).requires_grad_(False) if cfg.train.ema_halflife > 0 else None
    return Run(cfg, data, nets, methods, weights, opts, ema, device, mode, dp_detach=dp_detach,
               slices=dist.shard(dist.env(), cfg.train.batch, cfg.train.micro_batch))


# ---------------------------------------------------------------------------------------------
# one iteration
# ---------------------------------------------------------------------------------------------
def _slice(t, lo, hi, device):
    return None if t is None else t[lo:hi].to(device)


def make_batch(run: Run, step: int, lo: int = 0, hi: int | None = None) -> Batch:
    B = run.cfg.train.batch
    rnd = StepRandom(run.cfg.train.seed, step, B, lo, hi, device=run.device)
    real, labels = run.data.train_batch(B, rnd.generator("data"))
    cond = labels if run.data.num_classes else None
    z = rnd.randn("z", *run.data.shape)
    real, cond = _slice(real, rnd.lo, rnd.hi, run.device), _slice(cond, rnd.lo, rnd.hi, run.device)

    def draw_real(labels_or_n, stream):
        return sample_real(run.data, labels_or_n, StepRandom(run.cfg.train.seed, step, 1)
                           .generator(stream)).to(run.device)

    return Batch(z=z, cond=cond, real=real, rnd=rnd, step=step, seed=run.cfg.train.seed,
                 draw_real=draw_real, global_batch=B)


def sample_real(data: Dataset, labels_or_n, g: torch.Generator) -> torch.Tensor:
    """Real training samples: ``n`` of them, or one per label in ``labels`` with that label."""
    if isinstance(labels_or_n, int):
        return data.train_batch(labels_or_n, g)[0]
    labels = labels_or_n.cpu()
    if data.mixture is not None:
        return data.mixture.sample(len(labels), g, cond=labels)[0].float()
    out = torch.empty(len(labels), *data.shape)
    for c in labels.unique().tolist():
        pool = (data.y_train == c).nonzero().flatten()
        sel = labels == c
        out[sel] = data.x_train[pool[torch.randint(len(pool), (int(sel.sum()),), generator=g)]]
    return out


def is_generator_step(cfg: DistillRunConfig, step: int) -> bool:
    return step % cfg.schedule.ratio == cfg.schedule.gen_offset


def is_critic_step(cfg: DistillRunConfig, step: int) -> bool:
    return cfg.schedule.critic_on_gen_steps or not is_generator_step(cfg, step)


def train_iteration(run: Run, log_norms: bool = False) -> dict:
    """One iteration (generator and/or critic update per the schedule); returns logged values.

    A refused update (non-finite term or gradient) returns ``{"refused_step": reason}`` and counts
    in ``run.bad_steps``; the caller decides when to stop."""
    cfg, step = run.cfg, run.step
    batches = [make_batch(run, step, lo, hi) for lo, hi in run.slices]
    logs, gens = {}, None
    order = ("critic", "gen") if cfg.schedule.critic_first else ("gen", "critic")
    try:
        for phase in order:
            if phase == "gen" and is_generator_step(cfg, step):
                gens, gl = generator_update(run, batches, log_norms)
                logs.update(gl)
            elif phase == "critic" and is_critic_step(cfg, step):
                logs.update(critic_update(run, batches, gens))
    except BadStep as e:  # checks run before each optimiser step, so nothing was applied
        run.bad_steps += 1
        logs = {"refused_step": str(e)}
    run.step += 1
    return logs


# ---------------------------------------------------------------------------------------------
# the loop, checkpoints, export
# ---------------------------------------------------------------------------------------------
def run_state(run: Run) -> dict:
    """Everything needed to continue exactly (DESIGN.md convention 7)."""
    n = run.nets
    state = {"step": run.step, "wall_s": run.wall_s, "bad_steps": run.bad_steps,
             "log_acc": run.log_acc.state_dict(), "student": n.student.state_dict(), "rng": ckpt.rng_state(),
             "opts": {k: o.state_dict() for k, o in run.opts.items()},
             "terms": {t.name: t.state_dict() for m in run.methods for t in m.terms
                       if hasattr(t, "state_dict")}}
    for name in ("fake", "head", "target"):
        if getattr(n, name) is not None:
            state[name] = getattr(n, name).state_dict()
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    return state


def load_run_state(run: Run, s: dict) -> None:
    n = run.nets
    n.student.load_state_dict(s["student"])
    for name in ("fake", "head", "target"):
        if getattr(n, name) is not None:
            getattr(n, name).load_state_dict(s[name])
    if run.ema is not None:
        run.ema.load_state_dict(s["ema"])
    for k, o in run.opts.items():
        o.load_state_dict(s["opts"][k])
    for m in run.methods:
        for t in m.terms:
            if hasattr(t, "load_state_dict") and t.name in s.get("terms", {}):
                t.load_state_dict(s["terms"][t.name])
    run.step, run.wall_s, run.bad_steps = s["step"], s["wall_s"], s["bad_steps"]
    run.log_acc.load_state_dict(s.get("log_acc"))
    ckpt.set_rng_state(s["rng"])


def _setup_methods(run: Run) -> None:
    """One-time precomputation some terms need (e.g. DMD v1 regression pairs)."""
    for m in run.methods:
        for t in m.terms:
            if hasattr(t, "setup"):
                t.setup(run.nets, run.ctx)


def student_meta(run: Run) -> dict:
    """What model.json records about a student (rebuilds the k-step sampler around G)."""
    from fewstep.data.provenance import source_record

    s, cfg = run.nets.student, run.cfg
    return {"role": "student", "steps": s.num_steps, "sigmas": s.sigmas.tolist(),
            "renoise": s.renoise, "method": cfg.method, "extras": dict(cfg.extras),
            "teacher": str(cfg.teacher), "iterations": run.step, "train_wall_s": round(run.wall_s, 2),
            "data": {"name": run.data.name, "kind": run.data.kind, "shape": list(run.data.shape),
                     "num_classes": run.data.num_classes, **source_record(run.data.path)}}


def export_model(run: Run, out: Path) -> None:
    """Write the student (its EMA if kept) as model.safetensors + model.json."""
    model = run.ema if run.ema is not None else run.nets.student
    spec = getattr(model.G, "spec", None)
    if spec is None:
        raise FewstepError("this teacher type cannot be exported (no model spec); the resume "
                           "checkpoint in checkpoints/ holds the student's weights")
    # consistency students use the boundary parameterisation (own and diffusers models alike)
    spec = {**spec, "boundary": bool(getattr(model.G, "boundary", False))}
    save_model(out, model.G, spec, student_meta(run))


def train_distill(cfg: DistillRunConfig, out: Path, evaluate=None, progress: bool = True) -> Path:
    """Distil (or resume, or skip if finished) into run directory ``out``; under torchrun every
    process calls this and rank 0 writes the files."""
    out = Path(out)
    with dist.session(cfg.train.device, cfg.train.batch, cfg.train.micro_batch) as (env, device):
        with torch.random.fork_rng(devices=[]):  # the same GAN-head init on every rank and run
            torch.manual_seed(derive_seed(cfg.train.seed, "build"))
            run = build_run(cfg, device)
        existed = out.exists()
        status = run_dir_status(env, out, to_dict(cfg), "student")
        if status == "done":
            return out
        with discard_unstarted_run(out, existed, enabled=env.is_main and status == "new"):
            _setup_methods(run)  # before loading: a term's saved state wins over its setup
            if status == "resume":  # load before writing anything: a refused checkpoint changes nothing
                load_run_state(run, ckpt.load_latest(out / "checkpoints", map_location=device))
            dist.on_main(record_config, out, to_dict(cfg))
            log = RunLog(out, enabled=env.is_main)
            dist.on_main(log.resume_from, run.step)
            with StopSignals() as stop:
                _loop(run, out, log, evaluate, progress and env.is_main, stop)
            dist.on_main(export_model, run, out)
            log.close()
    return out


def _loop(run: Run, out: Path, log: RunLog, evaluate, progress: bool, stop: StopSignals) -> None:
    t, books = run.cfg.train, Bookkeeper(run.cfg.train, out, log, stop)
    bar = tqdm(total=t.iters, initial=run.step, desc=f"distill {run.cfg.method}",
               disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter() - run.wall_s
    eval_fn = (lambda: evaluate(_eval_model(run), run.step)) if evaluate else None
    done = out_of_time(t, run.wall_s)
    while run.step < t.iters and not done:
        reseed(t.seed, run.step)
        logs = train_iteration(run, log_norms=(run.step + 1) % t.log_every == 0)
        run.wall_s = time.perf_counter() - t0
        bar.update(1)
        done = out_of_time(t, run.wall_s)  # equal wall-clock budgets (train.time_budget_s)
        books.after(run.step, run.wall_s, logs, run.log_acc, run.bad_steps, lambda: run_state(run), eval_fn,
                    last=run.step == t.iters or done)
    bar.close()
    books.final(run.step, run.wall_s, eval_fn)


def _eval_model(run: Run):
    return run.ema if run.ema is not None else run.nets.student
