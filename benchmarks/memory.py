"""The memory model of a distillation run against measured peak memory (docs/scaling.md, issue 21).

    python benchmarks/memory.py --teacher runs/bench/teacher-digits8-i2000 --method dmd --batches 16 64
    python benchmarks/memory.py --teacher T --method dmd --batches 16 64 train.teacher_dtype=bf16

Each batch size runs in a fresh process: it builds the run (teacher, student, fake score, EMA,
data) and trains whole update cycles, reading the process's peak resident memory (``ru_maxrss``)
after the imports, after building, and at the end. The model it is checked against:

* built: ``data + b_t P_t + 4 (P_s + P_f + P_ema + P_target)`` — the teacher's weights at ``b_t`` bytes
  per parameter (4 fp32, 2 with ``train.teacher_dtype=bf16``), student / fake score / EMA in fp32;
* training adds ``12 (P_s + P_f)`` (fp32 gradients and AdamW's two moments), ``4 max(P_s, P_f)``
  (the multi-tensor AdamW step's temporary denominators, one optimiser at a time) and ``A`` bytes
  of activations per sample (the slope between the two batch sizes). Here P counts the *trained*
  parameters: for LoRA networks (``student.lora_rank``, ``fake.lora_rank``) the adapters only.

Prints one JSON object: parameter counts, the model's figures and the measured ones (MiB).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

MIB = 2**20


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _params(m, trainable_only: bool = False) -> int:
    return 0 if m is None else sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)


def _import_what_build_run_imports() -> None:
    """Load the libraries the run imports lazily (diffusers' UNet, the metrics), so that the baseline
    holds their code and the differences hold tensors."""
    import diffusers.models.unets.unet_2d  # noqa: F401
    import safetensors.torch  # noqa: F401
    import sklearn.datasets  # noqa: F401

    import fewstep.metrics  # noqa: F401
    from fewstep.models import unet  # noqa: F401


def measure(teacher: str, method: str, batch: int, overrides: list[str], cycles: int) -> dict:
    """One process: peak RSS after imports, after build_run, after ``cycles`` update cycles."""
    import torch

    from fewstep.recipe import distill_config
    from fewstep.train.distill import build_run, setup_methods, train_iteration

    torch.set_num_threads(1)
    _import_what_build_run_imports()
    cfg = distill_config(teacher, method, overrides=[f"train.batch={batch}", *overrides])
    base = _maxrss()
    run = build_run(cfg, torch.device("cpu"))
    setup_methods(run)
    built = _maxrss()
    for _ in range(cycles * cfg.schedule.ratio):
        train_iteration(run)
    nets, data = run.nets, run.data
    from fewstep.train.phases import GEN, set_trainable

    set_trainable(run, GEN)  # read the trainable sets: the student's here, the critic's below
    p_s_train = _params(nets.student, True)
    set_trainable(run, "critic")
    p_f_train = _params(nets.fake, True)
    t_bytes = next(nets.teacher.parameters()).element_size()
    data_bytes = sum(t.numel() * t.element_size() for t in (data.x_train, data.x_test) if t is not None)
    return {"batch": batch, "base": base, "built": built, "peak": _maxrss(), "data_bytes": data_bytes,
            "P_teacher": _params(nets.teacher), "teacher_bytes_per_param": t_bytes,
            "P_student": _params(nets.student), "P_fake": _params(nets.fake),
            "P_ema": _params(run.ema), "P_target": _params(nets.target),
            "P_student_trained": p_s_train, "P_fake_trained": p_f_train}


def model(m: dict) -> dict:
    """The written model's built and training-added bytes (activations excluded)."""
    weights = 4 * (m["P_student"] + m["P_fake"] + m["P_ema"] + m["P_target"])
    return {"built": m["data_bytes"] + m["teacher_bytes_per_param"] * m["P_teacher"] + weights,
            "train_static": 12 * (m["P_student_trained"] + m["P_fake_trained"])
            + 4 * max(m["P_student_trained"], m["P_fake_trained"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--method", default="dmd")
    ap.add_argument("--batches", type=int, nargs=2, default=[16, 64])
    ap.add_argument("--cycles", type=int, default=2, help="update cycles per measurement")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # the child process
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.teacher, a.method, a.one, a.overrides, a.cycles)))
        return
    runs = []
    for b in a.batches:
        out = subprocess.run([sys.executable, __file__, "--teacher", a.teacher, "--method", a.method,
                              "--cycles", str(a.cycles), "--one", str(b), *a.overrides],
                             check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    lo, hi = runs
    pred = model(lo)
    added = [r["peak"] - r["built"] for r in runs]
    per_sample = (added[1] - added[0]) / (hi["batch"] - lo["batch"])
    result = {
        "teacher": a.teacher, "method": a.method, "overrides": a.overrides,
        "params": {k: lo[k] for k in ("P_teacher", "P_student", "P_fake", "P_ema", "P_target",
                                      "P_student_trained", "P_fake_trained")},
        "model_built_mib": pred["built"] / MIB,
        "measured_built_mib": [(r["built"] - r["base"]) / MIB for r in runs],
        "model_train_static_mib": pred["train_static"] / MIB,
        "measured_train_static_mib": (added[0] - lo["batch"] * per_sample) / MIB,
        "activations_kib_per_sample": per_sample / 1024,
        "measured_peak_over_base_mib": {r["batch"]: (r["peak"] - r["base"]) / MIB for r in runs},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
