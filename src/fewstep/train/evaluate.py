"""Evaluation orchestration: sample, extract features, compute metrics next to their floors.

Pure statistics live in ``fewstep.metrics``; feature extractors in ``fewstep.metrics.features``.
Floors (BENCHMARKS.md) are the same metric between two independent real sets of the evaluated
size, over ``FLOOR_DRAWS`` fixed draws: ``mmd_floor`` = mean + 2 std (a threshold for an unbiased
estimator centred on 0); every other ``*_floor`` is the plain mean.

Latent data (a VAE): samples are decoded before any metric, so metrics are always on pixels, in the
pixel data set's feature space. Beside the data floors, ``<metric>_vae_floor`` is the same floor
with the train side replaced by its VAE reconstructions (what a generator that reproduces the
training latents exactly would score), and ``fd_vae_recon`` the fd of decode(encode(reference set))
against that set (docs/metrics.md).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fewstep import metrics as M
from fewstep.data import Dataset, dataset_from_record, load_dataset
from fewstep.data.provenance import recorded_data
from fewstep.errors import FewstepError
from fewstep.train.rng import generator

FLOOR_DRAWS = 10
MIXTURE_N = 2500
MMD_REF_N = 2000


@dataclass
class MetricSpace:
    """How one data set is measured: its feature map and real sets for comparison and floors.

    ``data`` is always pixel (or vector) data; for latent data ``latent`` is the encoded data set and
    :meth:`to_pixels` decodes generated latents."""

    data: Dataset
    features: callable
    name: str
    latent: Dataset | None = None

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Generated samples in the space metrics are computed in (decoded for latent data)."""
        if self.latent is None:
            return x
        with torch.no_grad():
            return self.latent.decode(x)

    def real_pair(self, n: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two disjoint real sets of size ``n`` for floor draw ``i`` (train subset vs test for
        finite data; two fresh draws for mixtures)."""
        g = generator("floor", self.data.name, n, i)
        if self.data.mixture is not None:
            return self.data.test_samples(n, g)[0], self.data.test_samples(n, g)[0]
        return self.data.train_samples(n, g)[0], self.data.test_samples(n, g)[0]

    def reference(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The real set generated samples are compared with (test split or fresh mixture draws)."""
        return self.data.test_samples(n, generator("reference", self.data.name, n))


def metric_space(data: Dataset) -> MetricSpace:
    """The metric space of ``data`` (of its pixel data set for latent data)."""
    from fewstep.metrics import features as F

    latent = data if data.is_latent else None
    pixels = data.pixels if data.is_latent else data
    vae = f", decoded by the VAE in {data.vae.path}" if latent is not None else ""
    if pixels.name == "digits8":
        return MetricSpace(pixels, F.digits_features, f"digits feature network (128-d){vae}", latent)
    if pixels.name == "mnist28" and tuple(pixels.shape) == (1, 28, 28):
        return MetricSpace(pixels, F.mnist28_features, f"mnist28 feature network (128-d){vae}", latent)
    if pixels.kind == "vector":
        return MetricSpace(pixels, F.identity_features, "raw coordinates", latent)
    return MetricSpace(pixels, F.identity_features, f"raw pixels{vae}", latent)


def default_n(data: Dataset) -> int:
    if data.mixture is not None:
        return MIXTURE_N
    return len(data.x_test)


_GAMMAS: dict[str, torch.Tensor] = {}
_FLOORS: dict[tuple[str, int], dict] = {}


def _gammas(space: MetricSpace) -> torch.Tensor:
    """MMD bandwidths frozen from a fixed real reference set of the data (metrics.md section 7)."""
    key = space.data.name
    if key not in _GAMMAS:
        ref = space.data.train_samples(MMD_REF_N, generator("mmd-bandwidth", key))[0]
        _GAMMAS[key] = M.mmd_gammas(space.features(ref).double())
    return _GAMMAS[key]


def feature_metrics(space: MetricSpace, real_f: torch.Tensor, fake_f: torch.Tensor,
                    fake_labels=None) -> dict:
    """All metrics between real and generated features ``[n, d]`` (float64)."""
    out = {"fd": M.fd(real_f, fake_f), "mmd": M.mmd(real_f, fake_f, _gammas(space))}
    out["precision"], out["recall"] = M.precision_recall(real_f, fake_f, k=3)
    out["density"], out["coverage"] = M.density_coverage(real_f, fake_f, k=5)
    if space.data.kind == "image":
        out["kid"] = M.kid(real_f, fake_f, generator=generator("kid"))
        out["diversity"] = M.diversity(fake_f, fake_labels)
        if fake_labels is not None:  # per class, for standard errors over conditions (DP-DMD)
            out["diversity_by_class"] = M.diversity_by_condition(fake_f, fake_labels)
    return out


FLOOR_VERSION = 1  # bump when a metric or the floor protocol changes (invalidates the disk cache)
BUILTIN = ("ring8", "grid25", "grid25c", "digits8", "mnist28")


def _floor_cache_path(space: MetricSpace, n: int):
    """Floors of built-in data sets are deterministic: cache them on disk (``FEWSTEP_CACHE``)."""
    import os
    from pathlib import Path

    if space.data.name not in BUILTIN:
        return None
    root = Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep"))
    return root / "floors" / f"{space.data.name}-n{n}-v{FLOOR_VERSION}.json"


def floors(space: MetricSpace, n: int) -> dict:
    """Real-vs-real floors at sample size ``n`` (cached in memory and, for built-in data, on disk)."""
    if space.data.mixture is None and n > min(len(space.data.x_test), len(space.data.x_train)):
        return {}
    key = (space.data.name, n)
    path = _floor_cache_path(space, n)
    if key not in _FLOORS and path is not None and path.exists():
        _FLOORS[key] = json.loads(path.read_text())
    if key not in _FLOORS:
        draws = []
        for i in range(FLOOR_DRAWS):
            a, b = space.real_pair(n, i)
            draws.append(feature_metrics(space, space.features(a).double(), space.features(b).double()))
        out = {}
        for name in draws[0]:
            if name == "diversity":
                continue
            vals = torch.tensor([d[name] for d in draws], dtype=torch.float64)
            out[f"{name}_floor"] = float(vals.mean() + 2 * vals.std()) if name == "mmd" else \
                float(vals.mean())
        _FLOORS[key] = out
        _write_cache(path, out)
    return _FLOORS[key]


_VAE_FLOORS: dict[tuple[str, str, int], dict] = {}


def vae_floors(space: MetricSpace, n: int) -> dict:
    """VAE floors of latent data at sample size ``n`` (``{}`` for pixel data).

    ``<metric>_vae_floor``: mean over ``FLOOR_DRAWS`` of the metric between decode(encode(train
    subset)) and the test subset of the data floor's draw i (the same images as ``floors``), so
    ``fd_vae_floor - fd_floor`` is what the VAE costs a perfect latent generator.
    ``fd_vae_recon``: fd of decode(encode(reference)) against the reference set itself (spec §2).
    Cached in memory and, for built-in data, on disk keyed by the VAE's sha256."""
    if space.latent is None or n > min(len(space.data.x_test), len(space.data.x_train)):
        return {}
    key = (space.data.name, space.latent.vae.sha256, n)
    path = _floor_cache_path(space, n)
    if path is not None:
        path = path.with_name(path.name.replace(".json", f"-vae{space.latent.vae.sha256[:16]}.json"))
    if key not in _VAE_FLOORS and path is not None and path.exists():
        _VAE_FLOORS[key] = json.loads(path.read_text())
    if key not in _VAE_FLOORS:
        _VAE_FLOORS[key] = _compute_vae_floors(space, n)
        _write_cache(path, _VAE_FLOORS[key])
    return _VAE_FLOORS[key]


def _compute_vae_floors(space: MetricSpace, n: int) -> dict:
    latent, name = space.latent, space.data.name
    draws = []
    for i in range(FLOOR_DRAWS):
        g = generator("floor", name, n, i)  # MetricSpace.real_pair's draws: same images, same order
        z = latent.train_samples(n, g)[0]
        b = space.data.test_samples(n, g)[0]
        draws.append(feature_metrics(space, space.features(space.to_pixels(z)).double(),
                                     space.features(b).double()))
    out = {}
    for metric in draws[0]:
        if metric in ("diversity", "diversity_by_class"):
            continue
        vals = torch.tensor([d[metric] for d in draws], dtype=torch.float64)
        out[f"{metric}_vae_floor"] = float(vals.mean() + 2 * vals.std()) if metric == "mmd" else \
            float(vals.mean())
    ref, _ = space.reference(n)
    z_ref, _ = latent.test_samples(n, generator("reference", name, n))
    out["fd_vae_recon"] = M.fd(space.features(ref).double(), space.features(space.to_pixels(z_ref)).double())
    return out


def _write_cache(path, value: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
    except OSError:  # a read-only home only costs recomputation
        pass


def score_samples(space: MetricSpace, x: torch.Tensor, labels=None, with_floors: bool = True,
                  cond_classes: torch.Tensor | None = None) -> dict:
    """Metrics of generated samples ``x [n, *shape]`` against the reference real set (latent samples
    are decoded first; their results carry the VAE floors too). ``cond_classes`` (text models: the
    data class each condition names, -1 none) adds the prompt adherence."""
    n = len(x)
    x = space.to_pixels(x)
    real, _ = space.reference(n)
    if len(real) < n:
        raise FewstepError(f"only {len(real)} real test samples; evaluate with --n {len(real)} or fewer")
    out = feature_metrics(space, space.features(real).double(), space.features(x).double(), labels)
    if cond_classes is not None and labels is not None:
        out.update(prompt_adherence(space, x, cond_classes.cpu()[labels.cpu()]))
    if space.data.mixture is not None:
        mix = space.data.mixture
        out.update(M.mode_metrics(x.double(), mix.means, mix.mode_stds, mix.weights))
        if mix.labels is not None and labels is not None:  # within-class collapse (grid25c)
            out.update(M.class_mode_metrics(x.double(), labels, mix.means, mix.mode_stds, mix.labels,
                                            mix.weights))
    if with_floors:
        out.update(floors(space, n))
        out.update(vae_floors(space, n))
    if space.latent is not None:
        out["vae"] = str(space.latent.vae.path)
    out["n_samples"] = n
    return out


def prompt_adherence(space: MetricSpace, x: torch.Tensor, classes: torch.Tensor) -> dict:
    """``prompt_adherence``: the feature network's accuracy on the class each sample's prompt names
    (pixels ``x [n, ...]``; prompts that name no class are left out, ``prompt_classified`` is the
    share kept). Only data with a feature-network classifier (digits8, mnist28) has it."""
    from fewstep.metrics import features as F

    known = classes >= 0
    name = space.data.name
    if name not in ("digits8", "mnist28") or not known.any():
        return {}
    pred = F.featnet_classes(name, x[known])
    return {"prompt_adherence": (pred.cpu() == classes[known]).double().mean().item(),
            "prompt_classified": known.double().mean().item()}


def evaluate_model(path, n=None, nfe=None, sampler="heun", seed=0, data=None, fid=False,
                   device="auto", repeats: int = 1, guidance: float = 1.0,
                   prompts: list[str] | None = None) -> dict:
    """``fewstep eval``: sample a teacher/student, then score it with floors and throughput.

    With ``repeats > 1`` each metric is the mean over that many independent generated sets (seeds
    ``seed, seed+1, ...``) and ``<metric>_std`` their standard deviation: on small test sets
    (digits8: 897) the generated side alone moves fd by tens of percent between seeds."""
    from fewstep.train.device import resolve_device
    from fewstep.train.generate import load_generator

    device = resolve_device(device)
    gen = load_generator(path, device, prompts)
    data_name = recorded_data(gen.meta.get("data"), path, override=data)  # path + hash checked
    if not data_name:
        raise FewstepError("this model does not record its data set; pass --data NAME|PATH")
    dataset = dataset_from_record(gen.meta.get("data", {}), gen.num_classes > 0, name=data_name)
    space = metric_space(dataset)
    n = n or default_n(space.data)
    if repeats < 1:
        raise FewstepError(f"--repeats must be at least 1, got {repeats}")
    gen.sample(min(n, 16), seed=seed + 999, nfe=nfe, sampler=sampler, device=device, guidance=guidance)
    sample_s = eval_s = 0.0
    runs = []
    for r in range(repeats):
        t0 = time.perf_counter()
        x, y = gen.sample(n, seed=seed + r, nfe=nfe, sampler=sampler, device=device, guidance=guidance)
        sample_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        runs.append(score_samples(space, x, y, cond_classes=gen.cond_classes))
        eval_s += time.perf_counter() - t0
        if r == 0:
            x_first = x
    out = average_runs(runs)
    if fid:  # standard FID on the first generated set only (Inception is slow on a CPU)
        t0 = time.perf_counter()
        out.update(fid_metrics(space, space.to_pixels(x_first)))
        out["fid_s"] = round(time.perf_counter() - t0, 3)
    out.update({"nfe": gen.nfe(nfe, sampler, guidance), "guidance": guidance,
                "samples_per_sec": repeats * n / sample_s,
                "sample_s": round(sample_s, 3), "eval_s": round(eval_s, 3), "repeats": repeats,
                "sampler": sampler if gen.role == "teacher" else "student", "seed": seed,
                "metric_space": space.name, "data": data_name, "model": str(path)})
    return out


def evaluate_samples(path, data: str, n: int | None = None, fid: bool = False,
                     vae: str | None = None) -> dict:
    """``fewstep eval --samples FILE --data D [--vae DIR]``: the same metrics and floors for samples made
    by any tool (formats: ``fewstep.data.samples``); ``n`` keeps the first n samples. With ``vae`` the
    samples are that VAE's latents: decoded and scored on pixels, with the VAE floors (as a latent
    model's are)."""
    from fewstep.data.samples import read_latents, read_samples

    if not data:
        raise FewstepError("--samples needs --data NAME|PATH: the data set to compare the samples with")
    dataset = load_dataset(data, vae=vae)
    x, y = (read_latents if vae else read_samples)(path, tuple(dataset.shape))
    if n is not None:
        if n < 2 or n > len(x):
            raise FewstepError(f"--n {n}: the samples file holds {len(x)}; pick 2..{len(x)}")
        x, y = x[:n], None if y is None else y[:n]
    space = metric_space(dataset)
    t0 = time.perf_counter()
    out = score_samples(space, x, y)
    out["eval_s"] = round(time.perf_counter() - t0, 3)
    if fid:
        out.update(fid_metrics(space, space.to_pixels(x)))
    out.update({"metric_space": space.name, "data": data, "model": str(path), "source": "samples"})
    return out


def average_runs(runs: list[dict]) -> dict:
    """Mean of each metric over repeated generated sets, with ``<metric>_std`` (floors are equal)."""
    if len(runs) == 1:
        return dict(runs[0])
    out = {}
    for k, v in runs[0].items():
        vals = [r[k] for r in runs]
        if isinstance(v, float) and not k.endswith("_floor"):
            t = torch.tensor(vals, dtype=torch.float64)
            out[k], out[f"{k}_std"] = float(t.mean()), float(t.std())
        elif isinstance(v, int) and not isinstance(v, bool) and k not in ("modes_total", "n_samples"):
            t = torch.tensor(vals, dtype=torch.float64)
            out[k], out[f"{k}_std"] = float(t.mean()), float(t.std())
        elif isinstance(v, dict):  # per-class values: mean per class over the repeats
            out[k] = {c: sum(r[k][c] for r in runs) / len(runs) for c in v}
        else:
            out[k] = v
    return out


def fid_metrics(space: MetricSpace, x: torch.Tensor) -> dict:
    """Standard-protocol Inception FID (images only; slow on CPU)."""
    from fewstep.metrics import features as F

    if space.data.kind != "image":
        return {}
    if not F.inception_available():
        F.inception_network()  # raises the one-line "how to install it" error
    n = len(x)
    path = _floor_cache_path(space, n)
    path = path.with_name(path.name.replace(".json", "-inception-real.npy")) if path else None
    if path is not None and path.exists():  # the real side is fixed: its features are cached
        import numpy as np

        real_f = torch.from_numpy(np.load(path))
    else:
        real, _ = space.reference(n)
        real_f = F.inception_features(real).double()
        if path is not None:
            import numpy as np

            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, real_f.numpy())
            os.replace(tmp, path)
    return {"fid": M.fd(real_f.double(), F.inception_features(x).double()),
            "fid_floor": _fid_floor(space, n, real_f, path)}


def _fid_floor(space: MetricSpace, n: int, real_f: torch.Tensor, real_path) -> float:
    """FID of a disjoint real set (train subset, floor draw 0) against the reference set: one draw,
    not the mean over FLOOR_DRAWS like the other floors, because Inception runs at a few images/s on
    CPU. Cached beside the reference features."""
    from fewstep.metrics import features as F

    path = real_path.with_name(real_path.name.replace("-real.npy", "-floor.json")) if real_path else None
    if path is not None and path.exists():
        return float(json.loads(path.read_text())["fid_floor"])
    other, _ = space.real_pair(n, 0)
    value = M.fd(F.inception_features(other).double(), real_f.double())
    if path is not None:
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"fid_floor": value, "draws": 1}))
        os.replace(tmp, path)
    return value


def in_training_evaluator(cfg):
    """Evaluation on a fixed noise batch for the training loops (``train.eval_n`` samples)."""
    from fewstep.train.generate import Generator

    cache = {}

    def evaluate(model, step: int) -> dict:
        if "data" not in cache:
            cache["data"] = _run_dataset(cfg, conditional=model.num_classes > 0)
        data = cache["data"]
        space = metric_space(data)
        n = min(cfg.train.eval_n, default_n(space.data))
        role = "student" if hasattr(model, "num_steps") else "teacher"
        sample = getattr(cfg, "sample", None)
        gen = Generator(model=model, meta={"data": {"shape": list(data.shape)},
                                           "nfe": sample.nfe if sample else 35}, role=role)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        x, y = gen.sample(n, seed=cfg.train.seed + 10_000, device=device,
                          sampler=sample.sampler if sample else "heun")
        model.train(was_training)
        return {k: v for k, v in score_samples(space, x, y, cond_classes=gen.cond_classes).items()}

    return evaluate


def _teacher_data_record(teacher: str) -> dict:
    """The teacher's model.json ``data`` section; a text pipeline from elsewhere: its own VAE."""
    from fewstep.models.io import is_text_pipeline, read_model_json

    root = Path(teacher)
    if (root / "model.json").is_file():
        return read_model_json(teacher)[1].get("data", {})
    return {"vae": {"path": str(root / "vae")}} if root.is_dir() and is_text_pipeline(root) else {}


def _run_dataset(cfg, conditional: bool) -> Dataset:
    """The run's data set: ``data.name`` (through ``data.vae`` if set), or for distillation the
    teacher's recorded data (its VAE included)."""
    vae = getattr(cfg.data, "vae", "") or None
    if cfg.data.name and (vae or not getattr(cfg, "teacher", "")):
        return load_dataset(cfg.data.name, conditional=conditional, vae=vae)
    section = _teacher_data_record(cfg.teacher)
    if cfg.data.name:  # another data name, the teacher's VAE (as build_run distils in its latent space)
        return dataset_from_record(section, conditional, name=cfg.data.name)
    name = recorded_data(section, cfg.teacher)
    if not name:
        raise FewstepError("the teacher does not record its data set; pass data.name=NAME|PATH")
    return dataset_from_record(section, conditional, name=name)


_ORDER = ["nfe", "n_samples", "fd", "fd_floor", "fd_vae_recon", "fid", "fid_floor", "kid", "kid_floor", "mmd",
          "mmd_floor",
          "precision", "precision_floor", "recall", "recall_floor", "density", "density_floor",
          "coverage", "coverage_floor", "diversity", "modes_covered", "modes_covered_any",
          "modes_total", "hq_rate", "mode_mass_tv", "class_modes_covered", "class_modes_covered_min",
          "class_modes_total", "class_mode_tv", "class_hit_rate", "prompt_adherence", "guidance",
          "samples_per_sec", "sample_s", "eval_s"]


def format_table(metrics: dict) -> str:
    """A two-column terminal table with each metric next to its floor."""
    rows = []
    for key in _ORDER:
        if key in metrics and not key.endswith("_floor"):
            v = metrics[key]
            floor = metrics.get(f"{key}_floor")
            val = f"{v:.5g}" if isinstance(v, float) else str(v)
            if f"{key}_std" in metrics:
                val += f" ± {metrics[key + '_std']:.2g}"
            floor_text = "" if floor is None else f"floor {floor:.5g}"
            if isinstance(metrics.get(f"{key}_vae_floor"), float):
                floor_text += f", vae floor {metrics[key + '_vae_floor']:.5g}"
            rows.append((key, val, floor_text))
    width = max(len(r[0]) for r in rows)
    head = f"{metrics.get('model', '')}  [{metrics.get('metric_space', '')}]"
    return "\n".join([head] + [f"  {k:<{width}}  {v:>12}  {f}" for k, v, f in rows])
