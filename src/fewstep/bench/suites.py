"""The benchmark matrix (BENCHMARKS.md "Suites") and the claim experiments, as job lists.

Budgets are per data set; every arm of a comparison gets the same budget. The defaults of each
method come from its ``DEFAULTS`` and the data set's presets (``configs/distill_<data>.yaml``); a
suite only sets what the comparison varies (method, extras, steps, seed, batch, budget).
"""

from __future__ import annotations

from pathlib import Path

from fewstep.bench.runner import Job

MIXTURES = ("ring8", "grid25")
# mixture files shipped with fewstep and read as a user's file would be (--data PATH)
ASSET_DATA = {"imbalanced10": str(Path(__file__).resolve().parents[1] / "assets" / "imbalanced10.yaml")}
BASES_1STEP = ("dmd", "di", "sid", "cd", "tfd")


def teacher_job(data: str, iters: int | None = None, conditional: bool = False, name: str = "",
                p_uncond: float | None = None) -> Job:
    """A teacher; ``p_uncond`` sets its label dropout explicitly (and names it, since conditional
    teachers made before dropout became the default have none). ``data`` is a built-in name or one
    of fewstep's asset files (``ASSET_DATA``), named by its stem."""
    args = ["teacher", "--data", ASSET_DATA.get(data, data), "--out", "{out}"]
    if iters:
        args += ["--iters", str(iters)]
    if conditional:
        args += ["data.conditional=true"]
    if p_uncond is not None:
        args += [f"train.p_uncond={p_uncond:g}"]
    # names encode everything that differs, so suites sharing one --out directory share teachers
    default = f"teacher-{data}{_cond(conditional, p_uncond)}{f'-i{iters}' if iters else ''}"
    return Job(name or default, args, kind="teacher",
               tags={"data": data, "conditional": conditional, "role": "teacher", "p_uncond": p_uncond})


def _cond(conditional: bool, p_uncond: float | None) -> str:
    return ("-cond" if conditional else "") + ("" if p_uncond is None else f"-pu{p_uncond:g}")


def distill_job(teacher: Job, method: str, extras: dict | None = None, steps: int = 1, seed: int = 0,
                iters: int | None = None, batch: int | None = None, overrides: tuple = (),
                tag: str = "", eval_every: int | None = None, guidance: float = 1.0) -> Job:
    extras = extras or {}
    ex = "".join(f"+{k}{v:g}" for k, v in extras.items())
    # the name encodes everything that changes the model, so suites sharing an --out share runs
    budget = (f"-i{iters}" if iters else "") + (f"-b{batch}" if batch else "")
    cond = _cond(teacher.tags["conditional"], teacher.tags.get("p_uncond"))
    name = f"{teacher.tags['data']}{cond}-{method}{ex}" \
           f"-k{steps}{_w(guidance)}{budget}{'-' + tag if tag else ''}-s{seed}"
    args = ["distill", "--teacher", f"{{root}}/{teacher.name}", "--method", method, "--out", "{out}",
            "--steps", str(steps), "--seed", str(seed)]
    for k, v in extras.items():
        args += ["--extra", f"{k}={v}"]
    if iters:
        args += ["--iters", str(iters)]
    if batch:
        args += ["--batch", str(batch)]
    if eval_every:
        args += ["--eval-every", str(eval_every)]
    if guidance != 1:
        args += ["--guidance", f"{guidance:g}"]
    if steps > 1:
        args += ["student.renoise=ddim"]  # deterministic chain: DP-DMD and its DMD baseline (dp_dmd.md 4)
    args += list(overrides)
    tags = {"data": teacher.tags["data"], "conditional": teacher.tags["conditional"], "method": method,
            "extras": extras, "steps": steps, "seed": seed, "tag": tag, "role": "student",
            "batch": batch, "overrides": list(overrides), "guidance": guidance}
    return Job(name, args, deps=[teacher.name], kind="distill", tags=tags)


def _w(guidance: float) -> str:
    """The name part of a guidance scale ("" at w = 1, so unguided names stay what they were)."""
    return "" if guidance == 1 else f"-w{guidance:g}"


def eval_job(model: Job, nfe: int | None = None, sampler: str = "heun", n: int | None = None,
             fid: bool = False, guidance: float = 1.0) -> Job:
    """Evaluate a model; ``guidance`` samples a teacher guided (students sample unguided)."""
    name = f"eval-{model.name}" + (f"-{sampler}{nfe}" if nfe else "") + _w(guidance)
    args = ["eval", f"{{root}}/{model.name}", "--json", "{out}/eval.json", "--sampler", sampler]
    if guidance != 1:
        args += ["--guidance", f"{guidance:g}"]
    if nfe:
        args += ["--nfe", str(nfe)]
    if n:
        args += ["--n", str(n)]
    if fid:
        args += ["--fid"]
    tags = {**model.tags, "model": model.name, "sampler": sampler if model.kind == "teacher" else "student",
            "nfe": nfe or (model.tags.get("steps") if model.kind == "distill" else 35)}
    if model.kind == "teacher":
        tags["guidance"] = guidance
    return Job(name, args, deps=[model.name], kind="eval", tags=tags)


def perf_job(teacher: Job, students: list[Job], methods: list[str], name: str = "") -> Job:
    """Speed ratios measured in one process (``fewstep perf``): students over the teacher's 35-NFE
    Heun, training time per iteration of each method over dmd's."""
    args = ["perf", "--teacher", f"{{root}}/{teacher.name}", "--json", "{out}/perf.json",
            "--students", *[f"{{root}}/{s.name}" for s in students], "--methods", *methods]
    return Job(name or f"perf-{teacher.name}", args, deps=[teacher.name] + [s.name for s in students],
               kind="perf", tags=dict(teacher.tags))


def _reps(data: str) -> int:
    """Generated sets per final evaluation: 3 on digits8 (small test split), 1 on mixtures."""
    return 3 if data.startswith("digits") else 1


def _with_fid(job: Job) -> Job:
    job.name += "-fid"
    job.args += ["--fid"]
    return job


def _students_with_evals(jobs: list[Job], teacher: Job, specs: list[dict], n: int | None = None,
                         repeats: int = 1) -> list[Job]:
    """Append a distill job and its evaluation for each spec; returns the distill jobs."""
    made = []
    for spec in specs:
        d = distill_job(teacher, **spec)
        ev = eval_job(d, n=n)
        if repeats > 1:  # mean +- std over generated sets (digits8's fd moves ~0.15 between seeds)
            ev.args += ["--repeats", str(repeats)]
            ev.name += f"-r{repeats}"
        jobs += [d, ev]
        made.append(d)
    return made


def teacher_sweep(teacher: Job, heun_steps=(1, 2, 4, 8, 18), dpm_nfe=(1, 2, 4, 8, 10),
                  n: int | None = None) -> list[Job]:
    """The teacher at several NFE: Heun on the Karras grid (2N-1 NFE; N=1 is one Euler step) and
    diffusers' DPM-Solver++ — the alternatives to distilling."""
    jobs = [eval_job(teacher, nfe=2 * s - 1, sampler="heun", n=n) for s in heun_steps]
    return jobs + [eval_job(teacher, nfe=k, sampler="dpmpp", n=n) for k in dpm_nfe]


def quick() -> list[Job]:
    """CI-sized: every base and extra once on ring8 and digits8 with short budgets."""
    t_ring, t_dig = teacher_job("ring8", iters=1500), teacher_job("digits8", iters=300)
    jobs = [t_ring, t_dig] + teacher_sweep(t_ring, (1, 4, 18), (4,), n=1000)
    specs = [{"method": m, "iters": 300} for m in (*BASES_1STEP, "drift")]
    specs += [{"method": "dmd", "extras": {"el": 1.0}, "iters": 300},
              {"method": "dmd", "extras": {"dp": 0.05}, "steps": 4, "iters": 300}]
    made = _students_with_evals(jobs, t_ring, specs, n=1000)
    jobs.append(perf_job(t_ring, [made[0], made[-1]], ["dmd", "dmd+el", "dmd+dp@4", "di", "sid", "cd",
                                                       "tfd", "drift"]))
    jobs.append(eval_job(t_dig, nfe=7, n=300))
    _students_with_evals(jobs, t_dig, [{"method": "dmd", "iters": 40, "batch": 32},
                                       {"method": "dmd", "extras": {"el": 1.0}, "iters": 40,
                                        "batch": 32}], n=300)
    return jobs


def full(seeds=(0, 1, 2)) -> list[Job]:
    """BENCHMARKS.md's full matrix at CPU budgets (about 2 hours with --jobs 2): ring8 with 3 seeds,
    grid25 and digits8 (unconditional and class-conditional) with one."""
    jobs: list[Job] = []
    for data in MIXTURES:
        t = teacher_job(data)
        jobs += [t] + teacher_sweep(t)
        specs = [{"method": m, "extras": ex, "seed": s} for s in (seeds if data == "ring8" else (0,))
                 for m in BASES_1STEP for ex in ({}, {"el": 1.0})]
        specs += [{"method": "dmd", "extras": ex, "steps": 4, "seed": s}
                  for s in (seeds if data == "ring8" else (0,)) for ex in ({}, {"dp": 0.05})]
        made = _students_with_evals(jobs, t, specs)
        if data == "ring8":
            firsts = [d for d in made if d.tags["seed"] == 0]
            jobs.append(perf_job(t, firsts, ["dmd", "dmd+el", "dmd@4", "dmd+dp@4", "di", "di+el", "sid",
                                             "sid+el", "cd", "cd+el", "tfd", "tfd+el"]))
    for cond in (False, True):
        t = teacher_job("digits8", conditional=cond)
        jobs += [t] + teacher_sweep(t, heun_steps=(1, 4, 18), dpm_nfe=(1, 2, 4, 8, 10))
        specs = [{"method": m, "extras": ex} for m in ("dmd", "tfd") for ex in ({}, {"el": 1.0})]
        specs += [{"method": "dmd", "extras": ex, "steps": 4} for ex in ({}, {"dp": 0.05})]
        made = _students_with_evals(jobs, t, specs, repeats=3)
        jobs.append(perf_job(t, made, ["dmd", "dmd+el", "dmd@4", "dmd+dp@4", "tfd"]))
        if not cond:  # the standard-protocol Inception FID next to the digits-feature fd
            jobs += [_with_fid(eval_job(t, nfe=35, n=None)), _with_fid(eval_job(made[0])),
                     _with_fid(eval_job(made[1]))]
    return jobs


def smoke() -> list[Job]:
    """A reduced ``quick`` for the test suite: every base and extra runs a few iterations."""
    t = teacher_job("ring8", iters=150)
    jobs = [t, eval_job(t, nfe=7, n=200), eval_job(t, nfe=4, sampler="dpmpp", n=200)]
    specs = [{"method": m, "iters": 10, "batch": 64} for m in (*BASES_1STEP, "drift")]
    specs += [{"method": "dmd", "extras": {"el": 1.0}, "iters": 10, "batch": 64},
              {"method": "dmd", "extras": {"dp": 0.05}, "steps": 4, "iters": 10, "batch": 64}]
    _students_with_evals(jobs, t, [{**s, "overrides": ("train.eval_n=200",)} for s in specs], n=200)
    return jobs


def demo() -> list[Job]:
    """``make demo``: ring8 teacher -> dmd, dmd+el, dmd+dp (4 steps), tfd students -> evaluation, and
    a digits8 teacher with a demo budget, in about 10 minutes on 2 cores."""
    t_ring, t_dig = teacher_job("ring8"), teacher_job("digits8", iters=2000)
    jobs = [t_ring, t_dig, eval_job(t_ring), eval_job(t_ring, nfe=4, sampler="dpmpp"),
            eval_job(t_dig, nfe=35)]
    _students_with_evals(jobs, t_ring, [{"method": "dmd"}, {"method": "dmd", "extras": {"el": 1.0}},
                                        {"method": "dmd", "extras": {"dp": 0.05}, "steps": 4},
                                        {"method": "tfd"}])  # the presets' budgets
    return jobs


# ---------------------------------------------------------------------------------------------
# claim experiments (issues 5-7); budgets chosen so each suite fits a few CPU hours
# ---------------------------------------------------------------------------------------------
def _seeds_for(data: str, seeds: tuple, digits_seeds: tuple | None) -> tuple:
    """Training seeds of a claim-suite arm: digits8 may have its own (``--digits-seeds``)."""
    return digits_seeds if data.startswith("digits8") and digits_seeds is not None else seeds


def el_suite(seeds=(0, 1, 2), digits_seeds=None) -> list[Job]:
    """Embedding Loss: B vs B+el for B in {dmd, di, sid} at equal iterations, small batch, ablations."""
    jobs: list[Job] = []
    for data in (*MIXTURES, "digits8"):
        t = teacher_job(data)
        jobs += [t, eval_job(t)]
        made, data_seeds = [], _seeds_for(data, seeds, digits_seeds)
        for s in data_seeds:
            specs = [{"method": m, "extras": ex, "seed": s} for m in ("dmd", "di", "sid")
                     for ex in ({}, {"el": 1.0})]
            if data != "digits8":  # small batch: B+el at 16 vs B at 128
                specs += [{"method": "dmd", "extras": {"el": 1.0}, "seed": s, "batch": 16},
                          {"method": "dmd", "seed": s, "batch": 128}]
            made += _students_with_evals(jobs, t, specs, repeats=_reps(data))
        if data == "digits8":  # ablations with dmd, at every digits8 seed
            abl = [("K1", ["el.K=1"]), ("K8", ["el.K=8"]), ("linear", ["el.kernel=linear"]),
                   ("fixed", ["el.redraw=false"])]
            _students_with_evals(jobs, t, [{"method": "dmd", "extras": {"el": 1.0}, "tag": tag, "seed": s,
                                            "overrides": tuple(ov)} for s in data_seeds for tag, ov in abl],
                                 repeats=3)
        jobs.append(perf_job(t, [], ["dmd", "dmd+el", "di", "di+el", "sid", "sid+el"],
                             name=f"perf-el-{data}"))
    return jobs


def dp_suite(seeds=(0, 1, 2), digits_seeds=None) -> list[Job]:
    """DP-DMD: 4-step dmd vs dmd+dp at equal budgets; ablations on ring8; 1-step dmd+dp (every seed)."""
    jobs: list[Job] = []
    for data, cond in (("ring8", False), ("grid25", False), ("digits8", True)):
        t = teacher_job(data, conditional=cond)
        jobs += [t, eval_job(t)]
        data_seeds = _seeds_for(data, seeds, digits_seeds)
        for s in data_seeds:
            _students_with_evals(jobs, t, [{"method": "dmd", "extras": ex, "steps": 4, "seed": s}
                                           for ex in ({}, {"dp": 0.05})], repeats=_reps(data))
        if data == "ring8":
            abl = [("K3", {"dp": 0.05}, ["dp.anchor_k=3"]), ("K10", {"dp": 0.05}, ["dp.anchor_k=10"]),
                   ("nodetach", {"dp": 0.05}, ["dp.detach=false"]), ("lam0.01", {"dp": 0.01}, []),
                   ("lam0.2", {"dp": 0.2}, [])]
            _students_with_evals(jobs, t, [{"method": "dmd", "extras": ex, "steps": 4, "tag": tag,
                                            "seed": s, "overrides": tuple(ov)}
                                           for s in data_seeds for tag, ex, ov in abl])
        _students_with_evals(jobs, t, [{"method": "dmd", "extras": {"dp": 0.05}, "steps": 1, "seed": s,
                                        "tag": "final-anchor", "overrides": ("dp.anchor_k=30",)}
                                       for s in data_seeds], repeats=_reps(data))
        jobs.append(perf_job(t, [], ["dmd@4", "dmd+dp@4"], name=f"perf-dp-{data}"))
    return jobs


def tfd_suite(seeds=(0, 1, 2), digits_seeds=None) -> list[Job]:
    """Teacher-Feature Drifting: tfd, tfd without coverage, drift and dmd at equal wall-clock budgets."""
    jobs: list[Job] = []
    wall = {"ring8": 150, "grid25": 150, "digits8": 300}
    for data in (*MIXTURES, "digits8"):
        t = teacher_job(data)
        jobs += [t, eval_job(t)]
        budget = (f"train.time_budget_s={wall[data]}", "train.iters=1000000")
        w = f"wall{wall[data]}"
        arms = [("tfd", w, ()), ("tfd", f"{w}-nocov", ("tfd.coverage=false",)), ("drift", w, ()),
                ("dmd", w, ())]
        data_seeds = _seeds_for(data, seeds, digits_seeds)
        for s in data_seeds:
            _students_with_evals(jobs, t, [{"method": m, "seed": s, "tag": tag, "overrides": budget + ov}
                                           for m, tag, ov in arms], repeats=_reps(data))
        if data == "ring8":
            abl = [("sf0.02", ("tfd.sigma_f=0.02",)), ("sf0.5", ("tfd.sigma_f=0.5",)),
                   ("deep", ("tfd.tap_set=deep", "tfd.raw_coords=false"))]
            _students_with_evals(jobs, t, [{"method": "tfd", "tag": f"{w}-{tag}", "seed": s,
                                            "overrides": budget + ov} for s in data_seeds for tag, ov in abl])
        jobs.append(perf_job(t, [], ["dmd", "tfd", "tfd|tfd.coverage=false", "drift"],
                             name=f"perf-tfd-{data}"))
    return jobs


def fdistill_suite(seeds=(0, 1, 2), digits_seeds=None) -> list[Job]:
    """f-distill next to dmd (issue 15): the mode-covering divergences (js, kl) against reverse KL
    (dmd), 1 step, at equal iterations and settings. Budgets are shorter than the dmd presets (3000
    iterations on the mixtures, a 2000-iteration digits8 teacher) so the suite fits a CPU session;
    ring8 arms all start at sigma 1 as ring8's dmd preset does. f-distill's GAN head is its density-
    ratio estimator; rkl == dmd + GAN head is a unit test (tests/test_fdistill.py)."""
    jobs: list[Job] = []
    for data, iters in (("ring8", 3000), ("grid25", 3000), ("digits8", None)):
        t = teacher_job(data, iters=2000 if data == "digits8" else None)
        jobs += [t, eval_job(t)]
        same = ("student.init_sigma=1.0",) if data == "ring8" else ()
        arms = [("dmd", "", same)] + [("fdistill", f, (*same, f"fdistill.f_div={f}")) for f in ("js", "kl")]
        for s in _seeds_for(data, seeds, digits_seeds):
            specs = [{"method": m, "seed": s, "tag": tag, "iters": iters, "overrides": ov}
                     for m, tag, ov in arms]
            _students_with_evals(jobs, t, specs, repeats=_reps(data))
    return jobs


GUIDANCE_SCALES = (1.0, 2.0, 4.0)


def guidance_suite(seeds=(0, 1, 2), digits_seeds=None) -> list[Job]:
    """Classifier-free guidance (issue 16; specs/guidance.md 4), a skeleton at the presets' budgets.

    Class-conditional teachers trained with label dropout on grid25c (exact answers: modes covered
    per class) and digits8, evaluated at each w (the teacher at w is each student's reference);
    per seed and w: 4-step dmd, dmd+dp (anchor rollout and real score guided), dmd+el and fdistill
    (js, kl), all distilled at w; tfd once per seed (it uses no teacher score, so no w). Ablations
    of dp at the largest w on grid25c: lambda 0.2 and the anchor K = 10, 20 of 30 teacher steps
    (with the default K = 5: early, middle and late points of the trajectory). On grid25c, 4-step dmd
    once more at each w with ``teacher_score=exact`` (the exact guided denoiser as the real score;
    student and fake score still start from the network): whether guided dmd's loss of quality is
    the method's or the network teacher's."""
    jobs: list[Job] = []
    for data in ("grid25c", "digits8"):
        t = teacher_job(data, conditional=True, p_uncond=0.1)
        jobs += [t] + [eval_job(t, guidance=w) for w in GUIDANCE_SCALES]
        data_seeds = _seeds_for(data, seeds, digits_seeds)
        arms = [("dmd", {}, ()), ("dmd", {"dp": 0.05}, ()), ("dmd", {"el": 1.0}, ()),
                ("fdistill", {}, ("fdistill.f_div=js",)), ("fdistill", {}, ("fdistill.f_div=kl",))]
        specs = [{"method": m, "extras": ex, "steps": 4, "seed": s, "guidance": w, "overrides": ov,
                  "tag": ov[0].split("=")[1] if ov else ""}
                 for s in data_seeds for w in GUIDANCE_SCALES for m, ex, ov in arms]
        specs += [{"method": "tfd", "seed": s} for s in data_seeds]
        if data == "grid25c":  # the separating run: dmd with the exact guided denoiser as real score
            specs += [{"method": "dmd", "steps": 4, "seed": s, "guidance": w, "tag": "exact",
                       "overrides": ("teacher_score=exact",)} for s in data_seeds for w in GUIDANCE_SCALES]
            w = GUIDANCE_SCALES[-1]
            abl = [("lam0.2", {"dp": 0.2}, ()), ("K10", {"dp": 0.05}, ("dp.anchor_k=10",)),
                   ("K20", {"dp": 0.05}, ("dp.anchor_k=20",))]
            specs += [{"method": "dmd", "extras": ex, "steps": 4, "seed": s, "guidance": w, "tag": tag,
                       "overrides": ov} for s in data_seeds for tag, ex, ov in abl]
        _students_with_evals(jobs, t, specs, repeats=_reps(data))
    return jobs


NORMALIZERS = ("sample", "batch", "none")


def normalizer_suite(seeds=(0, 1, 2), digits_seeds=None) -> list[Job]:
    """DMD's gradient normaliser (issue 20.2): ``dmd.normalizer`` per sample (DMD2) against the batch
    mean and none, 1-step dmd at the grid25 preset (10,000 iterations) on grid25 and on imbalanced10
    (a mixture file with weights 0.32 down to 0.011 and anisotropic modes, read as a user's file with
    grid25's settings: no per-file preset). Mixtures only (``digits_seeds`` is ignored)."""
    jobs: list[Job] = []
    for data in ("grid25", "imbalanced10"):
        t = teacher_job(data)
        jobs += [t, eval_job(t)]
        preset = () if data == "grid25" else ("train.batch=256", "train.eval_n=2500", "optim.lr=0.001",
                                              "fake_optim.lr=0.001", "train.ema_halflife=500")
        specs = [{"method": "dmd", "seed": s, "tag": f"norm-{n}", "iters": 10000,
                  "overrides": (*preset, f"dmd.normalizer={n}")} for s in seeds for n in NORMALIZERS]
        _students_with_evals(jobs, t, specs)
    return jobs


EMA_BASES = ("dmd", "di", "sid", "cd", "fdistill")


def ema_suite(seeds=(0, 1, 2), digits_seeds=None) -> list[Job]:
    """EMA against the raw student (issue 20.1): each 1-step base at its preset with the student EMA
    on (half-life 500 generator updates, ``train.eval_raw=true``: every evaluation scores both, on the
    same noise). grid25 first, then ring8; mixtures only (``digits_seeds`` is ignored)."""
    jobs: list[Job] = []
    for data in ("grid25", "ring8"):
        t = teacher_job(data)
        jobs += [t, eval_job(t)]
        specs = [{"method": m, "seed": s, "tag": "emaraw",
                  "overrides": ("train.ema_halflife=500", "train.eval_raw=true")}
                 for s in seeds for m in EMA_BASES]
        _students_with_evals(jobs, t, specs)
    return jobs


LATENT_BASES = ("dmd", "sid", "fdistill", "tfd")
LATENT_OBJECTIVES = ("flow", "edm")


def vae_job(data: str = "mnist28") -> Job:
    """``fewstep vae`` at its defaults (a small AutoencoderKL, 4x7x7 latents for mnist28)."""
    return Job(f"vae-{data}", ["vae", "--data", data, "--out", "{out}"], kind="vae",
               tags={"data": data, "role": "vae"})


def latent_teacher_job(vae: Job, objective: str) -> Job:
    """A teacher on ``vae``'s cached latents; its data tag names the space and the objective, so each
    teacher gets its own table and its students' names say which teacher they distil."""
    data = f"{vae.tags['data']}-vae-{objective}"
    args = ["teacher", "--data", vae.tags["data"], "--vae", f"{{root}}/{vae.name}", "--objective",
            objective, "--out", "{out}"]
    return Job(f"teacher-{data}", args, deps=[vae.name], kind="teacher",
               tags={"data": data, "conditional": False, "role": "teacher", "objective": objective})


def _dp_form(objective: str) -> dict:
    """4-step dmd+dp with DP-DMD's first-step target in the teacher's native form."""
    form = "velocity" if objective == "flow" else "x0"
    return {"method": "dmd", "extras": {"dp": 0.05}, "steps": 4, "tag": form,
            "overrides": (f"dp.target={form}",)}


# the latent suite's arms in the order they run (per seed, both teachers per arm)
LATENT_ARMS = (
    lambda o: [{"method": m} for m in LATENT_BASES],                              # 1 step
    lambda o: [{"method": "dmd", "steps": 4}, _dp_form(o)],                       # DP-DMD at 4
    lambda o: [{"method": m, "extras": {"el": 1.0}} for m in LATENT_BASES]        # + el, 1 step, and
    + [{"method": "dmd", "extras": {"el": 1.0}, "tag": "elpix", "overrides": ("el.space=pixels",)}],
    lambda o: [{"method": m, "steps": 4} for m in LATENT_BASES if m != "dmd"],    # 4 steps
    lambda o: [{"method": m, "extras": {"el": 1.0}, "steps": 4} for m in LATENT_BASES],
)


def latent_suite(seeds=(0, 1, 2), digits_seeds=None) -> list[Job]:
    """Flow vs EDM teachers of the same size in a VAE latent space (issue 17; specs/flow_and_latent.md):
    mnist28 through ``fewstep vae``; per teacher 1- and 4-step students of dmd, sid, fdistill and tfd,
    each with and without el (and 1-step dmd+el with the random networks on decoded pixels,
    ``el.space=pixels``, against the default latents), and 4-step dmd+dp (the velocity form on the
    flow teacher, x0 on EDM);
    the teacher at 35 NFE Heun and at few NFE (flow Euler on the flow teacher, DPM-Solver++ on both).
    Metrics on decoded pixels with the data and VAE floors. Jobs are listed in ``LATENT_ARMS`` order
    (per seed: the 1-step bases, dmd vs dmd+dp at 4 steps, the el arms, the other 4-step arms), each
    arm's runs on the two teachers side by side, so a partial run answers the main questions (flow vs
    EDM, method by method) first. ``digits_seeds`` is ignored."""
    vae = vae_job("mnist28")
    jobs: list[Job] = [vae]
    teachers = {o: latent_teacher_job(vae, o) for o in LATENT_OBJECTIVES}
    for o, t in teachers.items():
        jobs += [t, eval_job(t), eval_job(t, nfe=4, sampler="dpmpp"), eval_job(t, nfe=8, sampler="dpmpp")]
        if o == "flow":  # the "what a user would do instead" rows of a flow teacher
            jobs += [eval_job(t, nfe=n, sampler="flow_euler") for n in (4, 8, 35)]
    for s in seeds:
        for i, arm in enumerate(LATENT_ARMS):
            made: dict[str, list[Job]] = {o: [] for o in teachers}
            for pair in zip(*(arm(o) for o in teachers)):  # the two teachers' arms side by side
                for (o, t), spec in zip(teachers.items(), pair):
                    made[o] += _students_with_evals(jobs, t, [{**spec, "seed": s}], repeats=3)
            if i == 0 and s == seeds[0]:  # speed: students vs the teacher, methods vs dmd
                jobs += [perf_job(t, made[o], ["dmd", "dmd+el", "sid", "fdistill", "tfd", "dmd@4",
                                               "dmd+dp@4"], name=f"perf-latent-{t.tags['data']}")
                         for o, t in teachers.items()]
    return jobs


TEXT_SCALES = (1.0, 3.0)


def text_suite(seeds=(0, 1, 2), digits_seeds=None) -> list[Job]:
    """Text-to-image distillation (issue 19, docs/text.md): the mnist28 VAE, a text teacher
    (``fewstep teacher --text``, preset teacher_text) evaluated at w = 1 and 3 on its 60 training
    prompts; per seed 4-step dmd and dmd+dp at each w (DP-DMD's Table in miniature: per-prompt
    diversity at equal quality), and 4-step dmd+el, tfd and fdistill at w = 1. Students distil on the
    teacher's own prompts (no --prompts). ``digits_seeds`` is ignored."""
    vae = vae_job("mnist28")
    args = ["teacher", "--data", "mnist28", "--text", "--vae", f"{{root}}/{vae.name}", "--out", "{out}"]
    t = Job("teacher-mnist28-text", args, deps=[vae.name], kind="teacher",
            tags={"data": "mnist28-text", "conditional": True, "role": "teacher"})
    jobs = [vae, t] + [eval_job(t, guidance=w) for w in TEXT_SCALES]
    specs = [{"method": "dmd", "extras": ex, "steps": 4, "seed": s, "guidance": w}
             for s in seeds for w in TEXT_SCALES for ex in ({}, {"dp": 0.05})]
    specs += [{"method": m, "extras": ex, "steps": 4, "seed": s}
              for s in seeds for m, ex in (("dmd", {"el": 1.0}), ("tfd", {}), ("fdistill", {}))]
    _students_with_evals(jobs, t, specs)
    return jobs


LORA_ARMS = (("full", ()), ("lora8", ("student.lora_rank=8",)),
             ("lora8-both", ("student.lora_rank=8", "fake.lora_rank=8")))


def lora_suite(seeds=(0, 1, 2), digits_seeds=None) -> list[Job]:
    """LoRA against full fine-tuning (issue 21): 1-step dmd at the digits8 preset on a 2000-iteration
    digits8 teacher (the fdistill suite's), full student and fake score, a rank-8 LoRA student, and
    rank-8 LoRA student and fake score; every arm the same iterations, batch and learning rates."""
    jobs: list[Job] = []
    t = teacher_job("digits8", iters=2000)
    jobs += [t, eval_job(t)]
    for s in _seeds_for("digits8", seeds, digits_seeds):
        _students_with_evals(jobs, t, [{"method": "dmd", "seed": s, "tag": tag, "overrides": ov}
                                       for tag, ov in LORA_ARMS], repeats=3)
    return jobs


SUITES = {"smoke": smoke, "demo": demo, "quick": quick, "full": full, "el": el_suite, "dp": dp_suite,
          "tfd": tfd_suite, "fdistill": fdistill_suite, "guidance": guidance_suite,
          "normalizer": normalizer_suite, "ema": ema_suite,
          "latent": latent_suite, "lora": lora_suite,
          "text": text_suite}
