"""User data stays found: model.json records the data's absolute path and sha256, `eval` and
`distill --teacher` find it from any working directory, and a moved or changed file is a one-line
error that says what to pass instead."""

import hashlib
import json

import numpy as np
import pytest

from fewstep.cli import main
from fewstep.data import load_dataset
from fewstep.data.provenance import content_hash, recorded_data, source_record
from fewstep.errors import DataError

FAST = ["--no-progress", "--iters", "2", "model.hidden=16", "model.depth=1", "train.batch=16",
        "train.eval_n=40", "train.eval_every=0"]


def _vectors(path, n=200, seed=0):
    x = np.random.RandomState(seed).randn(n, 2).astype(np.float32)
    np.save(path, x)
    return path


def _meta(run):
    return json.loads((run / "model.json").read_text())["meta"]


@pytest.fixture
def teacher(tmp_path, monkeypatch):
    """A teacher trained on data/x.npy given by a path relative to the working directory."""
    (tmp_path / "data").mkdir()
    data = _vectors(tmp_path / "data" / "x.npy")
    monkeypatch.chdir(tmp_path / "data")
    assert main(["teacher", "--data", "x.npy", "--out", str(tmp_path / "t"), *FAST]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return tmp_path / "t", data


def test_teacher_records_absolute_path_and_hash(teacher):
    run, data = teacher
    rec = _meta(run)["data"]
    assert rec["name"] == "x.npy" and rec["path"] == str(data.resolve())
    assert rec["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()


def test_eval_and_distill_from_another_directory(teacher, tmp_path):
    run, data = teacher
    js = tmp_path / "e.json"
    assert main(["eval", str(run), "--n", "20", "--nfe", "3", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["data"] == str(data.resolve())
    student = tmp_path / "s"
    assert main(["distill", "--teacher", str(run), "--method", "dmd", "--out", str(student), *FAST[:3],
                 "--batch", "16", "train.eval_n=40", "train.eval_every=0"]) == 0
    assert _meta(student)["data"]["path"] == str(data.resolve())  # the student records it too
    assert main(["eval", str(student), "--n", "20"]) == 0


def test_moved_file_is_a_clear_error_and_data_overrides(teacher, tmp_path, capsys):
    run, data = teacher
    moved = data.rename(tmp_path / "moved.npy")
    assert main(["eval", str(run), "--n", "20", "--nfe", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(data.resolve()) in err and "--data PATH" in err
    student = tmp_path / "s"
    args = ["distill", "--teacher", str(run), "--method", "dmd", "--out", str(student), "--iters", "2",
            "--batch", "16", "--no-progress", "train.eval_n=40", "train.eval_every=0"]
    assert main(args) == 2
    assert "no longer exists" in capsys.readouterr().err
    assert not student.exists()  # refused before anything was written
    assert main(["eval", str(run), "--n", "20", "--nfe", "3", "--data", str(moved)]) == 0
    assert main([*args, "--data", str(moved)]) == 0
    assert _meta(student)["data"]["path"] == str(moved.resolve())


def test_changed_file_names_both_hashes(teacher, capsys):
    run, data = teacher
    old = hashlib.sha256(data.read_bytes()).hexdigest()
    _vectors(data, seed=1)
    new = hashlib.sha256(data.read_bytes()).hexdigest()
    assert main(["eval", str(run), "--n", "20", "--nfe", "3"]) == 2
    err = capsys.readouterr().err
    assert str(data.resolve()) in err and old[:16] in err and new[:16] in err and "changed" in err
    assert main(["eval", str(run), "--n", "20", "--nfe", "3", "--data", str(data)]) == 0  # deliberate


def _images(folder, n=6, seed=0):
    from PIL import Image

    rng = np.random.RandomState(seed)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            Image.fromarray(rng.randint(0, 255, (8, 8), dtype=np.uint8), "L").save(folder / c / f"{i}.png")
    return folder


def test_every_kind_of_user_data_records_its_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 3), np.float32), y=np.arange(10) % 2)
    (tmp_path / "m.json").write_text(json.dumps({"means": [[0, 0], [1, 1]], "stds": 0.1}))
    (tmp_path / "m.yaml").write_text("means: [[0, 0], [2, 2]]\nstds: 0.2\n")
    _images(tmp_path / "imgs")
    for name in ("d.npz", "m.json", "m.yaml", "imgs", str(tmp_path / "imgs")):
        data = load_dataset(name)
        assert data.path == str((tmp_path / name).resolve())
        rec = source_record(data.path)
        assert rec["path"] == data.path and len(rec["sha256"]) == 64
        assert recorded_data({"name": data.name, **rec}, tmp_path) == data.path
    assert load_dataset("ring8").path is None and source_record(None) == {}
    assert recorded_data({"name": "ring8"}, tmp_path) == "ring8"  # built-in and older runs: the name


def test_folder_hash_covers_the_images_the_loader_reads(tmp_path):
    from PIL import Image

    folder = _images(tmp_path / "imgs")
    h = content_hash(folder)
    (folder / "notes.txt").write_text("not an image")  # the loader ignores it, so does the hash
    assert content_hash(folder) == h
    (folder / "a" / "0.png").rename(folder / "b" / "9.png")  # same bytes, another class: different data
    assert content_hash(folder) != h
    h2 = content_hash(folder)
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(folder / "a" / "1.png")
    assert content_hash(folder) != h2


def test_recorded_data_errors_directly(tmp_path):
    with pytest.raises(DataError, match="no longer exists"):
        recorded_data({"name": "x.npy", "path": str(tmp_path / "x.npy"), "sha256": "0" * 64}, tmp_path)
    f = _vectors(tmp_path / "x.npy")
    with pytest.raises(DataError, match="changed since"):
        recorded_data({"name": "x.npy", "path": str(f), "sha256": "0" * 64}, tmp_path)
    assert recorded_data({"path": str(f)}, tmp_path, override="digits8") == "digits8"
