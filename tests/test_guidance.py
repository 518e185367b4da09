"""Classifier-free guidance end to end (issue 16; specs/guidance.md section 5).

The guided denoiser (core/guidance.py) against its algebra and against the closed form of an exact
class-conditional mixture; guidable teachers (label dropout, the null label, model.json); guided
sampling and its NFE count; guidance entering each method where the spec's table says; the CLI
command of the issue on a tiny own teacher; the refusals; the ``guidance`` bench suite."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from fewstep.cli import main
from fewstep.core.guidance import NULL_LABEL, check_guidable, guided, guided_denoise, null_label
from fewstep.core.mixture import MixtureDenoiser, grid25
from fewstep.errors import ConfigError, DataError, ModelError
from fewstep.models.io import build_denoiser

COND_MLP = {"type": "mlp", "dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16, "num_classes": 5,
            "sigma_data": 0.5}


def _perturbed(spec: dict, dtype=torch.float64, seed: int = 0):
    """A conditional own net with random (non-zero) label embedding and output layer."""
    torch.manual_seed(seed)
    D = build_denoiser(spec).to(dtype)
    with torch.no_grad():
        for p in D.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return D.eval().requires_grad_(False)


class Counter(torch.nn.Module):
    """Counts calls and rows of the wrapped denoiser (its attributes are exposed unchanged)."""

    def __init__(self, D):
        super().__init__()
        self.D, self.rows, self.labels = D, [], []
        for k in ("num_classes", "sigma_data", "sigma_min", "sigma_max", "null_label"):
            if hasattr(D, k):
                setattr(self, k, getattr(D, k))

    def forward(self, x, sigma, cond=None):
        self.rows.append(x.shape[0])
        self.labels.append(None if cond is None else cond.clone())
        return self.D(x, sigma, cond)


def _inputs(B=6, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, generator=g, dtype=dtype) * 2
    sigma = torch.exp(torch.randn(B, generator=g, dtype=dtype))
    return x, sigma, torch.arange(B) % 5


# ---------------------------------------------------------------------------------------------
# the guided denoiser
# ---------------------------------------------------------------------------------------------
def test_w1_is_the_plain_conditional_call_bit_for_bit_with_one_evaluation():
    D = Counter(_perturbed(COND_MLP))
    D.null_label = NULL_LABEL
    x, s, c = _inputs()
    assert guided(D, 1.0) is D
    out = guided_denoise(D, x, s, c, 1.0)
    assert D.rows == [len(x)] and torch.equal(out, D.D(x, s, c))


def test_w0_is_unconditional_affine_in_w_and_one_batched_call_equals_two_calls():
    D = Counter(_perturbed(COND_MLP))
    x, s, c = _inputs()
    null = torch.full_like(c, NULL_LABEL)
    u, k = D.D(x, s, null), D.D(x, s, c)
    assert not torch.allclose(u, k)  # the label matters, so the checks below can fail
    for w in (0.0, 2.5, -0.5, 4.0):
        D.rows.clear()
        out = guided_denoise(D, x, s, c, w)
        assert D.rows == [2 * len(x)]  # both branches in one call of 2B rows
        torch.testing.assert_close(out, u + w * (k - u), rtol=0, atol=1e-12)  # == two separate calls
    d0, d1, d3 = (guided_denoise(D.D, x, s, c, w) for w in (0.0, 1.0, 3.0))
    torch.testing.assert_close(d0, u, rtol=0, atol=1e-12)
    torch.testing.assert_close(d3, d0 + 3 * (d1 - d0), rtol=0, atol=1e-11)  # affine in w


@pytest.mark.parametrize("spec", [COND_MLP, {"type": "unet", "shape": [1, 8, 8], "num_classes": 5,
                                              "block_out_channels": [8, 16], "layers_per_block": 1}],
                         ids=["mlp", "unet"])
def test_own_nets_take_the_null_label_as_the_zero_one_hot(spec):
    D = _perturbed(spec, torch.float32)
    B = 4
    x = torch.randn(B, *D.shape, generator=torch.Generator().manual_seed(0))
    s = torch.full((B,), 1.3)
    null = D(x, s, torch.full((B,), NULL_LABEL))
    assert torch.equal(null, D(x, s, None))
    assert not torch.allclose(null, D(x, s, torch.arange(B) % 5))


def _log_p(x, means, var, members):
    """ln p_sigma(x) up to a constant, for an equal-weight isotropic mixture restricted per sample
    to the components ``members [B, K]`` (bool): written out independently of core.mixture."""
    d2 = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    return (-d2 / (2 * var)).masked_fill(~members, -torch.inf).logsumexp(1)


@pytest.mark.parametrize("sigma", [0.02, 0.3, 1.5, 8.0])
def test_exact_mixture_guided_denoiser_matches_the_closed_form(sigma):
    """D_w = x + sigma^2 grad_x [w ln p(x | c) + (1 - w) ln p(x)] for grid25c (class = row), the
    Tweedie form of the guided score, at several sigma in float64."""
    mix = grid25(labelled=True)
    D = MixtureDenoiser(mix, conditional=True)
    g = torch.Generator().manual_seed(3)
    c = torch.arange(40) % 5
    x0, _ = mix.sample(40, g)
    x = (x0 + sigma * torch.randn(40, 2, generator=g, dtype=torch.float64)).requires_grad_(True)
    var = 0.05**2 + sigma**2
    row = (torch.arange(25) % 5)[None] == c[:, None]  # the modes of each sample's class
    for w in (0.0, 1.0, 2.5, 4.0):
        logp = w * _log_p(x, mix.means, var, row) + (1 - w) * _log_p(x, mix.means, var, row | True)
        (grad,) = torch.autograd.grad(logp.sum(), x)
        expected = x.detach() + sigma**2 * grad
        got = guided(D, w)(x.detach(), torch.full((40,), sigma, dtype=torch.float64), c)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_refusals_name_the_fix():
    with pytest.raises(ModelError, match="data.conditional=true train.p_uncond=0.1"):
        check_guidable(5, None, 2.0)
    with pytest.raises(ModelError, match="unconditional"):
        check_guidable(0, None, 2.0)
    with pytest.raises(ModelError, match="dp.guidance=3"):
        check_guidable(5, None, 3.0, "dp.guidance")
    check_guidable(5, None, 1.0)  # w = 1 never needs an unconditional branch
    D = _perturbed(COND_MLP)
    assert null_label(D) is None
    with pytest.raises(ModelError, match="label dropout"):
        guided(D, 2.0)


# ---------------------------------------------------------------------------------------------
# a class-conditional toy with exact answers
# ---------------------------------------------------------------------------------------------
def test_grid25c_labels_are_rows_and_conditional_draws_stay_in_the_class():
    from fewstep.data import load_dataset

    data = load_dataset("grid25c", conditional=True)
    assert data.num_classes == 5 and data.mixture.num_components == 25
    g = torch.Generator().manual_seed(0)
    x, y = data.train_batch(2000, g)
    assert set(y.tolist()) == set(range(5))
    row_y = torch.arange(-2, 3, dtype=torch.float64) * 2  # class c sits on y = 2 (c - 2)
    assert (x[:, 1].double() - row_y[y]).abs().max() < 0.5
    c = torch.tensor([3] * 1000)
    xs, ys = data.mixture.sample(1000, g, cond=c)
    assert torch.equal(ys, c) and (xs[:, 1] - 2.0).abs().max() < 0.5
    assert len(torch.unique(torch.round(xs[:, 0] / 2))) == 5  # every mode of the row is drawn


def test_unlabelled_mixtures_keep_component_conditions_and_their_draws():
    mix = grid25()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x, comp = mix.sample(300, g1)
    ref_comp = torch.multinomial(mix.weights, 300, replacement=True, generator=g2)  # the old draws
    ref = mix.means[ref_comp] + 0.05 * torch.randn(300, 2, generator=g2, dtype=torch.float64)
    assert torch.equal(comp, ref_comp) and torch.allclose(x, ref, atol=1e-12)
    D = MixtureDenoiser(mix, conditional=True)
    assert D.num_classes == 25
    x, sigma = torch.zeros(1, 2, dtype=torch.float64), torch.tensor([50.0])  # the posterior is the prior
    torch.testing.assert_close(D(x, sigma, torch.tensor([7]))[0], mix.means[7], atol=1e-4, rtol=0)
    torch.testing.assert_close(D(x, sigma, torch.tensor([NULL_LABEL]))[0], mix.means.mean(0), atol=1e-4,
                               rtol=0)


def test_mixture_file_labels(tmp_path):
    from fewstep.data import load_dataset

    good = {"means": [[0, 0], [2, 0], [0, 3]], "stds": 0.1, "labels": [1, 1, 0]}
    (tmp_path / "m.json").write_text(json.dumps(good))
    data = load_dataset(str(tmp_path / "m.json"), conditional=True)
    assert data.num_classes == 2 and data.mixture.labels.tolist() == [1, 1, 0]
    x, y = data.mixture.sample(200, torch.Generator().manual_seed(0), cond=torch.zeros(200, dtype=torch.long))
    assert (x - torch.tensor([0.0, 3.0], dtype=torch.float64)).norm(dim=1).max() < 1
    for bad, why in (([0, 2, 0], "classes \\[1\\]"), ([0, 1], "3 class indices"), ([0, 0.5, 1], "3 class")):
        (tmp_path / "b.json").write_text(json.dumps({**good, "labels": bad}))
        with pytest.raises(DataError, match=why):
            load_dataset(str(tmp_path / "b.json"))


def test_class_mode_metrics_see_within_class_collapse():
    from fewstep.metrics import class_mode_metrics

    mix = grid25(labelled=True)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(2000) % 5
    x, _ = mix.sample(2000, g, cond=y)
    args = (mix.means, mix.mode_stds, mix.labels, mix.weights)
    full = class_mode_metrics(x, y, *args)
    assert full["class_modes_covered"] == 5 and full["class_modes_total"] == 5
    assert full["class_hit_rate"] > 0.98 and full["class_mode_tv"] < 0.06
    # every class collapsed onto its first mode: covered 1 of 5, TV = 1 - 1/5
    first = torch.stack([mix.means[(mix.labels == c).nonzero()[0, 0]] for c in range(5)])
    collapsed = first[y] + 0.05 * torch.randn(2000, 2, generator=g, dtype=torch.float64)
    m = class_mode_metrics(collapsed, y, *args)
    assert m["class_modes_covered"] == 1 and m["class_mode_tv"] == pytest.approx(0.8, abs=1e-9)
    wrong = class_mode_metrics(x, (y + 1) % 5, *args)  # right modes, wrong labels
    assert wrong["class_hit_rate"] == 0 and wrong["class_modes_covered"] == 0


# ---------------------------------------------------------------------------------------------
# guidable teachers: label dropout, model.json, loading
# ---------------------------------------------------------------------------------------------
def test_label_dropout_rate_and_its_draws_per_step_and_slice():
    from fewstep.train.rng import StepRandom
    from fewstep.train.teacher import drop_labels

    y = torch.arange(20000) % 5
    full = drop_labels(y, StepRandom(7, 3, 20000), 0.1)
    rate = float((full == NULL_LABEL).double().mean())
    assert abs(rate - 0.1) < 4 * (0.1 * 0.9 / 20000) ** 0.5  # binomial, 4 standard deviations
    assert torch.equal(full[full >= 0], y[full >= 0])
    assert torch.equal(full, drop_labels(y, StepRandom(7, 3, 20000), 0.1))  # (seed, step) fixes it
    assert not torch.equal(full, drop_labels(y, StepRandom(7, 4, 20000), 0.1))
    part = drop_labels(y[5000:9000], StepRandom(7, 3, 20000, 5000, 9000), 0.1)  # one process's shard
    assert torch.equal(part, full[5000:9000])


def _streams_of_one_teacher_step(monkeypatch, overrides):
    from fewstep.recipe import teacher_config
    from fewstep.train import teacher as T
    from fewstep.train.rng import StepRandom

    seen = []
    real_rand = StepRandom.rand

    def rand(self, stream, *a, **k):
        seen.append(stream)
        return real_rand(self, stream, *a, **k)

    monkeypatch.setattr(StepRandom, "rand", rand)
    cfg = teacher_config("grid25c", ["train.batch=64", "model.hidden=16", "model.depth=1", *overrides])
    from fewstep.data import load_dataset

    data = load_dataset("grid25c", conditional=cfg.data.conditional)
    spec, net = T.build_teacher_net(cfg, data)
    state = T.TeacherState(net, copy.deepcopy(net), T.make_optimizer(net.parameters(), cfg.optim),
                           [(0, 64)], cfg, data, spec, torch.device("cpu"))
    T._train_step(state, data, cfg, torch.device("cpu"))
    return seen


def test_unconditional_and_no_dropout_teachers_make_no_dropout_draw(monkeypatch):
    """No new random draw unless a conditional teacher drops labels: unconditional runs and
    ``p_uncond = 0`` runs are the runs they were before guidance existed."""
    assert _streams_of_one_teacher_step(monkeypatch, []) == []
    assert _streams_of_one_teacher_step(monkeypatch, ["data.conditional=true", "train.p_uncond=0"]) == []
    assert _streams_of_one_teacher_step(monkeypatch, ["data.conditional=true"]) == ["p_uncond"]


def test_p_uncond_is_validated():
    from fewstep.recipe import teacher_config

    assert teacher_config("grid25c", ["data.conditional=true"]).train.p_uncond == 0.1
    with pytest.raises(ConfigError, match="train.p_uncond"):
        teacher_config("grid25c", ["train.p_uncond=1.0"])


TEACHER = ["--data", "grid25c", "--no-progress", "data.conditional=true", "model.hidden=32",
           "model.depth=2", "model.emb_dim=16", "train.batch=64", "train.eval_n=100", "train.log_every=5",
           "train.ckpt_every=100"]


@pytest.fixture(scope="module")
def cond_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("guided") / "t"
    assert main(["teacher", "--out", str(out), "--iters", "40", *TEACHER]) == 0
    return out


@pytest.fixture(scope="module")
def plain_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "t0"
    assert main(["teacher", "--out", str(out), "--iters", "2", *TEACHER, "train.p_uncond=0"]) == 0
    return out


def test_model_json_records_dropout_and_loading_makes_the_teacher_guidable(cond_teacher, plain_teacher):
    from fewstep.models.io import load_teacher

    meta = json.loads((cond_teacher / "model.json").read_text())["meta"]
    assert meta["p_uncond"] == 0.1 and meta["null_label"] == NULL_LABEL
    assert null_label(load_teacher(cond_teacher)[0]) == NULL_LABEL
    meta0 = json.loads((plain_teacher / "model.json").read_text())["meta"]
    assert meta0["p_uncond"] == 0 and meta0["null_label"] is None
    assert null_label(load_teacher(plain_teacher)[0]) is None


def test_conditional_teacher_with_dropout_resumes_bit_for_bit(tmp_path, monkeypatch):
    from tests.helpers import assert_states_equal
    from tests.test_resume import _final, _stop_at, _train_lines

    def cli(out):
        return main(["teacher", "--out", str(tmp_path / out), "--iters", "8", *TEACHER])

    assert cli("straight") == 0
    with monkeypatch.context() as m:
        _stop_at(m, "fewstep.train.loop", 3)
        assert cli("resumed") != 0
    assert cli("resumed") == 0
    assert_states_equal(_final(tmp_path / "straight", 8), _final(tmp_path / "resumed", 8))
    assert _train_lines(tmp_path / "straight") == _train_lines(tmp_path / "resumed")


# ---------------------------------------------------------------------------------------------
# guided sampling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,nfe,calls", [("heun", 9, 9), ("euler", 4, 4), ("dpmpp", 4, 4)])
def test_guided_sampling_counts_network_evaluations(sampler, nfe, calls):
    from fewstep.train.generate import Generator

    D = Counter(MixtureDenoiser(grid25(labelled=True), conditional=True))
    gen = Generator(model=D, meta={"data": {"shape": [2]}, "nfe": 9}, role="teacher")
    x1, _ = gen.sample(10, seed=0, nfe=nfe, sampler=sampler)
    assert D.rows == [10] * calls and gen.nfe(nfe, sampler) == calls
    D.rows.clear()
    x3, _ = gen.sample(10, seed=0, nfe=nfe, sampler=sampler, guidance=3.0)
    assert D.rows == [20] * calls and gen.nfe(nfe, sampler, 3.0) == 2 * calls  # 2 per denoiser call
    assert all((lab[:10] == NULL_LABEL).all() and (lab[10:] >= 0).all() for lab in D.labels[-calls:])
    assert not torch.allclose(x1, x3)
    D.rows.clear()
    x1b, _ = gen.sample(10, seed=0, nfe=nfe, sampler=sampler, guidance=1.0)
    assert torch.equal(x1, x1b) and D.rows == [10] * calls


def test_students_refuse_guidance():
    from fewstep.models.student import Student
    from fewstep.train.generate import Generator

    G = _perturbed(COND_MLP, torch.float32)
    gen = Generator(model=Student(G, [80.0]), meta={"data": {"shape": [2]}}, role="student")
    with pytest.raises(Exception, match="students sample without guidance"):
        gen.sample(4, guidance=2.0)
    assert gen.nfe(None, "heun", 2.0) == 1


# ---------------------------------------------------------------------------------------------
# guided distillation through the method contract
# ---------------------------------------------------------------------------------------------
def _run(method: str, guidance: float = 1.0, extras=None, null=NULL_LABEL, **sections):
    from fewstep.config import DistillRunConfig, from_dict
    from fewstep.losses import METHODS
    from fewstep.train.distill import build_run
    from tests.helpers import _merge

    teacher = _perturbed(COND_MLP, torch.float32)
    if null is not None:
        teacher.null_label = null
    d = {}
    for name in (method, *(extras or {})):
        d = _merge(d, METHODS[name].defaults)
    d = _merge(d, {"method": method, "extras": dict(extras or {}), "guidance": guidance,
                   "train": {"batch": 8, "iters": 4}, **sections})
    cfg = from_dict(DistillRunConfig, d)
    return build_run(cfg, torch.device("cpu"), teacher=teacher,
                     teacher_meta={"data": {"name": "grid25c", "shape": [2]}})


def test_guided_dmd_at_w1_is_unguided_dmd_bit_for_bit():
    from fewstep.train.control import reseed
    from fewstep.train.distill import run_state, train_iteration
    from tests.helpers import assert_states_equal

    states = []
    for null, w in ((None, 1.0), (NULL_LABEL, 1.0)):  # a teacher that cannot be guided, and w = 1
        torch.manual_seed(0)
        run = _run("dmd", w, null=null, schedule={"ratio": 1})
        for step in range(3):
            reseed(0, step)
            train_iteration(run)
        states.append(run_state(run))
    assert_states_equal(*states)  # student, fake score, optimisers, RNG state


def test_guided_dmd_guides_the_real_score_only():
    from fewstep.core.utils import append_dims, mean_flat
    from fewstep.losses.dmd import ascending_grid
    from fewstep.train.distill import make_batch

    values = {}
    for w in (1.0, 3.0):
        torch.manual_seed(0)
        run = _run("dmd", w)
        batch = make_batch(run, 0)
        gen = run.rollout(run.nets.student, batch, batch.z)
        values[w] = float(run.methods[0].terms[0](run.nets, batch, gen).loss.mean().detach())
    idx = batch.rnd.randint("dm_index", 20, 981)
    sigma = ascending_grid()[idx].float()
    x = gen.x.detach()
    x_s = x + append_dims(sigma, 2) * batch.rnd.randn("dm_noise", 2)
    T, c = run.nets.teacher, batch.cond
    with torch.no_grad():
        u, k = T(x_s, sigma, torch.full_like(c, NULL_LABEL)), T(x_s, sigma, c)
        real = u + 3.0 * (k - u)  # two separate calls, the fake score unguided
        g = (run.nets.fake(x_s, sigma, c) - real) / append_dims(mean_flat((x - real).abs()), 2)
    assert values[3.0] == pytest.approx(float(0.5 * mean_flat(g**2).mean()), rel=1e-4)
    assert abs(values[3.0] - values[1.0]) > 1e-3 * values[1.0]


def _spy(module):
    calls = []
    module.register_forward_pre_hook(lambda m, args: calls.append(
        (args[0].shape[0], None if len(args) < 3 or args[2] is None else bool((args[2] < 0).any()))))
    return calls


@pytest.mark.parametrize("method,extras,sections,teacher_null,fake_null", [
    ("dmd", None, {}, True, False),
    ("di", None, {}, True, False),
    ("fdistill", None, {}, True, False),
    ("cd", None, {}, True, None),
    ("sid", None, {}, True, True),                                              # SiD-LSG: all scales
    ("sid", None, {"sid": {"cfg_eval_fake": 1.0, "cfg_train_fake": 1.0}}, True, False),
    ("dmd", {"dp": 0.05}, {"guidance": 1.0, "dp": {"guidance": 2.0}}, True, False),  # anchor only
])
def test_guidance_enters_each_method_where_the_spec_says(method, extras, sections, teacher_null, fake_null):
    from fewstep.train.control import reseed
    from fewstep.train.distill import setup_methods, train_iteration

    sections = dict(sections)
    guidance = sections.pop("guidance", 2.0)
    steps = {"student": {"steps": 4, "renoise": "ddim"}} if extras else {}
    run = _run(method, guidance, extras, schedule={"ratio": 1}, **steps, **sections)
    t_calls = _spy(run.nets.teacher)
    f_calls = _spy(run.nets.fake) if run.nets.fake is not None else None
    setup_methods(run)
    reseed(0, 0)
    train_iteration(run)
    assert any(null for _, null in t_calls) == teacher_null
    if fake_null is not None:
        assert any(null for _, null in f_calls) == fake_null
    run1 = _run(method, 1.0, extras, schedule={"ratio": 1}, **steps)
    t1 = _spy(run1.nets.teacher)
    train_iteration(run1)
    assert not any(null for _, null in t1)  # unguided: the null label never reaches the teacher


@pytest.mark.parametrize("method,why", [("tfd", "tfd uses the teacher's features"),
                                        ("drift", "drift uses no teacher score")])
def test_methods_without_a_teacher_score_refuse_guidance(method, why):
    with pytest.raises(ConfigError, match=why):
        _run(method, 2.0)


def test_guidance_of_a_teacher_without_dropout_is_refused_at_build():
    with pytest.raises(ModelError, match="label dropout"):
        _run("dmd", 2.0, null=None)
    with pytest.raises(ModelError, match="sid.cfg_eval_real=2"):
        _run("sid", 1.0, null=None, sid={"cfg_eval_real": 2.0})
    with pytest.raises(ConfigError, match="sid.cfg_eval_fake=1"):
        _run("sid", 2.0, sid={"adversarial": True})


# ---------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------
def test_issue_command_runs_on_an_own_conditional_teacher(cond_teacher, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["distill", "--teacher", str(cond_teacher), "--method", "dmd", "--guidance", "3",
                 "--steps", "4", "--extra", "dp=0.05", "--out", str(out), "--iters", "3", "--batch", "16",
                 "--no-progress", "train.eval_n=100"]) == 0
    meta = json.loads((out / "model.json").read_text())["meta"]
    assert meta["guidance"] == 3 and meta["steps"] == 4 and meta["extras"] == {"dp": 0.05}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("dp" in r for r in lines) and "class_modes_covered" in lines[-1]
    capsys.readouterr()
    assert main(["sample", str(out), "--guidance", "2", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "students sample without guidance" in err[0]


def test_guided_teacher_eval_reports_network_evaluations(cond_teacher, tmp_path):
    js = tmp_path / "e.json"
    assert main(["eval", str(cond_teacher), "--guidance", "2", "--nfe", "5", "--n", "100",
                 "--json", str(js)]) == 0
    m = json.loads(js.read_text())
    assert m["nfe"] == 10 and m["guidance"] == 2 and m["class_modes_total"] == 5
    assert main(["sample", str(cond_teacher), "--guidance", "2", "--sampler", "dpmpp", "--nfe", "3",
                 "--n", "8", "--out", str(tmp_path / "g.npz")]) == 0


@pytest.mark.parametrize("command", [
    ["sample", "{t}", "--guidance", "2", "--out", "{o}/x.npz"],
    ["eval", "{t}", "--guidance", "2", "--n", "50"],
    ["distill", "--teacher", "{t}", "--method", "dmd", "--guidance", "2", "--out", "{o}/s", "--iters", "1"],
])
def test_cli_refuses_guidance_for_a_teacher_trained_without_dropout(plain_teacher, tmp_path, capsys, command):
    args = [a.format(t=plain_teacher, o=tmp_path) for a in command]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.p_uncond=0.1" in err[0]
    assert not (tmp_path / "s").exists()


def test_guidance_appears_in_help(capsys):
    for sub in ("distill", "sample", "eval"):
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        assert "--guidance" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the bench suite
# ---------------------------------------------------------------------------------------------
def test_guidance_suite_builds_and_its_commands_resolve():
    from fewstep.bench.suites import SUITES
    from fewstep.cli import _resolve_distill_config, build_parser

    jobs = SUITES["guidance"](seeds=(0, 1, 2))
    assert len({j.name for j in jobs}) == len(jobs)
    teacher_evals = [j for j in jobs if j.kind == "eval" and j.tags.get("role") == "teacher"]
    assert sorted({(j.tags["data"], j.tags["guidance"]) for j in teacher_evals}) == \
        [(d, w) for d in ("digits8", "grid25c") for w in (1.0, 2.0, 4.0)]
    distills = [j for j in jobs if j.kind == "distill"]
    arms = {(j.tags["data"], j.tags["method"], tuple(j.tags["extras"]), j.tags["guidance"]) for j in distills}
    for data in ("grid25c", "digits8"):
        for w in (1.0, 2.0, 4.0):
            assert {(data, "dmd", (), w), (data, "dmd", ("dp",), w), (data, "dmd", ("el",), w),
                    (data, "fdistill", (), w)} <= arms
    assert {j.tags["seed"] for j in distills} == {0, 1, 2}
    parser = build_parser()
    for j in distills:
        cfg = _resolve_distill_config(parser.parse_args(j.command(Path("/r"))))
        assert cfg.guidance == j.tags["guidance"]


def test_diffusers_teacher_with_a_null_class_is_guidable(tmp_path):
    """A class-conditional UNet2DModel with a null class exposes null_label = -1; w = 1 is the plain
    call, and a guided call mixes the null-class branch (different from the conditional one)."""
    from diffusers import DDPMScheduler, UNet2DModel

    from fewstep.core.guidance import guided, null_label
    from fewstep.models.adapters import load_diffusers_teacher

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "scheduler")
    D = load_diffusers_teacher(tmp_path)
    assert null_label(D) == -1 and D.num_classes == 3
    x, s, c = torch.randn(3, 1, 8, 8), torch.full((3,), 2.0), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(guided(D, 1.0)(x, s, c), D(x, s, c))
        g, cond, unc = guided(D, 3.0)(x, s, c), D(x, s, c), D(x, s, torch.full((3,), -1))
    assert torch.allclose(g, unc + 3 * (cond - unc), atol=1e-5) and not torch.allclose(cond, unc)


def test_teacher_score_exact_replaces_every_teacher_call(cond_teacher, tmp_path, capsys):
    """teacher_score=exact (the separating run of docs/guidance.md): the real score is grid25c's exact
    denoiser, which reads the network teacher's null label as unconditional, while student and fake
    score start from the network; refused on finite data; a guided run distils and saves."""
    from fewstep.data import load_dataset
    from fewstep.recipe import distill_config
    from fewstep.train.distill import build_run

    over = ["train.batch=16", "teacher_score=exact"]
    run = build_run(distill_config(str(cond_teacher), "dmd", overrides=over), torch.device("cpu"))
    exact, net = run.nets.teacher, run.ctx.teacher
    assert isinstance(exact, MixtureDenoiser) and not isinstance(net, MixtureDenoiser)
    ref = MixtureDenoiser(load_dataset("grid25c", conditional=True).mixture, conditional=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, generator=g, dtype=torch.float64)
    sigma = torch.rand(32, generator=g, dtype=torch.float64) + 0.2
    y = torch.randint(0, 5, (32,), generator=g)
    null = torch.full_like(y, NULL_LABEL)
    assert torch.equal(exact(x, sigma, y), ref(x, sigma, y))
    assert torch.equal(exact(x, sigma, null), ref(x, sigma, torch.full_like(y, -1)))
    assert not torch.allclose(exact(x, sigma, null), exact(x, sigma, y))
    student_w = [p for p in run.nets.student.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(student_w, net.parameters()))  # student = network copy
    out = tmp_path / "s"
    assert main(["distill", "--teacher", str(cond_teacher), "--method", "dmd", "--out", str(out),
                 "--iters", "10", "--steps", "2", "--guidance", "2", "--no-progress", *over,
                 "train.eval_n=50", "train.eval_every=0", "student.renoise=ddim"]) == 0
    assert (out / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="teacher_score must be network or exact"):
        distill_config(str(cond_teacher), "dmd", overrides=["teacher_score=oracle"])


def test_teacher_score_exact_needs_mixture_data(tmp_path, capsys):
    from tests.helpers import save_tiny_teacher

    spec = {"type": "mlp", "dim": 2, "hidden": 8, "depth": 1, "emb_dim": 8, "num_classes": 0,
            "sigma_data": 0.5}
    t = save_tiny_teacher(tmp_path / "t", spec=spec,
                          data={"name": "blobs.npy", "kind": "vector", "shape": [2], "num_classes": 0})
    import numpy as np

    np.save(tmp_path / "blobs.npy", np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32))
    code = main(["distill", "--teacher", str(t), "--method", "dmd", "--out", str(tmp_path / "s"),
                 "--iters", "2", "--no-progress", f"data.name={tmp_path / 'blobs.npy'}",
                 "teacher_score=exact"])
    err = capsys.readouterr().err
    assert code == 2 and "teacher_score=exact needs mixture data" in err and "Traceback" not in err
    assert not (tmp_path / "s" / "model.safetensors").exists()
