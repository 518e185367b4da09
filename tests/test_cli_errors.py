"""Bad input gets one clear line, exit code 2, no traceback, nothing partial written."""

import subprocess
import sys

import numpy as np

from fewstep.cli import main


def _run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _assert_one_line(code, err, *needles):
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    for n in needles:
        assert n in err[0], (n, err[0])


def test_unknown_data_name_suggests_nearest(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _run(["teacher", "--data", "ring9", "--out", str(out)], capsys)
    _assert_one_line(code, err, "ring9", "ring8")
    assert not out.exists()


def test_npy_wrong_rank_and_nan(tmp_path, capsys):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros(10))
    out = tmp_path / "run"
    _assert_one_line(*_run(["teacher", "--data", str(bad), "--out", str(out)], capsys), "bad.npy")
    nan = tmp_path / "nan.npy"
    arr = np.zeros((20, 2))
    arr[3, 1] = np.nan
    np.save(nan, arr)
    _assert_one_line(*_run(["teacher", "--data", str(nan), "--out", str(out)], capsys), "NaN")
    assert not out.exists()


def test_corrupt_image_in_folder(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "run"
    _assert_one_line(*_run(["teacher", "--data", str(folder), "--out", str(out)], capsys), "broken.png")
    assert not out.exists()


def test_unknown_and_mistyped_config_keys(tmp_path, capsys):
    out = tmp_path / "run"
    _assert_one_line(*_run(["teacher", "--data", "ring8", "--out", str(out), "train.iter=5"], capsys),
                     "train.iter", "train.iters")
    _assert_one_line(*_run(["teacher", "--data", "ring8", "--out", str(out), "train.iters=many"], capsys),
                     "train.iters", "integer")
    _assert_one_line(*_run(["teacher", "--data", "ring8", "--out", str(out), "train.batch=0"], capsys),
                     "train.batch")
    assert not out.exists()


def test_missing_and_incomplete_teacher(tmp_path, capsys):
    out = tmp_path / "student"
    missing = tmp_path / "nope"
    _assert_one_line(*_run(["distill", "--teacher", str(missing), "--method", "dmd", "--out", str(out)],
                           capsys), "nope")
    incomplete = tmp_path / "teacher"
    incomplete.mkdir()
    (incomplete / "model.json").write_text('{"format": "fewstep-model", "version": 1}')
    _assert_one_line(*_run(["sample", str(incomplete), "--out", str(tmp_path / "s.png")], capsys),
                     "teacher")
    _assert_one_line(*_run(["eval", str(incomplete)], capsys))
    assert not out.exists() and not (tmp_path / "s.png").exists()


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "run"  # a directory cannot be created under a regular file (even as root)
    _assert_one_line(*_run(["teacher", "--data", "ring8", "--out", str(out), "train.iters=2"], capsys),
                     str(out))


def test_unknown_method_and_extra(tmp_path, capsys):
    _assert_one_line(*_run(["distill", "--teacher", str(tmp_path), "--method", "dmdx", "--out",
                            str(tmp_path / "o")], capsys), "dmdx")


def test_subprocess_exit_code_and_single_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fewstep", "teacher", "--data", "ring9", "--out",
                        str(tmp_path / "r")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr


def test_even_heun_nfe_is_one_line_not_a_traceback(tmp_path, capsys):
    from tests.helpers import save_tiny_teacher

    t = save_tiny_teacher(tmp_path / "t")
    assert main(["sample", str(t), "--nfe", "2", "--n", "4", "--out", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err
    assert "must be odd" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
