"""Configuration: nested dataclasses, YAML presets, type-checked ``a.b=value`` overrides.

Unknown keys are errors that suggest the nearest key (nanoGPT's rule); every field has a comment.
Presets live in ``src/fewstep/configs/*.yaml`` and are frozen once published.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fewstep.errors import ConfigError
from fewstep.losses import METHODS

PRESET_DIR = Path(__file__).parent / "configs"


# ---------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    name: str = "ring8"          # ring8 | grid25 | digits8 | path to .npy/.npz/.json/.yaml/image folder
    conditional: bool = False    # class-conditional teacher/student (needs labels or mixture components)
    vae: str = ""                # diffusers VAE folder: train on its cached latents of the data ("" = pixels)
    text: bool = False           # teachers: a text-to-image teacher (--text; needs data.vae): a Stable
    #                              Diffusion pipeline conditioned on digit prompts (models/text.py)


@dataclass
class ModelConfig:
    type: str = "auto"           # auto (mlp for vectors, unet for images) | mlp | unet
    hidden: int = 256            # MLP width
    depth: int = 4               # MLP hidden layers
    emb_dim: int = 64            # MLP noise-embedding size
    channels: list[int] = field(default_factory=lambda: [32, 64])  # UNet block widths (0.65 M params)
    layers_per_block: int = 1    # UNet resnets per block
    sigma_data: float = 0.5      # EDM sigma_data (data std the preconditioning assumes)
    objective: str = "edm"       # edm (EDM denoiser) | flow (rectified-flow velocity, SD3 convention);
    #                              text teachers train with their scheduler's epsilon objective instead
    flow_t: str = "logit_normal"  # flow training times: logit_normal (SD3: sigmoid of N(0, 1)) | uniform


@dataclass
class OptimConfig:
    lr: float = 1e-3             # learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam(W) betas
    eps: float = 1e-8            # Adam(W) epsilon
    weight_decay: float = 0.0    # AdamW decoupled weight decay
    grad_clip: float = 0.0       # clip global grad norm to this (0 = off)
    grad_clip_value: float = 0.0  # clip each gradient element to +-this (0 = off; SiDA's critic: 1)
    warmup: int = 0              # linear LR warm-up iterations


@dataclass
class TrainConfig:
    iters: int = 4000            # optimisation steps
    batch: int = 1024            # global batch size (fixed when the number of processes changes)
    micro_batch: int = 0         # per-process micro-batch for gradient accumulation (0 = off)
    seed: int = 0                # run seed; every random draw derives from (seed, step, stream)
    ema_halflife: float = 500.0  # EMA half-life in iterations (0 = no EMA)
    ema_rampup: float = 0.05     # half-life ramp-up ratio (EDM): halflife <= rampup * step
    log_every: int = 50          # iterations between metrics.jsonl lines
    eval_every: int = 0          # iterations between in-training evaluations (0 = end only)
    eval_n: int = 2500           # samples per in-training evaluation
    ckpt_every: int = 1000       # iterations between resume checkpoints (0 = end only)
    max_bad_steps: int = 20      # refused (NaN/Inf) steps before the run stops
    time_budget_s: float = 0.0   # stop after this much training wall time (0 = off; equal-time arms)
    device: str = "auto"         # auto | cpu | cuda | mps
    precision: str = "fp32"      # fp32 | bf16 | fp16: autocast dtype of network forwards; weights and
    #                              optimiser state stay fp32, fp16 adds a GradScaler (docs/scaling.md)
    checkpointing: bool = False  # activation checkpointing of trained UNets (diffusers blocks; not MLPs)


@dataclass
class TeacherTrainConfig(TrainConfig):
    p_uncond: float = 0.1        # label dropout of class-conditional teachers (Ho & Salimans 2022): the
    #                              label becomes the null label -1 with this probability, so the teacher
    #                              can be guided (--guidance); 0 = no unconditional branch; unconditional
    #                              data: unused

    def check(self) -> None:
        if not 0 <= self.p_uncond < 1:
            raise ConfigError(f"train.p_uncond must be in [0, 1), got {self.p_uncond}; "
                              "e.g. train.p_uncond=0.1")


@dataclass
class SampleConfig:
    sampler: str = "heun"        # heun | euler
    nfe: int = 35                # network evaluations at evaluation time (Heun: 2N - 1)


@dataclass
class TeacherRunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def check_text_teacher(cfg: TeacherRunConfig) -> None:
    """A text teacher's rules (after --vae is applied: the recipe sets it verbatim after resolving)."""
    if cfg.data.text and not cfg.data.vae:
        raise ConfigError("--text (data.text=true) trains a latent text-to-image teacher and needs a "
                          "VAE: pass --vae DIR (e.g. from 'fewstep vae --data mnist28')")
    if cfg.data.text and cfg.model.objective == "flow":
        raise ConfigError("a text teacher trains with its pipeline's epsilon objective (an "
                          "EulerDiscreteScheduler); drop --objective flow / model.objective=flow")


@dataclass
class StudentConfig:
    steps: int = 1               # k: network evaluations of the student
    sigmas: list[float] = field(default_factory=list)  # explicit descending levels ([] = defaults)
    init_sigma: float = 0.0      # 1-step input noise level (0 = sigma_max 80; DI 1.0, SiD 2.5; k>1: unused)
    rollout: str = "full"        # full (graph through all steps) | backsim (DMD2 backward simulation)
    renoise: str = "fresh"       # fresh (x0 + sigma eps) | ddim (deterministic) between steps
    lora_rank: int = 0           # > 0: the student is rank-r LoRA adapters on a frozen copy of the
    #                              teacher (models/lora.py; DMD2's --generator_lora); 0 = full
    lora_alpha: float = 0.0      # LoRA scale alpha / r (0 = alpha = r: scale 1)


@dataclass
class FakeConfig:
    """The fake score (DMD's mu_fake, SiD's f_psi, DI's s_phi): a copy of the teacher."""

    lora_rank: int = 0           # > 0: LoRA adapters on a frozen copy (saves its gradients and moments)
    lora_alpha: float = 0.0      # 0 = alpha = r


@dataclass
class ScheduleConfig:
    ratio: int = 5               # the generator updates once every `ratio` iterations (DMD2 TTUR)
    gen_offset: int = 0          # ... at iterations with iteration % ratio == gen_offset
    critic_on_gen_steps: bool = True  # the critic also updates on generator iterations
    critic_first: bool = False   # order of the two updates within one iteration


@dataclass
class DistillTrainConfig(TrainConfig):
    iters: int = 2000
    batch: int = 256
    ema_halflife: float = 0.0    # student EMA half-life in generator updates (0 = none, as DMD2); its
    #                              ramp-up (ema_rampup) also counts generator updates
    eval_n: int = 2500
    eval_raw: bool = False       # also evaluate the raw student beside its EMA (metrics "raw_*"): the
    #                              EMA-vs-raw measurement of issue 20.1; no effect without an EMA
    teacher_dtype: str = "fp32"  # fp32 | bf16: storage dtype of the frozen teacher's weights (its
    #                              output is cast to fp32; docs/scaling.md "Precision and memory")


@dataclass
class DistillSettings:
    """The shared sections of a distillation run; :data:`DistillRunConfig` adds one section per
    registered method (``losses.METHODS``), named after it and typed by its config class."""

    teacher: str = ""            # teacher directory (fewstep run or diffusers save_pretrained)
    method: str = "dmd"          # the base method (a name in losses.BASES)
    extras: dict[str, float] = field(default_factory=dict)  # extra terms and weights, e.g. {el: 0.5}
    prompts: str = ""            # text teachers: prompt file, one prompt per line (--prompts); each
    #                              condition is a line drawn uniformly from the step's "prompt" stream
    guidance: float = 1.0        # classifier-free guidance scale w of the teacher's score where a method
    #                              uses one (1 = off; per-method overrides: dp.guidance, sid.cfg_*;
    #                              docs/guidance.md); the student samples unguided
    data: DataConfig = field(default_factory=lambda: DataConfig(name=""))  # real data ("" = teacher's)
    teacher_score: str = "network"  # network | exact: every teacher call (real score, guidance, DP's
    #                                 anchor rollout, CD's teacher step) uses the exact denoiser of
    #                                 the mixture data instead; student and fake score still start
    #                                 from the network teacher, TFD still taps it (docs/guidance.md)
    student: StudentConfig = field(default_factory=StudentConfig)
    fake: FakeConfig = field(default_factory=FakeConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, grad_clip=10.0))  # student
    fake_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, grad_clip=10.0))
    disc_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, grad_clip=10.0))
    train: DistillTrainConfig = field(default_factory=DistillTrainConfig)

    def check(self) -> None:
        check_method_names(self.method, self.extras)
        if self.data.text:
            raise ConfigError("data.text is a teacher setting; a text teacher's student is distilled with "
                              "--prompts FILE")
        for name, weight in self.extras.items():
            if not weight >= 0 or weight == float("inf"):
                raise ConfigError(f"extra weight {name}={weight} must be a finite number >= 0, "
                                  f"e.g. --extra {name}=0.5")
        if self.teacher_score not in ("network", "exact"):
            raise ConfigError(f"teacher_score must be network or exact, got '{self.teacher_score}'")
        if self.student.rollout not in ("full", "backsim"):
            raise ConfigError(f"student.rollout must be full or backsim, got '{self.student.rollout}'")
        if self.student.renoise not in ("fresh", "ddim"):
            raise ConfigError(f"student.renoise must be fresh or ddim, got '{self.student.renoise}'")
        sig = self.student.sigmas
        if sig and len(sig) != self.student.steps:
            raise ConfigError(f"student.sigmas has {len(sig)} levels but "
                              f"student.steps={self.student.steps}; give one level per step")
        if sig and (min(sig) <= 0 or any(b >= a for a, b in zip(sig, sig[1:]))):
            raise ConfigError(f"student.sigmas={sig} must be positive and strictly decreasing, "
                              "e.g. student.sigmas=[80,1.5]")
        if self.schedule.gen_offset >= self.schedule.ratio:
            raise ConfigError(f"schedule.gen_offset={self.schedule.gen_offset} must be smaller than "
                              f"schedule.ratio={self.schedule.ratio}; e.g. schedule.gen_offset=0")
        for name in (self.method, *self.extras):  # rules a method has on the shared sections
            if METHODS[name].check is not None:
                METHODS[name].check(self)


def check_method_names(method: str, extras) -> None:
    """A registered base and registered extras, else a one-line error that suggests the nearest."""
    from fewstep.losses import BASES, EXTRAS

    if method not in BASES:
        raise ConfigError(f"unknown method '{method}'; choose one of {', '.join(BASES)}")
    for name in extras:
        if name not in EXTRAS:
            near = difflib.get_close_matches(name, list(EXTRAS), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; available: {', '.join(EXTRAS)}"
            raise ConfigError(f"unknown extra '{name}'{hint}")


def _with_method_sections(settings: type) -> type:
    """``settings`` plus one section per registered method: ``cfg.dmd``, ``cfg.el``, ... (a method's
    hyperparameters are its own dataclass; adding a method adds its section here by itself)."""
    sections = [(name, entry.config, field(default_factory=entry.config)) for name, entry in METHODS.items()]
    cls = dataclasses.make_dataclass("DistillRunConfig", sections, bases=(settings,))
    cls.__module__, cls.__doc__ = __name__, settings.__doc__
    return cls


DistillRunConfig = _with_method_sections(DistillSettings)


# ---------------------------------------------------------------------------------------------
# conversion between dicts and dataclasses, with type checks
# ---------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list of {_type_name(inner)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, inner = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of a config class (for suggestions and documentation)."""
    keys = []
    for name, tp in _hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown(key: str, root_cls) -> ConfigError:
    near = difflib.get_close_matches(key, all_keys(root_cls), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else "; run with --dry-run to see every key"
    return ConfigError(f"unknown config key '{key}'{hint}")


def from_dict(cls, d: dict, root_cls=None, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, type-checking every value."""
    root_cls = root_cls or cls
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {d!r}")
    hints = _hints(cls)
    defaults = cls()  # a partly given section keeps the parent's defaults for the rest
    kwargs = {}
    for key, value in d.items():
        if key not in hints:
            raise _unknown(prefix + key, root_cls)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            merged = {**dataclasses.asdict(getattr(defaults, key)), **(value or {})}
            kwargs[key] = from_dict(tp, merged, root_cls, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(d: dict, key: str, value, root_cls):
    parts = key.split(".")
    cls, node = root_cls, d
    for i, p in enumerate(parts[:-1]):
        hints = _hints(cls)
        if p in hints and typing.get_origin(hints[p]) is dict and i == len(parts) - 2:
            node.setdefault(p, {})[parts[-1]] = value  # a key inside a mapping field (extras.el=0.5)
            return
        if p not in hints or not dataclasses.is_dataclass(hints[p]):
            raise _unknown(key, root_cls)
        cls = hints[p]
        node = node.setdefault(p, {})
    hints = _hints(cls)
    last = parts[-1]
    if last not in hints or dataclasses.is_dataclass(hints[last]):
        raise _unknown(key, root_cls)
    if typing.get_origin(hints[last]) is dict and isinstance(value, dict):
        node[last] = {**node.get(last, {}), **value}
    else:
        node[last] = value


def parse_override(text: str) -> tuple[str, object]:
    """``a.b=value`` -> ``("a.b", value)``; the value is parsed as YAML (``1e-3``, ``[1,2]``, ``true``)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.iters=2000)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_preset(name_or_path: str) -> dict:
    """A preset by name (``src/fewstep/configs/NAME.yaml``) or a YAML path, as a dict."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset '{name_or_path}'; available presets: {', '.join(names)}")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return d


def resolve(cls, base: dict, overrides: list[str]):
    """Apply dotted overrides to a preset dict and build + validate the config."""
    d = yaml.safe_load(yaml.safe_dump(base)) or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(d, key, value, cls)
    cfg = from_dict(cls, d)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# validation of impossible values
# ---------------------------------------------------------------------------------------------
_POSITIVE = {"iters", "batch", "hidden", "depth", "emb_dim", "layers_per_block", "eval_n", "nfe",
             "lr", "sigma_data", "steps", "ratio", "max_bad_steps", "log_every"}
_NON_NEGATIVE = {"weight_decay", "grad_clip", "warmup", "ema_halflife", "ema_rampup",
                 "eval_every", "ckpt_every", "micro_batch", "eps", "grad_clip_value", "init_sigma",
                 "time_budget_s", "gen_offset", "guidance", "cfg_train_fake", "cfg_eval_fake",
                 "cfg_eval_real", "lora_rank", "lora_alpha"}
_CHOICES = {"model.type": {"auto", "mlp", "unet"}, "model.objective": {"edm", "flow"},
            "model.flow_t": {"logit_normal", "uniform"}, "sample.sampler": {"heun", "euler"},
            "train.device": {"auto", "cpu", "cuda", "mps"}, "train.precision": {"fp32", "bf16", "fp16"},
            "train.teacher_dtype": {"fp32", "bf16"}}


def validate(cfg, prefix: str = "") -> None:
    """Reject impossible values with a one-line ConfigError naming the key."""
    for f in dataclasses.fields(cfg):
        key, value = prefix + f.name, getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        if f.name in _POSITIVE and isinstance(value, int | float) and value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
        if f.name in _NON_NEGATIVE and isinstance(value, int | float) and value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{key} must be one of {sorted(_CHOICES[key])}, got '{value}'")
        _check_list(key, f.name, value)
    extra = getattr(cfg, "check", None)
    if callable(extra):
        extra()


def _check_list(key: str, name: str, value) -> None:
    """List-valued fields with a fixed meaning: Adam betas and UNet block widths."""
    if name == "betas" and (len(value) != 2 or not all(0 <= b < 1 for b in value)):
        raise ConfigError(f"{key}={value} must be two numbers in [0, 1), e.g. {key}=[0.9,0.999]")
    if name == "channels" and (not value or min(value) <= 0):
        raise ConfigError(f"{key}={value} must be a non-empty list of positive widths, e.g. {key}=[32,64]")


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
