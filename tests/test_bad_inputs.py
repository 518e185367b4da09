"""Every bad input: ONE line naming the problem and the fix, exit code 2, no traceback, nothing partial
written, no good file overwritten (docs/scaling.md lists each case with its message).

``CASES`` are in-process ``fewstep.cli.main`` calls: ``id -> build(tmp, teacher) -> (argv, env, needles)``;
the output directory is always ``tmp/out`` and must not exist afterwards. Cases that need a
previous good run (different config, disk full) and subprocess checks follow the table.
"""

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fewstep.cli import main
from fewstep.train import checkpoint as ckpt
from tests.helpers import MLP, save_tiny_teacher

TORCHRUN_ENV = {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29511"}
ENV_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _npy(tmp, name, arr):
    np.save(tmp / name, arr)
    return str(tmp / name)


def _npz(tmp, name, **arrays):
    np.savez(tmp / name, **arrays)
    return str(tmp / name)


def _teacher_cmd(data, *extra):
    return ["teacher", "--data", data, *extra]


def _distill(teacher, *extra):
    return ["distill", "--teacher", str(teacher), "--method", "dmd", *extra]


def _images(tmp, sizes, corrupt=False):
    from PIL import Image

    folder = tmp / "imgs"
    folder.mkdir()
    for i, s in enumerate(sizes):
        Image.fromarray(np.full((s, s), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    if corrupt:
        (folder / "broken.png").write_bytes(b"not a png at all")
    return str(folder)


def _teacher_variant(tmp, teacher, kind):
    d = tmp / kind
    d.mkdir()
    doc = json.loads((teacher / "model.json").read_text())
    weights = (teacher / "model.safetensors").read_bytes()
    if kind == "mismatch":
        doc["spec"]["hidden"] = 64
    if kind != "no_weights":
        (d / "model.safetensors").write_bytes(weights[: len(weights) // 2] if kind == "truncated"
                                              else weights)
    (d / "model.json").write_text("{not json" if kind == "bad_json" else json.dumps(doc))
    return d


def _labelled_teacher(tmp):
    data = _npz(tmp, "lab5.npz", x=np.random.randn(50, 2).astype("float32"), y=np.arange(50) % 5)
    spec = {**MLP, "num_classes": 3}
    meta = {"name": data, "kind": "vector", "shape": [2], "num_classes": 3}
    return save_tiny_teacher(tmp / "t3", spec, meta)


def _case(argv, *needles, env=None):
    return argv, env or {}, list(needles)


Z = np.zeros
CASES = {
    # data
    "data_wrong_rank": lambda tmp, t: _case(_teacher_cmd(_npy(tmp, "r1.npy", Z(10))), "rank 1", "[N, D]"),
    "data_string_dtype": lambda tmp, t: _case(_teacher_cmd(_npy(tmp, "s.npy", np.array([["a", "b"]] * 4))),
                                              "non-numeric dtype", "float32"),
    "data_complex_dtype": lambda tmp, t: _case(_teacher_cmd(_npy(tmp, "c.npy", Z((5, 2), complex))),
                                               "non-numeric dtype complex128"),
    "data_nan": lambda tmp, t: _case(_teacher_cmd(_npy(tmp, "n.npy", np.array([[0.0, np.nan]] * 5))),
                                     "NaN/Inf", "remove or replace"),
    "data_empty": lambda tmp, t: _case(_teacher_cmd(_npy(tmp, "e.npy", Z((0, 2)))), "is empty"),
    "data_one_sample": lambda tmp, t: _case(_teacher_cmd(_npz(tmp, "o.npz", x=Z((1, 2)))), "1 sample",
                                            "at least 2"),
    "labels_negative": lambda tmp, t: _case(
        _teacher_cmd(_npz(tmp, "neg.npz", x=Z((4, 2)), y=np.array([0, 1, -1, 0]))), "non-negative", "-1"),
    "labels_not_integer": lambda tmp, t: _case(
        _teacher_cmd(_npz(tmp, "f.npz", x=Z((4, 2)), y=np.linspace(0, 1, 4))), "integers", "int64"),
    "labels_count_mismatch": lambda tmp, t: _case(_teacher_cmd(_npz(tmp, "m.npz", x=Z((10, 2)), y=Z(9, int))),
                                                  "10 samples", "9 labels"),
    "labels_out_of_teacher_range": lambda tmp, t: _case(_distill(_labelled_teacher(tmp)), "labels 0..4",
                                                        "knows 3 classes"),
    "npz_without_x": lambda tmp, t: _case(_teacher_cmd(_npz(tmp, "nox.npz", a=Z((4, 2)))), "no array 'x'"),
    "data_unsupported_file": lambda tmp, t: _case(_teacher_cmd(str(_write(tmp / "d.csv", "1,2\n"))),
                                                  "unsupported data file", ".npy"),
    "data_missing_path": lambda tmp, t: _case(_teacher_cmd(str(tmp / "nope.npy")), "does not exist"),
    "data_unknown_name": lambda tmp, t: _case(_teacher_cmd("ring9"), "ring9", "did you mean 'ring8'"),
    "image_corrupt": lambda tmp, t: _case(_teacher_cmd(_images(tmp, [8, 8, 8], corrupt=True)), "broken.png"),
    "images_differ_in_size": lambda tmp, t: _case(_teacher_cmd(_images(tmp, [8, 8, 6])), "differ in size"),
    "data_shape_vs_teacher": lambda tmp, t: _case(_distill(t, f"data.name={_npy(tmp, 'd3.npy', Z((50, 3)))}"),
                                                  "shape (3,)", "teacher makes (2,)"),
    # config
    "unknown_key": lambda tmp, t: _case(_distill(t, "train.iter=5"), "train.iter",
                                        "did you mean 'train.iters'"),
    "wrong_type_int": lambda tmp, t: _case(_distill(t, "train.batch=1.5"), "train.batch", "integer"),
    "wrong_type_list": lambda tmp, t: _case(_distill(t, "optim.betas=0.9"), "optim.betas", "list"),
    "steps_flag_zero": lambda tmp, t: _case(_distill(t, "--steps", "0"), "student.steps must be > 0"),
    "student_steps_zero": lambda tmp, t: _case(_distill(t, "student.steps=0"), "student.steps must be > 0"),
    "iters_negative": lambda tmp, t: _case(_distill(t, "--iters", "-3"), "train.iters must be > 0"),
    "extra_weight_negative": lambda tmp, t: _case(_distill(t, "--extra", "el=-1"), "el=-1.0", ">= 0"),
    "extra_weight_nan": lambda tmp, t: _case(_distill(t, "--extra", "el=nan"), "finite"),
    "extra_weight_not_a_number": lambda tmp, t: _case(_distill(t, "--extra", "el=abc"), "must be a number"),
    "unknown_extra": lambda tmp, t: _case(_distill(t, "--extra", "elx=1"), "unknown extra 'elx'", "'el'"),
    "unknown_method": lambda tmp, t: _case(["distill", "--teacher", str(t), "--method", "dmdx"],
                                           "dmdx", "dmd"),
    "sigmas_not_decreasing": lambda tmp, t: _case(_distill(t, "--steps", "2", "student.sigmas=[1,5]"),
                                                  "strictly decreasing"),
    "sigmas_count": lambda tmp, t: _case(_distill(t, "--steps", "3", "student.sigmas=[5,1]"),
                                         "one level per step"),
    "gen_offset_ge_ratio": lambda tmp, t: _case(_distill(t, "schedule.gen_offset=5"), "gen_offset=5",
                                                "ratio=5"),
    "lr_nan": lambda tmp, t: _case(_distill(t, "optim.lr=nan"), "optim.lr", "finite"),
    "micro_batch_negative": lambda tmp, t: _case(_distill(t, "train.micro_batch=-1"), "train.micro_batch"),
    "unknown_preset": lambda tmp, t: _case(_distill(t, "--preset", "nope"), "no preset 'nope'"),
    "bad_choice": lambda tmp, t: _case(_distill(t, "student.rollout=foo"), "student.rollout",
                                       "full or backsim"),
    "override_after_option": lambda tmp, t: _case(
        ["distill", "--teacher", str(t), "train.iters=3", "--method", "dmd", "el.K=2", "--iters", "3"],
        "after all --options"),
    "log_every_zero": lambda tmp, t: _case(_distill(t, "train.log_every=0"), "train.log_every must be > 0"),
    "betas_out_of_range": lambda tmp, t: _case(_distill(t, "optim.betas=[1.5,0.9]"), "optim.betas", "[0, 1)"),
    "unet_without_blocks": lambda tmp, t: _case(_teacher_cmd("digits8", "model.channels=[]"),
                                                "model.channels", "non-empty"),
    "mlp_for_images": lambda tmp, t: _case(_teacher_cmd("digits8", "model.type=mlp"), "model.type=mlp",
                                           "model.type=unet"),
    "cuda_without_cuda": lambda tmp, t: _case(_distill(t, "--device", "cuda"), "no CUDA", "--device cpu"),
    "bench_seeds_zero": lambda tmp, t: _case(["bench", "--suite", "el", "--out", str(tmp / "out"),
                                              "--seeds", "0"], "--seeds must be at least 1"),
    # teachers
    "teacher_missing_dir": lambda tmp, t: _case(_distill(tmp / "nope"), "does not exist"),
    "teacher_not_a_model": lambda tmp, t: _case(_distill(_mkdir(tmp / "empty")), "not a model directory"),
    "teacher_missing_weights": lambda tmp, t: _case(_distill(_teacher_variant(tmp, t, "no_weights")),
                                                    "no model.safetensors"),
    "teacher_json_vs_weights": lambda tmp, t: _case(_distill(_teacher_variant(tmp, t, "mismatch")),
                                                    "does not match model.json", "[32] vs [64]"),
    "teacher_truncated_weights": lambda tmp, t: _case(_distill(_teacher_variant(tmp, t, "truncated")),
                                                      "truncated or corrupt", "re-export"),
    "teacher_bad_json": lambda tmp, t: _case(_distill(_teacher_variant(tmp, t, "bad_json")), "cannot read"),
    "teacher_pickle_file": lambda tmp, t: _case(_distill(_write(tmp / "teacher.pt", "junk")), "pickle",
                                                "never unpickles", "safetensors"),
    # output
    "out_is_a_file": lambda tmp, t: _case(_distill(t, "--out", str(_write(tmp / "out", "x"))),
                                          "exists and is not a directory"),
    "out_unwritable": lambda tmp, t: _case(_distill(t, "--out", str(_write(tmp / "blocker", "x") / "run")),
                                           "cannot write to output directory", "writable --out"),
    "out_non_empty_non_run": lambda tmp, t: _case(
        _distill(t, "--out", str(_write(_mkdir(tmp / "out") / "mine.txt", "keep").parent)),
        "non-empty directory", "not a fewstep run"),
    # distributed launch mistakes
    "world_size_without_torchrun_env": lambda tmp, t: _case(
        _distill(t), "RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT", "torchrun", env={"WORLD_SIZE": "2"}),
    "rank_without_world_size": lambda tmp, t: _case(_distill(t), "WORLD_SIZE is not", "torchrun",
                                                    env={"RANK": "1"}),
    "batch_not_divisible": lambda tmp, t: _case(_distill(t, "--batch", "16"), "train.batch=16", "3 processes",
                                                "train.batch=18", env=TORCHRUN_ENV),
    "rank_outside_world": lambda tmp, t: _case(_distill(t, "--batch", "18"), "RANK=3", "outside WORLD_SIZE=3",
                                               env={**TORCHRUN_ENV, "RANK": "3"}),
    "master_port_not_integer": lambda tmp, t: _case(
        _distill(t, "--batch", "18"), "MASTER_PORT", "not an integer",
        env={**TORCHRUN_ENV, "MASTER_PORT": "x"}),
    "sample_under_torchrun": lambda tmp, t: _case(
        ["sample", str(t), "--out", str(tmp / "out.png")], "runs as one process", "without torchrun",
        env=TORCHRUN_ENV),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "t")


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: " in err[0] and "Traceback" not in err[0], err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


@contextlib.contextmanager
def _deadline(seconds: int, case: str):
    """Fail the test (instead of running on for an hour) when ``main`` does not refuse in time."""
    def expire(signum, frame):
        raise TimeoutError(f"{case}: not refused within {seconds} s (the input was accepted?)")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(tmp_path, teacher, monkeypatch, capsys, case):
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    argv, env, needles = CASES[case](tmp_path, teacher)
    if "--out" not in argv:
        argv = [argv[0], "--out", str(tmp_path / "out"), *argv[1:]]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = _snapshot(tmp_path)
    with _deadline(60, case):  # a refusal is instant; an input that is accepted must not run a bench
        try:
            code = main(argv)
        except SystemExit as e:  # argparse usage errors exit from inside the parser
            code = e.code
    assert code == 2
    _one_line(capsys, *needles)
    assert _snapshot(tmp_path) == before  # nothing written, nothing overwritten
    assert not (tmp_path / "out").is_dir() or case == "out_non_empty_non_run"


def _documented_cases() -> dict[str, str]:
    """``case -> message`` from the table in docs/scaling.md ("Every bad input and its message")."""
    doc = (Path(__file__).resolve().parents[1] / "docs/scaling.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| `(.+)` \|$", doc, flags=re.M)
    return dict(rows)


# cases added after the table was written; docs/scaling.md (not a test file) needs their rows:
# bench_seeds_zero -> `error: --seeds must be at least 1 and --digits-seeds at least 0, got 0 and 0`
NOT_YET_DOCUMENTED: set[str] = set()  # cases whose docs row is still to be written


def test_every_case_is_documented_with_its_message(tmp_path, teacher):
    """docs/scaling.md lists each case of CASES, no other, with a message holding the needles the
    test checks (so the table and the tested messages cannot drift apart)."""
    documented = _documented_cases()
    assert len(documented) >= 50 and set(documented) <= set(CASES), set(documented) - set(CASES)
    assert set(CASES) - set(documented) <= NOT_YET_DOCUMENTED, set(CASES) - set(documented)
    for case, build in CASES.items():
        if case not in documented:
            continue
        (tmp_path / case).mkdir()
        _, _, needles = build(tmp_path / case, teacher)
        assert needles, case
        for n in needles:
            assert n in documented[case], (case, n, documented[case])


# ---------------------------------------------------------------------------------------------
# cases that need a previous good run
# ---------------------------------------------------------------------------------------------
RUN = ["--method", "dmd", "--batch", "16", "--no-progress", "train.eval_n=100", "train.ckpt_every=2"]


def _good_run(tmp_path, teacher, capsys, iters=2) -> Path:
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--out", str(out), "--iters", str(iters), *RUN]) == 0
    capsys.readouterr()
    return out


def test_existing_run_with_a_different_config_is_refused(tmp_path, teacher, capsys):
    out = _good_run(tmp_path, teacher, capsys)
    before = _snapshot(out)
    assert main(["distill", "--teacher", str(teacher), "--out", str(out), "--iters", "2", *RUN,
                 "optim.lr=0.5"]) == 2
    _one_line(capsys, "different config", "optim.lr", "choose another --out")
    assert _snapshot(out) == before


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, teacher, monkeypatch, capsys):
    real, calls = ckpt.torch.save, []

    def save(obj, f):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint (iteration 4) hits a full disk mid-write
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f)

    monkeypatch.setattr(ckpt.torch, "save", save)
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(teacher), "--out", str(out), "--iters", "6", *RUN]
    assert main(args) == 2
    _one_line(capsys, "ckpt_00000004.pt", "No space left on device", "previous checkpoint is intact",
              "free disk space", "rerun the same command")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt_00000002.pt"]
    assert ckpt.load_checkpoint(out / "checkpoints/ckpt_00000002.pt")["step"] == 2
    monkeypatch.undo()
    assert main(args) == 0  # space freed: the same command resumes and finishes
    assert (out / "model.safetensors").exists()


def test_disk_full_while_exporting_keeps_the_previous_model(tmp_path, teacher, monkeypatch, capsys):
    import safetensors.torch

    out = _good_run(tmp_path, teacher, capsys)
    model = {n: (out / n).read_bytes() for n in ("model.safetensors", "model.json")}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    args = ["distill", "--teacher", str(teacher), "--out", str(out), "--iters", "4", *RUN]
    assert main(args) == 2
    _one_line(capsys, "could not write the model", "No space left on device", "previous model", "intact")
    assert {n: (out / n).read_bytes() for n in model} == model
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    monkeypatch.undo()
    assert main(args) == 0
    assert json.loads((out / "model.json").read_text())["meta"]["iterations"] == 4


def test_checkpoints_that_do_not_load_are_refused_not_skipped(tmp_path, teacher, capsys):
    out = _good_run(tmp_path, teacher, capsys, iters=4)
    newest = out / "checkpoints/ckpt_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # damaged on disk
    before = _snapshot(out)
    assert main(["distill", "--teacher", str(teacher), "--out", str(out), "--iters", "6", *RUN]) == 2
    _one_line(capsys, "ckpt_00000004.pt", "truncated or corrupt", "delete it to resume from ckpt_00000002.pt")
    assert _snapshot(out) == before


def test_a_failed_start_leaves_nothing_behind(tmp_path, teacher, capsys):
    """An error found only once training starts (EL needs 2 samples per process) removes the new run."""
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--method", "dmd", "--out", str(out),
                 "--extra", "el=1", "--batch", "1", "--iters", "2", "--no-progress"]) == 2
    _one_line(capsys, "el needs at least 2 samples")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# subprocess checks: the real exit code and stderr of the command
# ---------------------------------------------------------------------------------------------
def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    return {**env, "OMP_NUM_THREADS": "1", "FEWSTEP_THREADS": "1", **extra}


def test_subprocess_launch_mistake_is_one_line(tmp_path, teacher):
    r = subprocess.run([sys.executable, "-m", "fewstep", *_distill(teacher), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=_clean_env(WORLD_SIZE="4"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: WORLD_SIZE=4")
    assert not (tmp_path / "o").exists()


def test_torchrun_with_an_indivisible_batch_fails_fast(tmp_path, teacher):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "fewstep",
                        *_distill(teacher, "--batch", "15", "--out", str(tmp_path / "o"))],
                       capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert r.returncode != 0
    ours = [line.split("error:")[0] for line in r.stderr.splitlines() if "error: train.batch=15" in line]
    # rank 0's line is unprefixed; rank 1 prints the same with "[rank 1] " unless torchrun, having seen
    # rank 0 exit, stops it first
    assert "" in ours and set(ours) <= {"", "[rank 1] "}, r.stderr[-2000:]
    assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
