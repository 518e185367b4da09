"""What ``fewstep bench`` and ``fewstep demo`` do: build a suite's jobs, run them, write reports."""

from __future__ import annotations

import inspect
from pathlib import Path

from fewstep.errors import FewstepError


def suite_jobs(suite: str, seeds: int, digits_seeds: int) -> list:
    """The jobs of ``suite`` with ``seeds`` training seeds per arm (``digits_seeds`` for digits8 arms;
    0 drops digits8 altogether: its teacher, evaluations and perf jobs)."""
    from fewstep.bench.suites import SUITES

    build = SUITES[suite]
    params = inspect.signature(build).parameters
    kwargs = {"seeds": tuple(range(seeds))} if "seeds" in params else {}
    if "digits_seeds" in params:
        kwargs["digits_seeds"] = tuple(range(digits_seeds))
    job_list = build(**kwargs)
    if digits_seeds == 0:
        job_list = [j for j in job_list if not str(j.tags.get("data", "")).startswith("digits8")]
    return job_list


def run_suite(suite: str, root: Path, jobs: int = 2, threads: int = 1, seeds: int = 3,
              digits_seeds: int | None = None, progress: bool = True,
              report_only: bool = False) -> tuple[int, int, str]:
    """Run suite ``suite`` into ``root`` (cached and resumable); returns ``(done, total, summary)``.
    ``report_only``: report the jobs finished so far, start none."""
    from fewstep.bench.claims import write_claims
    from fewstep.bench.report import write_bench_report
    from fewstep.bench.runner import job_record, run_jobs
    from fewstep.bench.suites import SUITES
    from fewstep.train.rundir import ensure_writable_dir

    if suite not in SUITES:
        raise FewstepError(f"unknown suite '{suite}'; choose one of {', '.join(SUITES)}")
    if jobs < 1 or threads < 1:
        raise FewstepError("--jobs and --threads must be at least 1")
    digits_seeds = seeds if digits_seeds is None else digits_seeds
    if seeds < 1 or digits_seeds < 0:
        raise FewstepError(f"--seeds must be at least 1 and --digits-seeds at least 0, got {seeds} "
                           f"and {digits_seeds}")
    ensure_writable_dir(root)
    job_list = suite_jobs(suite, seeds, digits_seeds)
    if report_only:
        records = [r for j in job_list if (r := job_record(root, j))]
    else:
        records = run_jobs(job_list, root, parallel=jobs, threads=threads, progress=progress)
    md, page = write_bench_report(suite, job_list, records, root)
    command = f"fewstep bench --suite {suite} --out {root} --seeds {seeds}" + \
        (f" --digits-seeds {digits_seeds}" if digits_seeds != seeds else "")
    claims = write_claims(suite, job_list, root, command) if suite in ("el", "dp", "tfd") else None
    summary = (f"{len(records)}/{len(job_list)} jobs done; report: {md} and {page}"
               + (f"; claims: {claims}" if claims else ""))
    return len(records), len(job_list), summary


def run_demo(root: Path, jobs: int = 2, progress: bool = True) -> tuple[int, int, str]:
    """The whole story on the default data: the ``demo`` suite, then a report with pictures."""
    from fewstep.bench.report import write_bench_report
    from fewstep.bench.runner import run_jobs
    from fewstep.bench.suites import demo
    from fewstep.report.report import write_report
    from fewstep.train.rundir import ensure_writable_dir

    ensure_writable_dir(root)
    job_list = demo()
    records = run_jobs(job_list, root, parallel=jobs, threads=1, progress=progress)
    done = {r["name"] for r in records}
    write_bench_report("demo", job_list, records, root)
    runs = [root / j.name for j in job_list if j.kind in ("teacher", "distill") and j.name in done]
    _, page = write_report(runs, root / "report", title="fewstep demo")
    summary = (f"{len(records)}/{len(job_list)} demo jobs done in {sum(r['wall_s'] for r in records):.0f} s "
               f"of process time; tables: {root / 'bench-demo.md'}; report with pictures: {page}")
    return len(records), len(job_list), summary
