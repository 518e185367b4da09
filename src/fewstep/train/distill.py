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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewstep.config import DistillRunConfig, to_dict
from fewstep.core.guidance import null_label
from fewstep.core.mixture import MixtureDenoiser
from fewstep.data import Dataset, dataset_from_record
from fewstep.data.provenance import recorded_data
from fewstep.errors import ConfigError, FewstepError
from fewstep.losses import METHODS
from fewstep.losses.base import PHASES, Batch, Context, Method, Nets, Rollout
from fewstep.models.io import load_teacher, save_model
from fewstep.models.lora import ADAPTER_WEIGHTS, add_lora, is_lora, merged, save_adapters, trainable
from fewstep.models.student import Student, default_sigmas
from fewstep.models.taps import bottleneck_path, forward_with_taps
from fewstep.models.text_cond import read_prompts
from fewstep.train import checkpoint as ckpt
from fewstep.train import dist
from fewstep.train.control import BadStep, LogAccumulator
from fewstep.train.loop import make_optimizer, run_training
from fewstep.train.phases import CRITIC, DISC, FAKE, GEN, critic_update, generator_update
from fewstep.train.precision import Precision, cast_teacher, enable_checkpointing, make_scalers
from fewstep.train.rng import StepRandom, derive_seed
from fewstep.train.rollout import STUDENT_ROLLOUTS

__all__ = ["build_run", "make_batch", "train_iteration", "generator_update", "critic_update",
           "run_state", "load_run_state", "setup_methods", "train_distill", "Context"]


@dataclass
class Run:
    """A distillation run as the shared loop (``train/loop.py``) trains it."""

    cfg: DistillRunConfig
    data: Dataset
    nets: Nets
    methods: list[Method]                  # the base first, then the extras in --extra order
    opts: dict                             # phase name -> optimiser
    ema: torch.nn.Module | None
    device: torch.device
    rollout: Rollout                       # the student rollout of both phases
    ctx: Context | None = None
    target_rate: float | None = None       # EMA rate of nets.target (a method's target_rate)
    step: int = 0
    wall_s: float = 0.0
    bad_steps: int = 0
    slices: list = field(default_factory=list)  # this process's [lo, hi) micro-batches of the batch
    log_acc: LogAccumulator = field(default_factory=LogAccumulator)
    precision: Precision | None = None     # autocast of the network forwards (train.precision)
    scalers: dict = field(default_factory=dict)  # fp16: phase -> GradScaler (train/precision.py)
    cond_classes: torch.Tensor | None = None  # teachers whose conditions index a table (text prompts):
    #                                           the data class of each condition, -1 for none

    def terms(self, phases) -> list:
        return [t for m in self.methods for t in m.terms if t.phase in phases]

    # the trainee interface of train/loop.py
    def prepare(self, env, device) -> None:
        setup_methods(self)

    def start(self, env, device) -> None:
        pass

    def finish(self) -> None:
        pass

    def iteration(self, log_norms: bool = False) -> dict:
        if self.precision is None:
            return train_iteration(self, log_norms)
        with self.precision.training():
            return train_iteration(self, log_norms)

    def state_dict(self) -> dict:
        return run_state(self)

    def load_state_dict(self, s: dict) -> None:
        load_run_state(self, s)

    def eval_model(self) -> torch.nn.Module:
        return self.ema if self.ema is not None else self.nets.student

    def export(self, out: Path) -> None:
        export_model(self, out)


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
    if s.lora_rank:
        add_lora(G, s.lora_rank, s.lora_alpha, cfg.train.seed, "student")
    return Student(G, sigmas, renoise=s.renoise)


def build_fake(teacher, cfg: DistillRunConfig):
    """The fake score: a trainable copy of the teacher, or LoRA adapters on a frozen one."""
    fake = copy.deepcopy(teacher).requires_grad_(True).train()
    if cfg.fake.lora_rank:
        add_lora(fake, cfg.fake.lora_rank, cfg.fake.lora_alpha, cfg.train.seed, "fake")
    return fake


def build_run(cfg: DistillRunConfig, device, teacher=None, teacher_meta: dict | None = None,
              data: Dataset | None = None) -> Run:
    """Load the teacher and data (or take them in-memory, for tests) and build every network."""
    if teacher is None:
        teacher, teacher_meta = load_teacher(cfg.teacher, read_prompts(cfg.prompts) if cfg.prompts else None)
    tmeta = teacher_meta or {}
    teacher = teacher.to(device).eval().requires_grad_(False)
    data_name = recorded_data(tmeta.get("data"), cfg.teacher, override=cfg.data.name)  # path + hash checked
    if data is None:
        if not data_name:
            raise FewstepError("the teacher does not record its data set; pass data.name=NAME|PATH")
        # the recorded VAE too: a latent teacher distils in its latent space (hash checked)
        data = dataset_from_record(tmeta.get("data") or {}, getattr(teacher, "num_classes", 0) > 0,
                                   name=data_name)
    shape = tuple(tmeta.get("data", {}).get("shape") or data.shape)
    if tuple(data.shape) != shape:
        raise FewstepError(f"data '{data_name}' has samples of shape {tuple(data.shape)} but the "
                           f"teacher makes {shape}; pass the teacher's data set")
    classes = int(getattr(teacher, "num_classes", 0))
    cond_classes = getattr(teacher, "cond_classes", None)  # conditions that are not the data's labels
    if cond_classes is None and data.num_classes > classes > 0:
        raise FewstepError(f"data '{data_name}' has labels 0..{data.num_classes - 1} but the teacher "
                           f"knows {classes} classes; pass data whose labels are below {classes}")
    ctx = Context(sigma_data=float(getattr(teacher, "sigma_data", 0.5)), shape=shape,
                  num_classes=classes, kind=data.kind, seed=cfg.train.seed, iters=cfg.train.iters,
                  teacher=teacher, guidance=cfg.guidance, null_cond=null_label(teacher))
    ctx.bottleneck_channels, ctx.bottleneck_spatial = _probe_bottleneck(teacher, shape, device)
    if data.is_latent:
        ctx.decode, ctx.pixel_shape = data.decode, tuple(data.pixels.shape)
    methods = [METHODS[cfg.method].make(getattr(cfg, cfg.method), ctx)]
    methods += [METHODS[name].make(getattr(cfg, name), ctx, w) for name, w in cfg.extras.items()]
    run = _assemble(cfg, data, teacher, methods, device, real=_exact_score(cfg, data, teacher, device))
    run.ctx, run.cond_classes = ctx, None if cond_classes is None else cond_classes.cpu()
    return run


def _only_one(methods: list[Method], what: str, values: list):
    """The one value some method of the run declares for ``what`` (None if none does)."""
    if len(values) > 1:
        raise ConfigError(f"{len(values)} methods of this run each bring their own {what}; "
                          "combine methods that bring at most one")
    return values[0] if values else None


def _exact_score(cfg, data: Dataset, teacher, device):
    """``teacher_score=exact``: the exact denoiser of the mixture the teacher was trained on, standing
    in for the network in every teacher call (it answers the network's null label as unconditional);
    None for ``network``. Separates what a method does from what the network teacher's errors do."""
    if cfg.teacher_score != "exact":
        return None
    if data.mixture is None:
        raise ConfigError(f"teacher_score=exact needs mixture data (an exact denoiser); '{data.name}' is "
                          "a finite data set: use teacher_score=network")
    classes = int(getattr(teacher, "num_classes", 0))
    if classes and data.mixture.num_classes != classes:
        raise ConfigError(f"teacher_score=exact: the mixture has {data.mixture.num_classes} classes, the "
                          f"teacher {classes}; pass the teacher's own data")
    null = null_label(teacher)
    exact = MixtureDenoiser(data.mixture, conditional=classes > 0, null_label=-1 if null is None else null)
    return exact.to(device)


def _assemble(cfg, data, teacher, methods: list[Method], device, real=None) -> Run:
    """Student, fake score, head, target and EMA from the network ``teacher``; ``real`` (default: the
    teacher) is what every teacher call uses."""
    student = build_student(teacher, cfg, any(m.boundary for m in methods)).to(device)
    nets = Nets(teacher=teacher if real is None else real, student=student)
    opts = {GEN: make_optimizer(trainable(student), cfg.optim)}
    if any(m.needs_fake for m in methods):
        nets.fake = build_fake(teacher, cfg)
        opts[FAKE] = make_optimizer(trainable(nets.fake), cfg.fake_optim)
    head = _only_one(methods, "GAN head", [m.head for m in methods if m.head is not None])
    if head is not None:
        nets.head = head.to(device)
        opts[DISC] = make_optimizer(nets.head.parameters(), cfg.disc_optim)
    rate = _only_one(methods, "target network", [m.target_rate for m in methods if m.target_rate is not None])
    if rate is not None:
        nets.target = copy.deepcopy(student).requires_grad_(False)
    rollout = _only_one(methods, "student rollout", [m.rollout for m in methods if m.rollout is not None])
    ema = copy.deepcopy(student).requires_grad_(False) if cfg.train.ema_halflife > 0 else None
    precision = set_precision(cfg.train, nets, device)
    return Run(cfg, data, nets, methods, opts, ema, device, rollout or STUDENT_ROLLOUTS[cfg.student.rollout],
               target_rate=rate, slices=dist.shard(dist.env(), cfg.train.batch, cfg.train.micro_batch),
               precision=precision, scalers=make_scalers(precision, (GEN, CRITIC)))


def set_precision(t, nets: Nets, device) -> Precision:
    """``train.checkpointing``, ``train.teacher_dtype`` and ``train.precision`` on the built networks
    (after every copy of the teacher and student is made: the hooks must not be copied)."""
    if t.checkpointing:
        enable_checkpointing(nets.student.G, "student")
        if nets.fake is not None:
            enable_checkpointing(nets.fake, "fake score")
    cast_teacher(nets.teacher, t.teacher_dtype)
    precision = Precision(t.precision, device)
    target = nets.target.G if nets.target is not None else None
    teacher = nets.teacher if t.teacher_dtype == "fp32" else None  # a bf16 teacher runs in bf16
    precision.install([m for m in (teacher, nets.student.G, nets.fake, nets.head, target) if m is not None])
    return precision


# ---------------------------------------------------------------------------------------------
# one iteration
# ---------------------------------------------------------------------------------------------
def _slice(t, lo, hi, device):
    return None if t is None else t[lo:hi].to(device)


def make_batch(run: Run, step: int, lo: int = 0, hi: int | None = None) -> Batch:
    B = run.cfg.train.batch
    rnd = StepRandom(run.cfg.train.seed, step, B, lo, hi, device=run.device)
    no_real = ""
    if run.cond_classes is None:
        real, labels = run.data.train_batch(B, rnd.generator("data"))
        cond = labels if run.data.num_classes else None
    else:
        cond, real, no_real = table_conditions(run, B, rnd)
    z = rnd.randn("z", *run.data.shape)
    real, cond = _slice(real, rnd.lo, rnd.hi, run.device), _slice(cond, rnd.lo, rnd.hi, run.device)

    def draw_real(labels_or_n, stream):
        if run.cond_classes is not None and not isinstance(labels_or_n, int):
            labels_or_n = data_classes(run, labels_or_n)
        return sample_real(run.data, labels_or_n, StepRandom(run.cfg.train.seed, step, 1)
                           .generator(stream)).to(run.device)

    return Batch(z=z, cond=cond, real=real, rnd=rnd, step=step, seed=run.cfg.train.seed,
                 draw_real=draw_real, global_batch=B, all_mean=dist.all_mean, no_real=no_real)


def table_conditions(run: Run, B: int, rnd: StepRandom) -> tuple:
    """``(cond [B], real [B, ...] | None, why not)`` for a teacher whose conditions index a table (the
    prompts of a text teacher): each condition is drawn uniformly, with replacement, from the step's
    ``prompt`` stream (for the global batch: deterministic per step and process count), and each real
    sample is an image of its condition's class, drawn from the ``data`` stream; when some condition
    names no class there is no paired real batch (terms that need one say so)."""
    cond = torch.randint(len(run.cond_classes), (B,), generator=rnd.generator("prompt"))
    classes = run.cond_classes[cond]
    if (classes < 0).any():
        return cond, None, unpaired_reason(run, cond)
    return cond, sample_real(run.data, classes, rnd.generator("data")), ""


def unpaired_reason(run: Run, cond: torch.Tensor) -> str:
    prompts = getattr(run.nets.student.G, "prompts", None) or []
    bad = [prompts[i] for i in cond[run.cond_classes[cond] < 0].unique().tolist()][:2] if prompts else []
    return (f"condition(s) {bad or cond.tolist()[:2]} name no class of the data, so there are no real "
            "images to pair with them; use prompts from fewstep's digit templates (models.text.TEMPLATES)")


def data_classes(run: Run, cond: torch.Tensor) -> torch.Tensor:
    """The data classes of table conditions ``cond [n]`` (for real draws); refuses unpaired ones."""
    classes = run.cond_classes[cond.cpu()]
    if (classes < 0).any():
        raise FewstepError(f"real images of each condition are asked for, but "
                           f"{unpaired_reason(run, cond.cpu())}")
    return classes


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
    state = {"step": run.step, "wall_s": run.wall_s, "bad_steps": run.bad_steps,
             "log_acc": run.log_acc.state_dict(), "student": run.nets.student.state_dict(),
             "rng": ckpt.rng_state(), "opts": {k: o.state_dict() for k, o in run.opts.items()},
             "terms": {t.name: t.state_dict() for t in run.terms(set(PHASES))}}
    if run.scalers:  # fp16: the loss scales and their growth counters (resume stays exact)
        state["scalers"] = {k: s.state_dict() for k, s in run.scalers.items()}
    state.update({name: net.state_dict() for name, net in run.nets.extra_networks().items()})
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    return state


def load_run_state(run: Run, s: dict) -> None:
    run.nets.student.load_state_dict(s["student"])
    for name, net in run.nets.extra_networks().items():
        net.load_state_dict(s[name])
    if run.ema is not None:
        run.ema.load_state_dict(s["ema"])
    for k, o in run.opts.items():
        o.load_state_dict(s["opts"][k])
    for k, scaler in run.scalers.items():
        if k in s.get("scalers", {}):
            scaler.load_state_dict(s["scalers"][k])
    saved = s.get("terms", {})
    for t in run.terms(set(PHASES)):
        if t.name in saved:
            t.load_state_dict(saved[t.name])
    run.step, run.wall_s, run.bad_steps = s["step"], s["wall_s"], s["bad_steps"]
    run.log_acc.load_state_dict(s.get("log_acc"))
    ckpt.set_rng_state(s["rng"])


def setup_methods(run: Run) -> None:
    """Each term's one-time setup (precomputation, checks on the built networks)."""
    for t in run.terms(set(PHASES)):
        t.setup(run.nets, run.ctx)


def student_meta(run: Run) -> dict:
    """What model.json records about a student (rebuilds the k-step sampler around G)."""
    from fewstep.data.provenance import source_record

    s, cfg = run.nets.student, run.cfg
    return {"role": "student", "steps": s.num_steps, "sigmas": s.sigmas.tolist(),
            "renoise": s.renoise, "method": cfg.method, "extras": dict(cfg.extras),
            "guidance": cfg.guidance, **({"lora": s.G.fewstep_lora} if is_lora(s.G) else {}),
            "teacher": str(cfg.teacher), "iterations": run.step, "train_wall_s": round(run.wall_s, 2),
            "data": {"name": run.data.name, "kind": run.data.kind, "shape": list(run.data.shape),
                     "num_classes": run.data.num_classes, **source_record(run.data.path),
                     **run.data.latent_record()}}


def export_model(run: Run, out: Path) -> None:
    """Write the student (its EMA if kept) as model.safetensors + model.json."""
    model = run.ema if run.ema is not None else run.nets.student
    spec = getattr(model.G, "spec", None)
    if spec is None:
        raise FewstepError("this teacher type cannot be exported (no model spec); the resume "
                           "checkpoint in checkpoints/ holds the student's weights")
    # consistency students use the boundary parameterisation (own and diffusers models alike)
    spec = {**spec, "boundary": bool(getattr(model.G, "boundary", False))}
    save_model(out, merged(model.G), spec, student_meta(run))  # LoRA: adapters merged into the weights
    if is_lora(model.G):  # ... and kept apart too
        save_adapters(model.G, Path(out) / ADAPTER_WEIGHTS)


def _with_raw(evaluate, run: Run):
    """``evaluate`` of the EMA (the exported model) plus the raw student's metrics as ``raw_<name>``,
    on the same evaluation noise (train.eval_raw)."""
    def both(model, step: int) -> dict:
        out = evaluate(model, step)
        out.update({f"raw_{k}": v for k, v in evaluate(run.nets.student, step).items()})
        return out
    return both


def train_distill(cfg: DistillRunConfig, out: Path, evaluate=None, progress: bool = True) -> Path:
    """Distil (or resume, or skip if finished) into run directory ``out``; under torchrun every
    process calls this and rank 0 writes the files. Make ``cfg`` with ``fewstep.recipe.distill_config``
    (method defaults, presets and overrides, as ``fewstep distill`` does)."""
    with dist.session(cfg.train.device, cfg.train.batch, cfg.train.micro_batch) as (env, device):
        with torch.random.fork_rng(devices=[]):  # the same GAN-head init on every rank and run
            torch.manual_seed(derive_seed(cfg.train.seed, "build"))
            run = build_run(cfg, device)
        if evaluate is not None and cfg.train.eval_raw and run.ema is not None:
            evaluate = _with_raw(evaluate, run)
        return run_training(env, device, out, to_dict(cfg), "student", run, cfg.train, evaluate,
                            progress, desc=f"distill {cfg.method}", defaults=to_dict(DistillRunConfig()))
