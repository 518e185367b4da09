"""The benchmark harness end to end on a reduced suite (issue 8: `bench --suite quick` in CI-like
conditions), plus DPM-Solver++ against the exact ODE."""

import json
import math

import pytest
import torch

from fewstep.bench.report import write_bench_report
from fewstep.bench.runner import job_record, run_jobs
from fewstep.bench.suites import SUITES, smoke
from fewstep.core.mixture import GaussianMixture, MixtureDenoiser
from fewstep.core.sampling import karras_sigmas, sample_heun
from fewstep.train.dpm import sample_dpmpp


def test_suites_are_consistent():
    for name, build in SUITES.items():
        jobs = build()
        names = [j.name for j in jobs]
        assert len(names) == len(set(names)), name
        for j in jobs:
            assert all(d in names for d in j.deps), (name, j.name)


def test_claim_suites_take_their_digits8_seeds_apart_from_the_mixtures():
    for build in (SUITES["el"], SUITES["dp"], SUITES["tfd"]):
        for seeds, digits in (((0, 1), (0,)), ((0,), (0, 1, 2))):
            names = [j.name for j in build(seeds=seeds, digits_seeds=digits) if j.kind == "distill"]
            for data, want in (("ring8", seeds), ("digits8", digits)):
                got = {int(n.rsplit("-s", 1)[1]) for n in names if n.startswith(data) and "-s" in n}
                assert got == set(want), (build.__name__, data, got)
        same = [j.name for j in build(seeds=(0, 1))]  # digits8 follows the mixtures by default
        assert any(n.startswith("digits8") and n.endswith("-s1") for n in same)


def test_ablations_run_at_every_seed():
    """One-seed ablations flipped between two presets (DP-DMD's K = 3): every ablation follows the
    suite's seeds (ring8 for dp and tfd, digits8 for el)."""
    for build, data, tags in ((SUITES["dp"], "ring8", ("K3", "K10", "nodetach", "lam0.01", "lam0.2",
                                                        "final-anchor")),
                              (SUITES["dp"], "digits8-cond", ("final-anchor",)),
                              (SUITES["tfd"], "ring8", ("wall150-sf0.02", "wall150-sf0.5", "wall150-deep")),
                              (SUITES["el"], "digits8", ("K1", "K8", "linear", "fixed"))):
        names = {j.name for j in build(seeds=(0, 1, 2)) if j.kind == "distill"}
        for tag in tags:
            got = {n.rsplit("-s", 1)[1] for n in names if n.startswith(data + "-") and f"-{tag}-s" in n}
            assert got == {"0", "1", "2"}, (build.__name__, tag, got)


def test_dpmpp_approaches_the_exact_ode():
    mu, s = torch.tensor([[0.5, -0.5]], dtype=torch.float64), 0.3
    D = MixtureDenoiser(GaussianMixture.isotropic(mu, s))
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = mu + (80 * z - mu) * math.sqrt(s**2) / math.sqrt(s**2 + 80.0**2)  # ODE to sigma = 0
    assert (sample_heun(D, 80 * z, karras_sigmas(256)) - exact).abs().max() < 1e-3
    errs = [(sample_dpmpp(D, z, n) - exact).abs().max().item() for n in (4, 20, 50)]
    assert errs[2] < errs[1] < errs[0] and errs[2] < 0.02


def test_smoke_suite_runs_and_reports(tmp_path):
    jobs = smoke()
    records = run_jobs(jobs, tmp_path, parallel=2, threads=1, progress=False)
    assert len(records) == len(jobs), [j.name for j in jobs if job_record(tmp_path, j) is None]
    for j in jobs:
        if j.kind == "eval":
            m = json.loads((tmp_path / j.name / "eval.json").read_text())
            assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), j.name
            assert m["nfe"] >= 1 and m["n_samples"] == 200
    md, page = write_bench_report("smoke", jobs, records, tmp_path)
    text = md.read_text()
    assert "dmd + el=1" in text and "teacher, dpmpp" in text and "fewstep distill" in text
    # a second run finds everything cached
    assert run_jobs(jobs, tmp_path, parallel=2, progress=False) == records


def test_job_locks_keep_two_runners_apart(tmp_path):
    import os

    from fewstep.bench.runner import Job, _lock, _lock_path, _locked_elsewhere

    job = Job("j", ["eval", "x"])
    assert _lock(tmp_path, job) and not _locked_elsewhere(tmp_path, job)  # ours
    _lock_path(tmp_path, job).write_text(str(os.getppid()))  # a live other runner holds it
    assert _locked_elsewhere(tmp_path, job) and not _lock(tmp_path, job)
    _lock_path(tmp_path, job).write_text("999999999")  # a dead runner: the stale lock is taken over
    assert _lock(tmp_path, job)


def test_sampling_ratios_follow_the_nfe(tmp_path):
    """The same model at 35 NFE (the reference) and at its default 9 NFE: the throughput ratio is
    about 35/9, measured in alternating rounds."""
    from fewstep.bench.perf import time_sampling
    from tests.helpers import save_tiny_teacher

    t = save_tiny_teacher(tmp_path / "t")
    timed = time_sampling([t, str(t) + "/"], batch=256, rounds=3, min_s=0.2)
    ref, other = timed.values()
    assert math.isclose(ref["ratio"], 1.0)
    assert 2.0 < other["ratio"] < 6.0, other


def test_bench_help_lists_every_suite(capsys):
    from fewstep.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in SUITES)


def test_digits_seeds_zero_drops_digits8_and_keeps_the_rest():
    from fewstep.bench.run import suite_jobs

    full, none = suite_jobs("guidance", 1, 1), suite_jobs("guidance", 1, 0)
    assert any(j.tags["data"] == "digits8" for j in full)
    assert none and all(j.tags["data"] != "digits8" for j in none)
    assert {j.name for j in none} == {j.name for j in full if j.tags["data"] != "digits8"}


def test_normalizer_suite_arms_differ_only_in_the_normalizer():
    """Issue 20.2: the three dmd.normalizer arms share every other setting, on grid25 and on the shipped
    imbalanced10 mixture file (installed with the package, read as a user's file)."""
    from pathlib import Path

    from fewstep.bench.suites import ASSET_DATA, NORMALIZERS, SUITES
    from fewstep.data.loaders import read_mixture_file

    mix = read_mixture_file(Path(ASSET_DATA["imbalanced10"]))
    w = mix.weights.double()
    assert len(w) == 10 and abs(float(w.sum()) - 1) < 1e-5 and float(w.max() / w.min()) > 25
    jobs = [j for j in SUITES["normalizer"]() if j.kind == "distill"]
    for data in ("grid25", "imbalanced10"):
        for seed in (0, 1, 2):
            arms = [j for j in jobs if j.tags["data"] == data and j.tags["seed"] == seed]
            rest = {tuple(a for a in j.args if not a.startswith("dmd.normalizer=") and a != "{out}")
                    for j in arms}
            assert len(arms) == len(NORMALIZERS) and len(rest) == 1
            assert sorted(a for j in arms for a in j.args if a.startswith("dmd.normalizer=")) == \
                sorted(f"dmd.normalizer={n}" for n in NORMALIZERS)


def test_latent_suite_covers_the_issue_matrix_on_both_teachers():
    """Issue 17's experiment: one VAE, flow and EDM teachers on its latents, per teacher and seed the
    1- and 4-step students of dmd, sid, fdistill and tfd with and without el, and 4-step dmd+dp with
    the first-step target in the teacher's native form; flow Euler rows only for the flow teacher."""
    from fewstep.bench.suites import LATENT_BASES, SUITES

    jobs = SUITES["latent"](seeds=(0, 1))
    by_name = {j.name: j for j in jobs}
    teachers = [j for j in jobs if j.kind == "teacher"]
    assert {t.tags["objective"] for t in teachers} == {"flow", "edm"}
    for t in teachers:
        assert t.deps == ["vae-mnist28"] and "--vae" in t.args
        assert t.args[t.args.index("--objective") + 1] == t.tags["objective"]
        for seed in (0, 1):
            students = [j for j in jobs if j.kind == "distill" and j.deps == [t.name]
                        and j.tags["seed"] == seed]
            arms = {(j.tags["method"], tuple(j.tags["extras"]), j.tags["steps"]) for j in students}
            want = {(m, ex, k) for m in LATENT_BASES for ex in ((), ("el",)) for k in (1, 4)}
            assert arms == want | {("dmd", ("dp",), 4)}, t.name
            pix = [j for j in students if "el.space=pixels" in j.args]
            assert [(j.tags["method"], j.tags["steps"]) for j in pix] == [("dmd", 1)]
            dp = next(j for j in students if "dp" in j.tags["extras"])
            form = "velocity" if t.tags["objective"] == "flow" else "x0"
            assert f"dp.target={form}" in dp.args
            assert all(f"eval-{j.name}-r3" in by_name for j in students)  # every student evaluated
        samplers = {j.tags["sampler"] for j in jobs if j.kind == "eval" and j.deps == [t.name]}
        assert samplers == ({"heun", "dpmpp", "flow_euler"} if t.tags["objective"] == "flow"
                            else {"heun", "dpmpp"})
    first_edm = next(i for i, j in enumerate(jobs) if j.kind == "distill" and "-edm-" in j.name)
    assert not any("el" in j.tags["extras"] for j in jobs[:first_edm] if j.kind == "distill")


def test_report_only_reports_what_finished_and_starts_nothing(tmp_path, capsys):
    from fewstep.cli import main

    assert main(["bench", "--suite", "latent", "--seeds", "1", "--out", str(tmp_path / "b"),
                 "--report-only", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "0/" in out and "jobs done" in out
    assert not any(p.is_dir() and p.name != "_jobs" for p in (tmp_path / "b").iterdir())  # no job ran
