"""Run benchmark jobs as subprocesses: cached, resumable, timed, with peak memory per job.

Each job is one ``fewstep`` command writing into its own directory. A job that finished writes
``_jobs/<name>.json`` (command, wall time, peak RSS, exit code; log: ``_jobs/<name>.log``); re-
running a suite skips those and lets interrupted training runs resume from their checkpoints. Jobs
run ``--jobs`` at a time, each with ``FEWSTEP_THREADS`` threads (one thread per process is fastest
on a small shared CPU).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from fewstep.errors import FewstepError


@dataclass
class Job:
    name: str                     # unique within the suite; also the directory under out/
    args: list[str]               # fewstep CLI arguments ({out} and {root} are substituted)
    deps: list[str] = field(default_factory=list)  # names of jobs that must finish first
    kind: str = "run"             # teacher | distill | eval | perf (for reports)
    tags: dict = field(default_factory=dict)       # data, method, extras, seed, ... for tables

    def command(self, root: Path) -> list[str]:
        return [a.format(out=root / self.name, root=root) for a in self.args]


def job_record(root: Path, job: Job) -> dict | None:
    path = root / "_jobs" / f"{job.name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _run_one(job: Job, root: Path, threads: int) -> subprocess.Popen:
    (root / "_jobs").mkdir(parents=True, exist_ok=True)
    if job.kind in ("eval", "perf"):
        (root / job.name).mkdir(exist_ok=True)
    env = {**os.environ, "FEWSTEP_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    log = open(root / "_jobs" / f"{job.name}.log", "a")
    cmd = [sys.executable, "-m", "fewstep", *job.command(root), "--no-progress"] \
        if job.kind in ("teacher", "distill") else [sys.executable, "-m", "fewstep", *job.command(root)]
    log.write(f"$ {shlex.join(cmd[2:])}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.fewstep = (job, time.perf_counter(), cmd, log)  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, status: int, rusage, root: Path) -> dict:
    job, t0, cmd, log = proc.fewstep  # type: ignore[attr-defined]
    log.close()
    rec = {"name": job.name, "command": "fewstep " + shlex.join(cmd[3:]), "kind": job.kind,
           "tags": job.tags, "wall_s": round(time.perf_counter() - t0, 2),
           "peak_rss_mb": round(rusage.ru_maxrss / 1024, 1), "exit_code": os.waitstatus_to_exitcode(status)}
    if rec["exit_code"] == 0:
        (root / "_jobs" / f"{job.name}.json").write_text(json.dumps(rec, indent=2) + "\n")
    _lock_path(root, job).unlink(missing_ok=True)  # after the record: others then see it done
    return rec


def run_jobs(jobs: list[Job], root: Path, parallel: int = 2, threads: int = 1,
             progress: bool = True) -> list[dict]:
    """Run every job not yet done, respecting dependencies; returns all job records."""
    names = {j.name for j in jobs}
    for j in jobs:
        missing = [d for d in j.deps if d not in names]
        if missing:
            raise FewstepError(f"benchmark job {j.name} depends on unknown job(s) {missing}")
    todo = [j for j in jobs if job_record(root, j) is None]
    failed: set[str] = set()
    running: dict[int, subprocess.Popen] = {}
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="bench", disable=not progress)
    while todo or running:
        for j in [j for j in todo if job_record(root, j)]:  # finished by another runner meanwhile
            todo.remove(j)
            bar.update(1)
        ready = [j for j in todo if all(job_record(root, _by(jobs, d)) for d in j.deps)]
        blocked = [j for j in todo if any(d in failed for d in j.deps)]
        for j in blocked:
            todo.remove(j)
            failed.add(j.name)
            bar.write(f"skipped {j.name}: a dependency failed")
        while ready and len(running) < parallel:
            j = ready.pop(0)
            if not _lock(root, j):  # another runner on this --out directory has it
                continue
            todo.remove(j)
            p = _run_one(j, root, threads)
            running[p.pid] = p
        if not running:
            elsewhere = [j for j in jobs if _locked_elsewhere(root, j)]
            if todo and not elsewhere:
                raise FewstepError(f"benchmark jobs {[j.name for j in todo]} cannot start")
            if todo:
                time.sleep(5)  # waiting for jobs another runner on this directory is doing
            continue
        pid, status, rusage = os.wait4(-1, 0)
        if pid not in running:
            continue
        rec = _finish(running.pop(pid), status, rusage, root)
        bar.update(1)
        if rec["exit_code"] != 0:
            failed.add(rec["name"])
            bar.write(f"FAILED {rec['name']} (exit {rec['exit_code']}); see {root}/_jobs/{rec['name']}.log")
        else:
            bar.set_postfix_str(rec["name"])
    bar.close()
    return [r for j in jobs if (r := job_record(root, j))]


def _lock_path(root: Path, job: Job) -> Path:
    return root / "_jobs" / f"{job.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _locked_elsewhere(root: Path, job: Job) -> bool:
    path = _lock_path(root, job)
    try:
        pid = int(path.read_text() or 0)
    except (OSError, ValueError):
        return False
    return pid != os.getpid() and _alive(pid)


def _lock(root: Path, job: Job) -> bool:
    """Claim a job for this runner (``_jobs/<name>.lock`` holds its pid), so two ``fewstep bench``
    processes sharing an --out directory never train into the same run; stale locks are taken over."""
    (root / "_jobs").mkdir(parents=True, exist_ok=True)
    path = _lock_path(root, job)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _locked_elsewhere(root, job):
                return False
            path.unlink(missing_ok=True)  # stale: its runner is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _by(jobs: list[Job], name: str) -> Job:
    return next(j for j in jobs if j.name == name)
