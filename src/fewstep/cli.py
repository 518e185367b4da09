"""The ``fewstep`` command. User mistakes print one ``error:`` line and exit with code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fewstep.errors import FewstepError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (plus a pointer to --help), exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


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
                     "student with diversity-preserving objectives.")
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
    p.add_argument("--json", help="write the metrics as JSON to this file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])

    p = sub.add_parser("report", help="Markdown + HTML report of one or more runs")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--title", default="fewstep report")

    p = sub.add_parser("featnet", help="retrain the digits feature network (metric space)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--seed", type=int, default=0)
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


def cmd_teacher(args) -> int:
    from fewstep.config import dump_yaml

    cfg = _resolve_teacher_config(args)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    from fewstep.train.evaluate import in_training_evaluator
    from fewstep.train.teacher import train_teacher

    out = train_teacher(cfg, Path(args.out), evaluate=in_training_evaluator(cfg),
                        progress=not args.no_progress)
    print(f"teacher written to {out}")
    return 0


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
    overrides += [f"extras.{k}={v}" for k, v in _parse_extras(args.extra).items()]
    for flag, key in (("iters", "train.iters"), ("seed", "train.seed"), ("device", "train.device"),
                      ("steps", "student.steps"), ("eval_every", "train.eval_every"),
                      ("batch", "train.batch")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    cfg = resolve(DistillRunConfig, base, overrides + list(args.overrides))
    cfg.teacher = args.teacher
    return cfg


def cmd_distill(args) -> int:
    from fewstep.config import dump_yaml

    cfg = _resolve_distill_config(args)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    from fewstep.train.distill import train_distill
    from fewstep.train.evaluate import in_training_evaluator

    out = train_distill(cfg, Path(args.out), evaluate=in_training_evaluator(cfg),
                        progress=not args.no_progress)
    print(f"student written to {out}")
    return 0


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
                             seed=args.seed, data=args.data, fid=args.fid, device=args.device)
    print(format_table(metrics))
    if args.json:
        from fewstep.train.rundir import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(metrics, indent=2) + "\n")
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

    result = train_featnet(Path(args.out), seed=args.seed)
    print(json.dumps(result))
    return 0


COMMANDS = {"teacher": cmd_teacher, "distill": cmd_distill, "sample": cmd_sample, "eval": cmd_eval,
            "report": cmd_report, "featnet": cmd_featnet}


def _set_threads() -> None:
    """``FEWSTEP_THREADS=N`` fixes torch's intra-op threads. On a busy 2-core machine one thread is
    often several times faster for small networks (OpenMP workers spin while waiting)."""
    import os

    n = os.environ.get("FEWSTEP_THREADS")
    if n:
        import torch

        torch.set_num_threads(max(1, int(n)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _set_threads()
    try:
        return COMMANDS[args.command](args)
    except FewstepError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
