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
  fewstep teacher --data grid25c data.conditional=true --out runs/tc     (label dropout: guidable)
  fewstep vae --data mnist28 --out runs/vae                   (a small diffusers VAE for latent teachers)
  fewstep teacher --data mnist28 --vae runs/vae --objective flow --out runs/lt   (a latent flow teacher)
  fewstep distill --teacher runs/tc --method dmd --guidance 3 --steps 4 --extra dp=0.05 --out runs/g
  fewstep eval runs/s --json metrics.json        fewstep sample runs/s --n 2000 --out s.png
  fewstep bench --suite quick --out runs/bench   torchrun --nproc_per_node 2 -m fewstep distill ...
  fewstep export runs/s --format diffusers --out pipe   fewstep eval --samples imgs.npz --data digits8
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


def _foreign_args(p: argparse.ArgumentParser) -> None:
    """Options for diffusers teachers (docs/bring-your-model.md)."""
    p.add_argument("--scheduler", metavar="DIR_OR_JSON",
                   help="diffusers scheduler config for a bare UNet directory (scheduler_config.json "
                        "or the directory holding it)")
    p.add_argument("--null-class", default="last", metavar="N|last|none",
                   help="unconditional class index of a class-conditional diffusers UNet "
                        "(default: the last embedding; none: every embedding is a class)")


def _prompts_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", metavar="FILE", help="text models: prompts to sample, one per line, in turn "
                   "(default: the model's own prompts; eval adds prompt_adherence, docs/text.md)")


def _prompts(args) -> list[str] | None:
    from fewstep.models.text_cond import read_prompts

    return read_prompts(args.prompts) if getattr(args, "prompts", None) else None


def _foreign(args):
    """The context in which diffusers teachers load with --scheduler / --null-class."""
    from fewstep.models.adapters import parse_null_class, teacher_options

    return teacher_options(getattr(args, "scheduler", None),
                           parse_null_class(getattr(args, "null_class", "last")))


def build_parser() -> argparse.ArgumentParser:
    from fewstep.losses import BASES, EXTRAS  # the help lists what is registered

    parser = _Parser(prog="fewstep", description="Distil a diffusion teacher into a 1-4 step "
                     "student with diversity-preserving objectives.",
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("teacher", help="train a teacher (EDM or rectified flow) on a data set")
    p.add_argument("--data", required=True, help="ring8 | grid25 | digits8 | mnist28 | path to data")
    p.add_argument("--objective", choices=["edm", "flow"], help="EDM denoiser (default) or a rectified-"
                   "flow velocity model (model.objective; flow times: model.flow_t)")
    p.add_argument("--vae", metavar="DIR", help="diffusers AutoencoderKL/AutoencoderTiny folder (e.g. from "
                   "'fewstep vae'): train on the data's latents, encoded once and cached (= data.vae=DIR; "
                   "students, eval and sample read it from the teacher)")
    p.add_argument("--text", action="store_true", help="a text-to-image teacher (= data.text=true; needs "
                   "--vae): a Stable Diffusion pipeline directory trained on digit prompts (docs/text.md)")
    _common_run_args(p)

    p = sub.add_parser("distill", help="distil a teacher into a k-step student")
    p.add_argument("--teacher", required=True, help="teacher directory (fewstep run or diffusers)")
    p.add_argument("--method", required=True, help=f"base method: {' | '.join(BASES)}")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=WEIGHT",
                   help=f"extra term ({' | '.join(EXTRAS)}) with its weight, e.g. --extra el=0.5")
    p.add_argument("--steps", type=int, help="student steps k (student.steps)")
    p.add_argument("--eval-every", type=int, help="in-training evaluation period (train.eval_every)")
    p.add_argument("--batch", type=int, help="global batch size (train.batch)")
    p.add_argument("--data", help="training data (default: the teacher's recorded data; = data.name)")
    p.add_argument("--prompts", metavar="FILE", help="text teachers: prompts to distil on, one per line "
                   "(= prompts; default for a fewstep text teacher: its training prompts)")
    _foreign_args(p)
    p.add_argument("--guidance", type=float, metavar="W",
                   help="classifier-free guidance scale of the teacher's score (guidance; default 1 = "
                        "off): dmd/di/fdistill real score, cd teacher step, dp anchor, sid SiD-LSG "
                        "scales; the student samples unguided (docs/guidance.md)")
    _common_run_args(p)

    p = sub.add_parser("sample", help="draw samples from a teacher or student")
    p.add_argument("model", help="run directory or diffusers directory")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--nfe", type=int, help="network evaluations (teachers; default: model's)")
    p.add_argument("--sampler", choices=["heun", "euler", "dpmpp", "flow_euler"], default="heun",
                   help="heun / euler (Karras grid), dpmpp (diffusers DPM-Solver++ 2M) or flow_euler "
                        "(flow teachers: diffusers' flow-matching Euler from pure noise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=1.0, metavar="W",
                   help="classifier-free guidance scale of a teacher (default 1 = off); NFE then counts "
                        "2 network evaluations per denoiser call")
    p.add_argument("--out", required=True, help="FILE.png (grid or 2-D scatter) or FILE.npz")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--data", help="data set whose modes a 2-D scatter shows (default: the model's)")
    _prompts_arg(p)
    _foreign_args(p)

    p = sub.add_parser("eval", help="metrics of a teacher (at any NFE) or a student")
    p.add_argument("model", nargs="?", help="run directory or diffusers directory (or use --samples)")
    p.add_argument("--samples", metavar="FILE",
                   help="evaluate samples made by any tool instead of a model: .npz/.npy (NCHW in [-1, 1], "
                        "NHWC in [0, 1] or uint8, [N, D] vectors) or an image folder; needs --data")
    p.add_argument("--n", type=int, help="samples (default: 2500 mixtures, test-split size images)")
    p.add_argument("--nfe", type=int, help="network evaluations (teachers; default: model's)")
    p.add_argument("--sampler", choices=["heun", "euler", "dpmpp", "flow_euler"], default="heun",
                   help="heun / euler (Karras grid), dpmpp (diffusers DPM-Solver++ 2M) or flow_euler "
                        "(flow teachers: diffusers' flow-matching Euler from pure noise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=1.0, metavar="W",
                   help="classifier-free guidance scale of a teacher (default 1 = off); NFE then counts "
                        "2 network evaluations per denoiser call")
    p.add_argument("--data", help="data set to compare with (default: the model's training data)")
    _prompts_arg(p)
    p.add_argument("--vae", metavar="DIR", help="with --samples: the samples are latents of this diffusers "
                   "VAE (.npz key z first), decoded and scored on pixels with the VAE floors; models "
                   "record their VAE")
    p.add_argument("--fid", action="store_true", help="also compute Inception FID (images; slow)")
    p.add_argument("--repeats", type=int, default=1,
                   help="average over this many generated sets (reports <metric>_std too)")
    p.add_argument("--json", help="write the metrics as JSON to this file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    _foreign_args(p)

    p = sub.add_parser("export", help="write a distilled student in another format (diffusers pipeline)")
    p.add_argument("model", help="student run directory")
    p.add_argument("--format", required=True, choices=["diffusers"],
                   help="diffusers: a DiffusionPipeline.from_pretrained directory")
    p.add_argument("--out", required=True, help="output directory (new or empty)")

    p = sub.add_parser("bench", help="run a benchmark suite (cached, resumable) and report it")
    from fewstep.bench.suites import SUITES  # the help lists exactly the suites that exist

    p.add_argument("--suite", required=True, help=" | ".join(SUITES))
    p.add_argument("--out", required=True, help="suite directory (re-run to resume)")
    p.add_argument("--jobs", type=int, default=2, help="processes at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds per arm, ablations included (claim and full suites)")
    p.add_argument("--digits-seeds", type=int, default=None,
                   help="seeds per digits8 arm in the claim suites (default: --seeds; each digits8 "
                        "seed costs el ~55 min, dp ~20 min, tfd ~20 min of process time; 0 = none)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report of the jobs finished so far and start none (e.g. while "
                        "another runner works on --out)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("demo", help="the whole story on ring8 (+ a digits8 teacher) in ~10 minutes")
    p.add_argument("--out", default="runs/demo", help="demo directory (re-run to resume)")
    p.add_argument("--jobs", type=int, default=2, help="processes at a time")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("perf", help="sampling and training speed as ratios, measured in one process")
    p.add_argument("--teacher", required=True, help="teacher directory")
    p.add_argument("--students", nargs="*", default=[], help="student directories")
    p.add_argument("--methods", nargs="*", default=None,
                   help="method specs to time, e.g. dmd dmd+el dmd+dp@4 di sid cd tfd (default: dmd; "
                        "with --bare: dmd sid di)")
    p.add_argument("--bare", action="store_true",
                   help="time the engine against a plain PyTorch loop of the same network passes "
                        "(bench/bare.py; 1-step dmd, sid, di) and report the overhead ratio only")
    p.add_argument("--profile", action="store_true",
                   help="where an iteration of each method spends its time (torch.profiler; "
                        "bench/profile.py): ms per iteration of data, rollout, each loss term, "
                        "backward, optimiser, EMA and the rest")
    p.add_argument("--batch", type=int, help="training batch for the timing (default: presets)")
    p.add_argument("--json", required=True, help="output JSON file")

    p = sub.add_parser("report", help="Markdown + HTML report of one or more runs")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--title", default="fewstep report")

    p = sub.add_parser("convert", help="read an EDM / EDM2 network .pkl as data (never executing it) "
                       "and write model.safetensors + model.json")
    p.add_argument("pickle", help="NVlabs/edm or edm2 snapshot, e.g. edm-cifar10-32x32-cond-vp.pkl")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--data", help="the network's data set (recorded, so distill and eval need no data.name)")

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


def _flag_overrides(args, flags) -> list[str]:
    """``--iters 300`` -> ``train.iters=300`` for the flags the user gave."""
    return [f"{key}={getattr(args, flag)}" for flag, key in flags if getattr(args, flag) is not None]


_RUN_FLAGS = (("iters", "train.iters"), ("seed", "train.seed"), ("device", "train.device"))


def _resolve_teacher_config(args):
    from fewstep.recipe import teacher_config

    flags = _RUN_FLAGS + (("objective", "model.objective"),)
    return teacher_config(args.data, [*args.overrides, *_flag_overrides(args, flags)], args.preset,
                          vae=args.vae, text=args.text)


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


def _resolve_distill_config(args):
    from fewstep.recipe import distill_config

    flags = _RUN_FLAGS + (("steps", "student.steps"), ("eval_every", "train.eval_every"),
                          ("batch", "train.batch"), ("guidance", "guidance"))
    cfg = distill_config(args.teacher, args.method, _parse_extras(args.extra),
                         [*_flag_overrides(args, flags), *args.overrides], args.preset)
    if args.prompts is not None:  # verbatim (YAML could mangle a path), then checked and made absolute
        from fewstep.recipe import check_prompts

        cfg.prompts = check_prompts(cfg.teacher, args.prompts)
    return cfg


def cmd_distill(args) -> int:
    with _foreign(args):
        cfg = _resolve_distill_config(args)
        cfg.data.name = args.data or cfg.data.name or _recorded_teacher_data(args.teacher)
        return _train(args, cfg, "student")


def _recorded_teacher_data(teacher: str) -> str:
    """The teacher's user data file (checked: it exists and is unchanged), else '' (built-in data
    and foreign teachers resolve as before)."""
    from fewstep.data.provenance import recorded_data
    from fewstep.models.io import MODEL_JSON, read_model_json

    if not (Path(teacher) / MODEL_JSON).is_file():
        return ""
    data = read_model_json(teacher)[1].get("data") or {}
    return recorded_data(data, teacher) if data.get("path") else ""


def cmd_sample(args) -> int:
    from fewstep.train.generate import sample_to_file

    with _foreign(args):  # --scheduler / --null-class reach the loader
        nfe = sample_to_file(args.model, Path(args.out), args.n, args.nfe, args.sampler, args.seed,
                             args.device, data=args.data, guidance=args.guidance, prompts=_prompts(args))
    print(f"{args.n} samples ({nfe} NFE) written to {args.out}")
    return 0


def cmd_eval_samples(args) -> dict:
    """``eval --samples FILE --data D`` (no model: sampling flags do not apply)."""
    from fewstep.train.evaluate import evaluate_samples

    if args.model:
        raise FewstepError("give a model or --samples FILE, not both")
    return evaluate_samples(args.samples, args.data, n=args.n, fid=args.fid, vae=args.vae)


def cmd_eval(args) -> int:
    from fewstep.train.evaluate import evaluate_model

    if args.vae and not args.samples:
        raise FewstepError("--vae goes with --samples (latent samples); a model directory records its VAE")
    if args.samples or not args.model:
        if not args.samples:
            raise FewstepError("eval needs a model directory or --samples FILE --data D")
        return _print_metrics(args, cmd_eval_samples(args))

    with _foreign(args):
        metrics = evaluate_model(args.model, n=args.n, nfe=args.nfe, sampler=args.sampler,
                                 seed=args.seed, data=args.data, fid=args.fid, device=args.device,
                                 repeats=args.repeats, guidance=args.guidance, prompts=_prompts(args))
    return _print_metrics(args, metrics)


def _print_metrics(args, metrics: dict) -> int:
    from fewstep.train.evaluate import format_table

    print(format_table(metrics))
    if args.json:
        from fewstep.train.rundir import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(metrics, indent=2) + "\n")
    return 0


def cmd_export(args) -> int:
    from fewstep.models.export_diffusers import export_diffusers

    record = export_diffusers(args.model, args.out)
    exact = "exactly" if record["pipeline_is_exact"] else "(see notes)"
    print(f"{record['steps']}-step student written to {args.out} as a {record['pipeline']} with "
          f"{record['scheduler']}; {record['usage']} samples it {exact}")
    for note in record["notes"]:
        print(f"note: {note}")
    return 0


def cmd_bench(args) -> int:
    from fewstep.bench.run import run_suite

    done, total, summary = run_suite(args.suite, Path(args.out), args.jobs, args.threads, args.seeds,
                                     args.digits_seeds, progress=not args.no_progress,
                                     report_only=args.report_only)
    print(summary)
    return 0 if done == total or args.report_only else 1


def cmd_demo(args) -> int:
    """The whole story on the default data: the ``demo`` suite, then a report with pictures."""
    from fewstep.bench.run import run_demo

    done, total, summary = run_demo(Path(args.out), args.jobs, progress=not args.no_progress)
    print(summary)
    return 0 if done == total else 1


def cmd_perf(args) -> int:
    from fewstep.bench.bare import BARE_METHODS
    from fewstep.bench.perf import method_configs, perf_report, time_bare
    from fewstep.train.rundir import atomic_write_text

    if args.bare and args.profile:
        raise FewstepError("choose one of --bare and --profile")
    if args.profile:
        from fewstep.bench.profile import profile_iterations

        configs = method_configs(args.teacher, args.methods or ["dmd"], args.batch)
        result = {"profile": {m: profile_iterations(c) for m, c in configs.items()},
                  "threads": __import__("torch").get_num_threads()}
    elif args.bare:
        methods = args.methods or list(BARE_METHODS)
        result = {"bare": time_bare(method_configs(args.teacher, methods, args.batch)),
                  "threads": __import__("torch").get_num_threads()}
    else:
        result = perf_report(args.teacher, args.students, args.methods or ["dmd"], args.batch)
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


def cmd_convert(args) -> int:
    from fewstep.models.edm_pickle import load_edm_pickle
    from fewstep.models.io import save_model

    src = Path(args.pickle)
    if src.suffix != ".pkl" or not src.is_file():
        raise FewstepError(f"{src} is not a .pkl file; 'fewstep convert' reads NVlabs/edm and edm2 network "
                           "pickles")
    D, meta = load_edm_pickle(src)
    if args.data:
        meta["data"]["name"] = args.data
    save_model(Path(args.out), D, D.spec, meta)
    n = sum(p.numel() for p in D.parameters())
    print(f"{meta['class_name']} / {meta['model_type']} ({n / 1e6:.2f} M parameters, samples "
          f"{meta['data']['shape']}, {meta['data']['num_classes']} classes) written to {args.out}")
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
            "perf": cmd_perf, "demo": cmd_demo, "convert": cmd_convert, "export": cmd_export}


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
