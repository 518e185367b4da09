"""Teachers (issue 2): the exact mixture teacher reproduces ring8 at 35 NFE, a short MLP run
improves its mmd, a UNet teacher trains on digits8, and `fewstep sample` writes every format."""

import json

import numpy as np
import torch

from fewstep.cli import main
from fewstep.core.mixture import MixtureDenoiser
from fewstep.core.sampling import karras_sigmas, sample_heun
from fewstep.data import load_dataset
from fewstep.train.evaluate import metric_space, score_samples
from fewstep.train.generate import load_generator


def test_exact_mixture_teacher_reproduces_ring8_at_35_nfe():
    data = load_dataset("ring8")
    D = MixtureDenoiser(data.mixture)
    z = torch.randn(2500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample_heun(D, 80 * z, karras_sigmas(18))
    m = score_samples(metric_space(data), x.float())
    assert m["modes_covered"] == 8 and m["hq_rate"] > 0.95
    assert m["mmd"] <= 2 * m["mmd_floor"]


def _mmd(run, seed=0):
    gen = load_generator(run)
    x, _ = gen.sample(1000, seed=seed)  # 35-NFE Heun
    return score_samples(metric_space(load_dataset("ring8")), x, with_floors=False)["mmd"]


def test_short_mlp_teacher_improves_mmd_and_samples_in_every_format(tmp_path):
    common = ["--data", "ring8", "--seed", "0", "--no-progress", "model.hidden=64", "model.depth=2",
              "train.batch=256", "train.log_every=10", "train.ema_halflife=0"]
    assert main(["teacher", "--out", str(tmp_path / "t0"), "--iters", "1", *common]) == 0
    assert main(["teacher", "--out", str(tmp_path / "t1"), "--iters", "300", *common]) == 0
    assert _mmd(tmp_path / "t1") < 0.5 * _mmd(tmp_path / "t0")
    log = [json.loads(line) for line in (tmp_path / "t1" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
    for name in ("s.png", "s.npz"):
        assert main(["sample", str(tmp_path / "t1"), "--n", "50", "--nfe", "5", "--out",
                     str(tmp_path / name)]) == 0
    assert np.load(tmp_path / "s.npz")["x"].shape == (50, 2)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_unet_teacher_smoke_on_digits8(tmp_path):
    out = tmp_path / "digits"
    assert main(["teacher", "--data", "digits8", "--out", str(out), "--iters", "3", "--no-progress",
                 "train.batch=8", "model.channels=[8,16]", "train.eval_n=16"]) == 0
    spec = json.loads((out / "model.json").read_text())["spec"]
    assert spec["type"] == "unet" and spec["shape"] == [1, 8, 8]
    assert main(["sample", str(out), "--n", "4", "--nfe", "3", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0
