"""train.time_budget_s: equal wall-clock arms stop on time, export, and a rerun is a no-op."""

import json

from fewstep.cli import main
from tests.helpers import save_tiny_teacher


def test_distill_stops_on_its_time_budget(tmp_path):
    teacher = save_tiny_teacher(tmp_path / "teacher")
    out = tmp_path / "s"
    args = ["distill", "--teacher", str(teacher), "--method", "dmd", "--out", str(out), "--batch", "16",
            "--no-progress", "train.iters=1000000", "train.time_budget_s=1.5", "train.eval_n=50",
            "train.log_every=5"]
    assert main(args) == 0
    meta = json.loads((out / "model.json").read_text())["meta"]
    assert 5 <= meta["iterations"] < 1_000_000 and 1.5 <= meta["train_wall_s"] < 20
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["iteration"] == meta["iterations"] and "mmd" in lines[-1]  # final evaluation
    before = (out / "model.safetensors").read_bytes()
    assert main(args) == 0  # the budget is spent: nothing more is trained
    assert json.loads((out / "model.json").read_text())["meta"]["iterations"] == meta["iterations"]
    assert (out / "model.safetensors").read_bytes() == before
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(lines)  # not even re-evaluated
