"""The ``fewstep`` command. User mistakes print one ``error:`` line and exit with code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fewstep.errors import FewstepError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (plus a pointer to --help), exit code 2."""

    def error(self, message):
        if message.startswith("unrecognized arguments") and "=" in message:
            message += "; put key=value overrides after all --options"
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


EXAMPLES = """examples:
  fewstep teacher --data ring8 --out runs/t
  fewstep distill --teacher runs/t --method dmd --extra el=1 --out runs/s
  fewstep distill --teacher runs/t --method dmd --extra dp=0.05 --steps 4 --out runs/s4
  fewstep eval runs/s --json metrics.json        fewstep sample runs/s --n 2000 --out s.png
  fewstep bench --suite quick --out runs/bench   torchrun --nproc_per_node 2 -m fewstep distill ...
Every config key can be overridden as key=value after the options; --dry-run prints them all."""


def _common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (created; resumed if interrupted)")
    p.add_argument("--iters", type=int, help="training iterations (train.iters)")
    p.add_argument("--seed", type=int, help="run seed (train.seed)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="train.device")
    p.add_argument("--preset", help="preset name in fewstep/configs or a YAML path")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.batch=256 optim.lr=2e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fewstep", description="Distil a diffusion teacher into a 1-4 step "
                     "student with diversity-preserving objectives.",
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("teacher", help="train an EDM teacher on a data set")
    p.add_argument("--data", required=True, help="ring8 | grid25 | digits8 | path to data")
    _common_run_args(p)

    p = sub.add_parser("distill", help="distil a teacher into a k-step student")
    p.add_argument("--teacher", required=True, help="teacher directory (fewstep run or diffusers)")
    p.add_argument("--method", required=True, help="base method: dmd | di | sid | cd | tfd | drift")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=WEIGHT",
                   help="extra term with its weight, e.g. --extra el=0.5 --extra dp=0.05")
    p.add_argument("--steps", type=int, help="student steps k (student.steps)")
    p.add_argument("--eval-every", type=int, help="in-training evaluation period (train.eval_every)")
    p.add_argument("--batch", type=int, help="global batch size (train.batch)")
    _common_run_args(p)

    p = sub.add_parser("sample", help="draw samples from a teacher or student")
    p.add_argument("model", help="run directory or diffusers directory")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--nfe", type=int, help="network evaluations (teachers; default: model's)")
    p.add_argument("--sampler", choices=["heun", "euler", "dpmpp"], default="heun",
                   help="heun / euler (Karras grid) or dpmpp (diffusers DPM-Solver++ 2M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="FILE.png (grid or 2-D scatter) or FILE.npz")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])

    p = sub.add_parser("eval", help="metrics of a teacher (at any NFE) or a student")
    p.add_argument("model", help="run directory or diffusers directory")
    p.add_argument("--n", type=int, help="samples (default: 2500 mixtures, test-split size images)")
    p.add_argument("--nfe", type=int, help="network evaluations (teachers; default: model's)")
    p.add_argument("--sampler", choices=["heun", "euler", "dpmpp"], default="heun",
                   help="heun / euler (Karras grid) or dpmpp (diffusers DPM-Solver++ 2M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="data set to compare with (default: the model's training data)")
    p.add_argument("--fid", action="store_true", help="also compute Inception FID (images; slow)")
    p.add_argument("--repeats", type=int, default=1,
                   help="average over this many generated sets (reports <metric>_std too)")
    p.add_argument("--json", help="write the metrics as JSON to this file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])

    p = sub.add_parser("bench", help="run a benchmark suite (cached, resumable) and report it")
    p.add_argument("--suite", required=True, help="quick | full | el | dp | tfd")
    p.add_argument("--out", required=True, help="suite directory (re-run to resume)")
    p.add_argument("--jobs", type=int, default=2, help="processes at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds per arm, ablations included (claim and full suites)")
    p.add_argument("--digits-seeds", type=int, default=None,
                   help="seeds per digits8 arm in the claim suites (default: --seeds; each digits8 "
                        "seed costs el ~55 min, dp ~20 min, tfd ~20 min of process time)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("demo", help="the whole story on ring8 (+ a digits8 teacher) in ~10 minutes")
    p.add_argument("--out", default="runs/demo", help="demo directory (re-run to resume)")
    p.add_argument("--jobs", type=int, default=2, help="processes at a time")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("perf", help="sampling and training speed as ratios, measured in one process")
    p.add_argument("--teacher", required=True, help="teacher directory")
    p.add_argument("--students", nargs="*", default=[], help="student directories")
    p.add_argument("--methods", nargs="*", default=["dmd"],
                   help="method specs to time, e.g. dmd dmd+el dmd+dp@4 di sid cd tfd")
    p.add_argument("--batch", type=int, help="training batch for the timing (default: presets)")
    p.add_argument("--json", required=True, help="output JSON file")

    p = sub.add_parser("report", help="Markdown + HTML report of one or more runs")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--title", default="fewstep report")

    p = sub.add_parser("featnet", help="retrain a feature network (digits8 or mnist28 metric space)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="digits8", help="digits8 (default) | mnist28")
    p.add_argument("--epochs", type=int, help="training epochs (default: the data set's recipe)")

    p = sub.add_parser("vae", help="train a small diffusers AutoencoderKL for latent teachers")
    p.add_argument("--data", required=True, help="image data set: mnist28 | digits8 | path")
    p.add_argument("--out", required=True, help="output folder (save_pretrained + fewstep_vae.json)")
    p.add_argument("--iters", type=int, help="training steps (default 2000)")
    p.add_argument("--batch", type=int, help="batch size (default 32)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--channels", help="block widths, comma separated (default 16,32,32: 28x28 -> 7x7)")
    p.add_argument("--latent-channels", type=int, help="latent channels (default 4)")
    p.add_argument("--norm-groups", type=int, help="GroupNorm groups (default 8)")
    p.add_argument("--kl-weight", type=float, help="weight of the per-element KL (default 1e-3)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    p.add_argument("--skip-metrics", action="store_true",
                   help="skip the reconstruction metrics and VAE floors (a feature-network pass)")
    return parser


def _resolve_teacher_config(args):
    from fewstep.config import PRESET_DIR, TeacherRunConfig, load_preset, resolve

    preset = args.preset or (f"teacher_{args.data}" if (PRESET_DIR / f"teacher_{args.data}.yaml")
                             .exists() else "teacher_default")
    overrides = [f"data.name={args.data}", *args.overrides]
    for flag, key in (("iters", "train.iters"), ("seed", "train.seed"), ("device", "train.device")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    cfg = resolve(TeacherRunConfig, load_preset(preset), overrides)
    cfg.data.name = args.data  # keep paths verbatim (YAML parsing could mangle them)
    return cfg


def _train(args, cfg, what: str) -> int:
    """Shared by ``teacher`` and ``distill``: --dry-run, or train with in-loop evaluation."""
    from fewstep.config import dump_yaml

    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    from fewstep.train.evaluate import in_training_evaluator

    if what == "teacher":
        from fewstep.train.teacher import train_teacher as train
    else:
        from fewstep.train.distill import train_distill as train
    out = train(cfg, Path(args.out), evaluate=in_training_evaluator(cfg), progress=not args.no_progress)
    if not _rank_prefix():
        print(f"{what} written to {out}")
    return 0


def cmd_teacher(args) -> int:
    return _train(args, _resolve_teacher_config(args), "teacher")


def _parse_extras(items: list[str]) -> dict:
    extras = {}
    for item in items:
        name, _, weight = item.partition("=")
        try:
            extras[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise FewstepError(f"--extra {item}: the weight must be a number, "
                               "e.g. --extra el=0.5") from None
    return extras


def _teacher_data_name(teacher: str) -> str:
    from fewstep.models.io import read_model_json

    try:
        return read_model_json(teacher)[1].get("data", {}).get("name", "")
    except FewstepError:
        return ""


def _resolve_distill_config(args):
    from fewstep.config import PRESET_DIR, DistillRunConfig, load_preset, resolve
    from fewstep.losses import BASES

    if args.method not in BASES:
        raise FewstepError(f"unknown method '{args.method}'; choose one of {', '.join(BASES)}")
    data = _teacher_data_name(args.teacher)
    base = {k: dict(v) for k, v in BASES[args.method][2].items()}
    presets = [args.preset] if args.preset else [
        p for p in ("distill_default", f"distill_{data}", f"distill_{data}_{args.method}")
        if (PRESET_DIR / f"{p}.yaml").exists()]
    for name in presets:
        for key, value in load_preset(name).items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    overrides = [f"teacher={args.teacher}", f"method={args.method}"]
    extras = _parse_extras(args.extra)
    overrides += [f"extras.{k}={v}" for k, v in extras.items()]
    if "dp" in extras and not any(o.startswith("student.renoise=") for o in args.overrides):
        overrides.append("student.renoise=ddim")  # DP-DMD trains (and so samples) a deterministic chain
    for flag, key in (("iters", "train.iters"), ("seed", "train.seed"), ("device", "train.device"),
                      ("steps", "student.steps"), ("eval_every", "train.eval_every"),
                      ("batch", "train.batch")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    cfg = resolve(DistillRunConfig, base, overrides + list(args.overrides))
    cfg.teacher = args.teacher
    return cfg


def cmd_distill(args) -> int:
    return _train(args, _resolve_distill_config(args), "student")


def cmd_sample(args) -> int:
    from fewstep.train.device import resolve_device
    from fewstep.train.generate import load_generator

    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise FewstepError(f"--out must end in .png or .npz, got '{out.name}'")
    if args.n <= 0:
        raise FewstepError(f"--n must be positive, got {args.n}")
    device = resolve_device(args.device)
    gen = load_generator(args.model, device)
    x, y = gen.sample(args.n, seed=args.seed, nfe=args.nfe, sampler=args.sampler, device=device)
    from fewstep.report.pictures import save_samples

    save_samples(out, x, y, gen)
    print(f"{args.n} samples ({gen.nfe(args.nfe, args.sampler)} NFE) written to {out}")
    return 0


def cmd_eval(args) -> int:
    from fewstep.train.evaluate import evaluate_model, format_table

    metrics = evaluate_model(args.model, n=args.n, nfe=args.nfe, sampler=args.sampler,
                             seed=args.seed, data=args.data, fid=args.fid, device=args.device,
                             repeats=args.repeats)
    print(format_table(metrics))
    if args.json:
        from fewstep.train.rundir import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(metrics, indent=2) + "\n")
    return 0


def cmd_bench(args) -> int:
    from fewstep.bench.report import write_bench_report
    from fewstep.bench.runner import run_jobs
    from fewstep.bench.suites import SUITES

    if args.suite not in SUITES:
        raise FewstepError(f"unknown suite '{args.suite}'; choose one of {', '.join(SUITES)}")
    if args.jobs < 1 or args.threads < 1:
        raise FewstepError("--jobs and --threads must be at least 1")
    from fewstep.train.rundir import ensure_writable_dir

    digits_seeds = args.seeds if args.digits_seeds is None else args.digits_seeds
    if args.seeds < 1 or digits_seeds < 1:
        raise FewstepError(f"--seeds and --digits-seeds must be at least 1, got {args.seeds} and "
                           f"{digits_seeds}")
    root = Path(args.out)
    ensure_writable_dir(root)
    build = SUITES[args.suite]
    params = build.__code__.co_varnames[:build.__code__.co_argcount]
    kwargs = {"seeds": tuple(range(args.seeds))} if "seeds" in params else {}
    if "digits_seeds" in params:
        kwargs["digits_seeds"] = tuple(range(digits_seeds))
    jobs = build(**kwargs)
    records = run_jobs(jobs, root, parallel=args.jobs, threads=args.threads,
                       progress=not args.no_progress)
    md, page = write_bench_report(args.suite, jobs, records, root)
    from fewstep.bench.claims import write_claims

    command = f"fewstep bench --suite {args.suite} --out {root} --seeds {args.seeds}" + \
        (f" --digits-seeds {digits_seeds}" if digits_seeds != args.seeds else "")
    claims = write_claims(args.suite, jobs, root, command) if args.suite in ("el", "dp", "tfd") else None
    print(f"{len(records)}/{len(jobs)} jobs done; report: {md} and {page}"
          + (f"; claims: {claims}" if claims else ""))
    return 0 if len(records) == len(jobs) else 1


def cmd_demo(args) -> int:
    """The whole story on the default data: the ``demo`` suite, then a report with pictures."""
    from fewstep.bench.report import write_bench_report
    from fewstep.bench.runner import run_jobs
    from fewstep.bench.suites import demo
    from fewstep.report.report import write_report
    from fewstep.train.rundir import ensure_writable_dir

    root = Path(args.out)
    ensure_writable_dir(root)
    jobs = demo()
    records = run_jobs(jobs, root, parallel=args.jobs, threads=1, progress=not args.no_progress)
    done = {r["name"] for r in records}
    write_bench_report("demo", jobs, records, root)
    runs = [root / j.name for j in jobs if j.kind in ("teacher", "distill") and j.name in done]
    md, page = write_report(runs, root / "report", title="fewstep demo")
    print(f"{len(records)}/{len(jobs)} demo jobs done in {sum(r['wall_s'] for r in records):.0f} s of "
          f"process time; tables: {root / 'bench-demo.md'}; report with pictures: {page}")
    return 0 if len(records) == len(jobs) else 1


def cmd_perf(args) -> int:
    from fewstep.bench.perf import perf_report
    from fewstep.train.rundir import atomic_write_text

    result = perf_report(args.teacher, args.students, args.methods, args.batch)
    atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def cmd_report(args) -> int:
    from fewstep.report.report import write_report

    for r in args.runs:
        if not Path(r).is_dir():
            raise FewstepError(f"{r} is not a directory; pass run directories made by fewstep")
    md, page = write_report([Path(r) for r in args.runs], Path(args.out), args.title)
    print(f"report written to {md} and {page}")
    return 0


def cmd_featnet(args) -> int:
    from fewstep.train.featnet import train_featnet

    result = train_featnet(Path(args.out), seed=args.seed, epochs=args.epochs, data=args.data)
    print(json.dumps(result))
    return 0


def cmd_vae(args) -> int:
    from fewstep.train.vae import VAETrainConfig, train_vae

    cfg = VAETrainConfig(data=args.data)
    for flag, key in (("iters", "iters"), ("batch", "batch"), ("seed", "seed"), ("lr", "lr"),
                      ("latent_channels", "latent_channels"), ("norm_groups", "norm_num_groups"),
                      ("kl_weight", "kl_weight")):
        if getattr(args, flag) is not None:
            setattr(cfg, key, getattr(args, flag))
    if args.channels:
        try:
            cfg.channels = [int(c) for c in args.channels.split(",")]
        except ValueError:
            raise FewstepError(f"--channels {args.channels}: give integers separated by commas, e.g. "
                               "32,64,64") from None
    if cfg.iters < 1 or cfg.batch < 1:
        raise FewstepError("--iters and --batch must be at least 1")
    meta = train_vae(cfg, Path(args.out), measure=not args.skip_metrics)
    print(json.dumps({k: meta.get(k) for k in ("latent_shape", "scaling_factor", "test_l1", "fd_floor",
                                               "fd_vae_floor", "fd_vae_recon", "train_seconds")}))
    return 0


COMMANDS = {"teacher": cmd_teacher, "distill": cmd_distill, "sample": cmd_sample, "eval": cmd_eval,
            "report": cmd_report, "featnet": cmd_featnet, "vae": cmd_vae, "bench": cmd_bench,
            "perf": cmd_perf, "demo": cmd_demo}


def _set_threads() -> None:
    """``FEWSTEP_THREADS=N`` fixes torch's intra-op threads. On a busy 2-core machine one thread is
    often several times faster for small networks (OpenMP workers spin while waiting)."""
    n = os.environ.get("FEWSTEP_THREADS")
    if n:
        import torch

        torch.set_num_threads(max(1, int(n)))


DISTRIBUTED_COMMANDS = ("teacher", "distill")


def _say(line: str) -> None:
    """One stderr line in ONE write: under torchrun the ranks share the pipe, and print()'s separate
    newline write lets two ranks' messages run together on one line."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _rank_prefix() -> str:
    """``[rank R] `` for processes other than rank 0 of a torchrun launch (their lines interleave)."""
    rank = os.environ.get("RANK", "0")
    return f"[rank {rank}] " if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and rank != "0" else ""


def _check_single_process(command: str) -> None:
    """Only training runs under torchrun; a sampler or report started N times would race on files."""
    if command not in DISTRIBUTED_COMMANDS and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        raise FewstepError(f"'fewstep {command}' runs as one process; launch it without torchrun "
                           "(only teacher and distill train on several processes)")


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    dist = sys.modules.get("fewstep.train.dist")
    if dist is not None and dist.joined_a_group():  # see dist.joined_a_group: skip finalisation
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    _set_threads()
    from fewstep.train.control import Interrupted

    try:
        _check_single_process(args.command)
        return COMMANDS[args.command](args)
    except FewstepError as e:
        _say(f"{_rank_prefix()}error: {e}")
        return EXIT_USAGE
    except Interrupted as e:  # a stop signal: the checkpoint is written, the run resumes later
        _say(f"{_rank_prefix()}{e}")
        return e.code
    except KeyboardInterrupt:
        _say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
