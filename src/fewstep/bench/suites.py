"""The benchmark matrix (BENCHMARKS.md "Suites") and the claim experiments, as job lists.

Budgets are per data set; every arm of a comparison gets the same budget. The defaults of each
method come from its ``DEFAULTS`` and the data set's presets (``configs/distill_<data>.yaml``); a
suite only sets what the comparison varies (method, extras, steps, seed, batch, budget).
"""

from __future__ import annotations

from fewstep.bench.runner import Job

MIXTURES = ("ring8", "grid25")
BASES_1STEP = ("dmd", "di", "sid", "cd", "tfd")


def teacher_job(data: str, iters: int | None = None, conditional: bool = False, name: str = "") -> Job:
    args = ["teacher", "--data", data, "--out", "{out}"]
    if iters:
        args += ["--iters", str(iters)]
    if conditional:
        args += ["data.conditional=true"]
    return Job(name or f"teacher-{data}{'-cond' if conditional else ''}", args, kind="teacher",
               tags={"data": data, "conditional": conditional, "role": "teacher"})


def distill_job(teacher: Job, method: str, extras: dict | None = None, steps: int = 1, seed: int = 0,
                iters: int | None = None, batch: int | None = None, overrides: tuple = (),
                tag: str = "", eval_every: int | None = None) -> Job:
    extras = extras or {}
    ex = "".join(f"+{k}{v:g}" for k, v in extras.items())
    name = f"{teacher.tags['data']}{'-cond' if teacher.tags['conditional'] else ''}-{method}{ex}" \
           f"-k{steps}{'-' + tag if tag else ''}-s{seed}"
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
    if steps > 1:
        args += ["student.renoise=ddim"]  # deterministic chain: DP-DMD and its DMD baseline (dp_dmd.md 4)
    args += list(overrides)
    tags = {"data": teacher.tags["data"], "conditional": teacher.tags["conditional"], "method": method,
            "extras": extras, "steps": steps, "seed": seed, "tag": tag, "role": "student",
            "batch": batch, "overrides": list(overrides)}
    return Job(name, args, deps=[teacher.name], kind="distill", tags=tags)


def eval_job(model: Job, nfe: int | None = None, sampler: str = "heun", n: int | None = None,
             fid: bool = False) -> Job:
    name = f"eval-{model.name}" + (f"-{sampler}{nfe}" if nfe else "")
    args = ["eval", f"{{root}}/{model.name}", "--json", "{out}/eval.json", "--sampler", sampler]
    if nfe:
        args += ["--nfe", str(nfe)]
    if n:
        args += ["--n", str(n)]
    if fid:
        args += ["--fid"]
    tags = {**model.tags, "model": model.name, "sampler": sampler if model.kind == "teacher" else "student",
            "nfe": nfe or (model.tags.get("steps") if model.kind == "distill" else 35)}
    return Job(name, args, deps=[model.name], kind="eval", tags=tags)


def _students_with_evals(jobs: list[Job], teacher: Job, specs: list[dict], n: int | None = None):
    for spec in specs:
        d = distill_job(teacher, **spec)
        jobs += [d, eval_job(d, n=n)]


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
    _students_with_evals(jobs, t_ring, specs, n=1000)
    jobs.append(eval_job(t_dig, nfe=7, n=300))
    _students_with_evals(jobs, t_dig, [{"method": "dmd", "iters": 40, "batch": 32},
                                       {"method": "dmd", "extras": {"el": 1.0}, "iters": 40,
                                        "batch": 32}], n=300)
    return jobs


def full(seeds=(0, 1, 2)) -> list[Job]:
    """BENCHMARKS.md's full matrix at CPU budgets: mixtures with 3 seeds, digits8 with one."""
    jobs: list[Job] = []
    for data in MIXTURES:
        t = teacher_job(data)
        jobs += [t] + teacher_sweep(t)
        specs = [{"method": m, "extras": ex, "seed": s} for s in seeds for m in BASES_1STEP
                 for ex in ({}, {"el": 1.0})]
        specs += [{"method": "dmd", "extras": ex, "steps": 4, "seed": s} for s in seeds
                  for ex in ({}, {"dp": 0.05})]
        _students_with_evals(jobs, t, specs)
    for cond in (False, True):
        t = teacher_job("digits8", conditional=cond)
        jobs += [t] + teacher_sweep(t, heun_steps=(1, 4, 18), dpm_nfe=(4, 10))
        specs = [{"method": m, "extras": ex} for m in ("dmd", "tfd") for ex in ({}, {"el": 1.0})]
        specs += [{"method": "dmd", "extras": ex, "steps": 4} for ex in ({}, {"dp": 0.05})]
        _students_with_evals(jobs, t, specs)
    return jobs


SUITES = {"quick": quick, "full": full}
