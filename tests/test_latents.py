"""Latent data through a diffusers VAE: `fewstep vae`, scaling, cached encoding, decoding, pixel metrics."""

import json
import math

import numpy as np
import pytest
import torch

from fewstep import metrics as M
from fewstep.cli import main
from fewstep.data import latents as LT
from fewstep.data import load_dataset
from fewstep.errors import DataError
from fewstep.train.evaluate import metric_space, score_samples
from fewstep.train.rng import generator
from fewstep.train.vae import VAETrainConfig, train_vae

TINY = dict(channels=[8, 16, 16], norm_num_groups=8, iters=3, batch=8)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "vae"
    train_vae(VAETrainConfig(data="mnist28", **TINY), out, log=lambda s: None, measure=False)
    return out


@pytest.fixture(scope="module")
def latent(vae_dir):
    return load_dataset("mnist28", conditional=True, vae=str(vae_dir))


def _diffusers_vae(vae_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, low_cpu_mem_usage=False).eval()


def test_scaling_factor_is_one_over_the_training_latent_std(vae_dir, latent):
    """Independently of fewstep's encoder: diffusers' own posterior means of the train split."""
    ref = _diffusers_vae(vae_dir)
    with torch.no_grad():
        means = torch.cat([ref.encode(x).latent_dist.mean for x in latent.pixels.x_train.split(500)])
    assert ref.config.scaling_factor == pytest.approx(1.0 / means.double().std().item(), rel=1e-5)
    assert latent.x_train.double().std().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(latent.x_train, means * ref.config.scaling_factor, atol=1e-5)
    meta = json.loads((vae_dir / "fewstep_vae.json").read_text())
    assert meta["settings"]["channels"] == [8, 16, 16] and meta["latent_shape"] == [4, 7, 7]
    assert meta["scaling_factor"] == pytest.approx(ref.config.scaling_factor)


def test_latent_dataset_shapes_labels_and_decode(vae_dir, latent):
    pixels = load_dataset("mnist28", conditional=True)
    assert (latent.kind, latent.shape, latent.num_classes) == ("image", (4, 7, 7), 10)
    assert latent.x_train.shape == (4500, 4, 7, 7) and latent.x_test.shape == (500, 4, 7, 7)
    assert torch.equal(latent.y_train, pixels.y_train) and torch.equal(latent.y_test, pixels.y_test)
    assert latent.is_latent and torch.equal(latent.pixels.x_test, pixels.x_test)
    rec = latent.latent_record()["vae"]
    assert rec["path"] == str(vae_dir.resolve()) and rec["sha256"] == LT.vae_sha256(vae_dir)
    ref = _diffusers_vae(vae_dir)
    z = latent.x_test[:5]
    with torch.no_grad():
        expect = ref.decode(z / ref.config.scaling_factor).sample
        got = latent.decode(z)
    assert got.shape == (5, 1, 28, 28) and torch.allclose(got, expect, atol=1e-5)
    x, y = latent.train_batch(6, generator("t"))
    assert x.shape == (6, 4, 7, 7) and y.shape == (6,)
    assert not load_dataset("mnist28").is_latent and load_dataset("mnist28").latent_record() == {}


def test_latents_are_cached_beside_the_vae_and_keyed_by_its_hash(vae_dir, latent, monkeypatch, tmp_path):
    files = list((vae_dir / LT.CACHE_DIR).glob("mnist28-*.safetensors"))
    assert len(files) == 1
    calls = []
    real = LT.VAE._encode
    monkeypatch.setattr(LT.VAE, "_encode", lambda self, x: calls.append(len(x)) or real(self, x))
    again = load_dataset("mnist28", vae=str(vae_dir))
    assert calls == [1]  # only the one-image fit check: the 5,000 latents come from the file
    assert torch.equal(again.x_train, latent.x_train)
    # another VAE (a copy with a different scaling factor) gets its own cache entry
    import shutil

    other = tmp_path / "other"
    shutil.copytree(vae_dir, other, ignore=shutil.ignore_patterns(LT.CACHE_DIR))
    cfg = json.loads((other / "config.json").read_text())
    cfg["scaling_factor"] *= 2
    (other / "config.json").write_text(json.dumps(cfg))
    doubled = load_dataset("mnist28", vae=str(other))
    assert sum(calls) > 4000 and torch.allclose(doubled.x_train, 2 * latent.x_train, atol=1e-5)
    assert LT.vae_sha256(other) != LT.vae_sha256(vae_dir)


def test_vae_errors_are_one_line(vae_dir, tmp_path):
    def fails(fn, needle):
        with pytest.raises(DataError) as info:
            fn()
        assert "\n" not in str(info.value) and needle in str(info.value), str(info.value)

    fails(lambda: load_dataset("mnist28", vae=str(vae_dir), vae_sha256="0" * 64), "changed since")
    fails(lambda: load_dataset("mnist28", vae=str(tmp_path / "nope")), "does not exist")
    (tmp_path / "empty").mkdir()
    fails(lambda: load_dataset("mnist28", vae=str(tmp_path / "empty")), "no config.json")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text((vae_dir / "config.json").read_text())
    (tmp_path / "pickled" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    fails(lambda: load_dataset("mnist28", vae=str(tmp_path / "pickled")), "only pickle weights")
    fails(lambda: load_dataset("ring8", vae=str(vae_dir)), "encodes images")
    from diffusers import AutoencoderKL

    rgb = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), norm_num_groups=8)
    rgb.save_pretrained(tmp_path / "rgb")
    fails(lambda: load_dataset("mnist28", vae=str(tmp_path / "rgb")), "3-channel")


def test_score_samples_decodes_latents_and_reports_vae_floors(latent):
    space = metric_space(latent)
    assert space.data is latent.pixels and "decoded by the VAE" in space.name
    n = 50
    z, y = latent.test_samples(n, generator("some latents"))
    out = score_samples(space, z, y)
    pixel_space = metric_space(latent.pixels)
    direct = score_samples(pixel_space, latent.decode(z).detach(), y)
    for k in ("fd", "kid", "precision", "recall", "density", "coverage", "diversity", "fd_floor"):
        assert out[k] == pytest.approx(direct[k], rel=1e-6), k
    assert "fd_vae_floor" not in direct and out["vae"] == str(latent.vae.path)
    # fd_vae_recon by hand: reference test set against its own reconstructions
    ref, _ = latent.pixels.test_samples(n, generator("reference", "mnist28", n))
    z_ref, _ = latent.test_samples(n, generator("reference", "mnist28", n))
    with torch.no_grad():
        by_hand = M.fd(space.features(ref).double(), space.features(latent.decode(z_ref)).double())
    assert out["fd_vae_recon"] == pytest.approx(by_hand, rel=1e-9)
    assert {"fd_vae_floor", "precision_vae_floor", "mmd_vae_floor"} <= set(out)
    # a 3-step VAE reconstructs badly: its floor sits far above the data floor
    assert out["fd_vae_floor"] > 2 * out["fd_floor"]


def test_cli_vae_teacher_eval_sample_on_latents(vae_dir, tmp_path, capsys):
    """`fewstep vae` -> `fewstep teacher --data mnist28 data.vae=DIR` -> eval / sample decode."""
    vae = tmp_path / "vae"
    args = ["vae", "--data", "mnist28", "--out", str(vae), "--iters", "2", "--channels", "8,16,16",
            "--norm-groups", "8", "--batch", "4", "--skip-metrics"]
    assert main(args) == 0
    assert main(args) == 0 and "already holds" in capsys.readouterr().out  # finished: nothing to do
    assert main(args[:-1] + ["--kl-weight", "0.1", "--skip-metrics"]) == 2
    assert "other settings" in capsys.readouterr().err

    t = tmp_path / "teacher"
    assert main(["teacher", "--data", "mnist28", "--out", str(t), "--iters", "5", "--no-progress",
                 f"data.vae={vae}", "model.channels=[16,32]", "train.batch=16", "train.eval_n=20",
                 "sample.nfe=3"]) == 0
    meta = json.loads((t / "model.json").read_text())["meta"]
    assert meta["data"]["shape"] == [4, 7, 7]
    assert meta["data"]["vae"] == {"path": str(vae.resolve()), "sha256": LT.vae_sha256(vae)}
    logged = [json.loads(line) for line in (t / "metrics.jsonl").read_text().splitlines()]
    assert any("fd_vae_floor" in r for r in logged)  # the in-training evaluation decodes too

    capsys.readouterr()
    assert main(["eval", str(t), "--n", "40", "--nfe", "3", "--json", str(tmp_path / "m.json")]) == 0
    table = capsys.readouterr().out
    m = json.loads((tmp_path / "m.json").read_text())
    assert {"fd", "fd_floor", "fd_vae_floor", "fd_vae_recon"} <= set(m) and m["n_samples"] == 40
    assert "decoded by the VAE" in m["metric_space"] and "vae floor" in table

    assert main(["sample", str(t), "--n", "6", "--nfe", "3", "--out", str(tmp_path / "s.npz")]) == 0
    s = np.load(tmp_path / "s.npz")
    assert s["x"].shape == (6, 1, 28, 28) and s["z"].shape == (6, 4, 7, 7)
    assert main(["sample", str(t), "--n", "4", "--nfe", "3", "--out", str(tmp_path / "s.png")]) == 0
    import matplotlib.image

    img = matplotlib.image.imread(tmp_path / "s.png")
    assert img.shape[0] == (2 * 29 + 1) * 4  # a 2x2 grid of decoded 28x28 digits, 4x upscaled

    # a latent teacher distils in latent space; the student records the VAE and evaluates decoded
    s = tmp_path / "student"
    assert main(["distill", "--teacher", str(t), "--method", "dmd", "--out", str(s), "--iters", "2",
                 "--batch", "8", "--no-progress", "train.eval_n=20", "schedule.ratio=1"]) == 0
    smeta = json.loads((s / "model.json").read_text())["meta"]
    assert smeta["data"]["vae"] == meta["data"]["vae"] and smeta["data"]["shape"] == [4, 7, 7]
    assert main(["eval", str(s), "--n", "40", "--json", str(tmp_path / "ms.json")]) == 0
    assert "fd_vae_floor" in json.loads((tmp_path / "ms.json").read_text())

    # Embedding Loss on decoded pixels: the random networks see 1x28x28 images and the gradient
    # reaches the latent student through the decoder
    e = tmp_path / "student-el-pixels"
    assert main(["distill", "--teacher", str(t), "--method", "dmd", "--extra", "el=1", "--out", str(e),
                 "--iters", "2", "--batch", "8", "--no-progress", "train.eval_n=20", "schedule.ratio=1",
                 "train.log_every=1", "el.space=pixels", "el.calib_steps=1", "el.K=1"]) == 0
    lines = [json.loads(x) for x in (e / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("gradnorm_el", 0) > 0 for r in lines), lines
    from fewstep.config import DistillRunConfig, resolve
    from fewstep.losses import el as el_mod
    from fewstep.losses.base import Context

    cfg = resolve(DistillRunConfig, {}, ["el.space=pixels"]).el
    ctx = Context(0.5, (4, 7, 7), 0, "image", 0, 1, decode=lambda z: z, pixel_shape=(1, 28, 28))
    assert el_mod.build(cfg, ctx, 1.0).terms[0].shape == (1, 28, 28)
    ctx.decode = None  # pixel data: the switch changes nothing
    assert el_mod.build(cfg, ctx, 1.0).terms[0].shape == (4, 7, 7)

    # the README's latent flow path in miniature: vae -> teacher --objective flow --vae DIR -> distill -> eval
    # -> report
    ft, fs = tmp_path / "flow-teacher", tmp_path / "flow-student"
    assert main(["teacher", "--data", "mnist28", "--objective", "flow", "--vae", str(vae), "--out", str(ft),
                 "--iters", "3", "--no-progress", "model.channels=[16,32]", "train.batch=16",
                 "train.eval_n=20", "sample.nfe=3"]) == 0
    assert json.loads((ft / "model.json").read_text())["spec"]["objective"] == "flow"
    assert main(["distill", "--teacher", str(ft), "--method", "sid", "--out", str(fs), "--iters", "2",
                 "--batch", "8", "--no-progress", "train.eval_n=20"]) == 0
    assert main(["eval", str(fs), "--n", "20", "--json", str(tmp_path / "fs.json")]) == 0
    assert "fd_vae_floor" in json.loads((tmp_path / "fs.json").read_text())
    assert main(["report", str(ft), str(fs), "--out", str(tmp_path / "report")]) == 0


def test_readme_latent_flow_chain_runs_from_another_directory(vae_dir, tmp_path, monkeypatch, capsys):
    """The README's latent path at CI size: `teacher --objective flow --vae` -> `distill` -> `eval`
    -> `report`, run from a working directory that holds none of the files (relative paths)."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    small = ["train.eval_n=20", "sample.nfe=3"]
    assert main(["teacher", "--data", "mnist28", "--objective", "flow", "--vae", str(vae_dir), "--out",
                 "../t", "--iters", "4", "--no-progress", "model.channels=[16,32]", "train.batch=16",
                 *small]) == 0
    meta = json.loads((tmp_path / "t" / "model.json").read_text())
    assert meta["spec"]["objective"] == "flow" and meta["meta"]["data"]["shape"] == [4, 7, 7]
    assert main(["distill", "--teacher", "../t", "--method", "dmd", "--out", "../s", "--iters", "2",
                 "--batch", "8", "--no-progress", "train.eval_n=20", "schedule.ratio=1"]) == 0
    assert main(["eval", "../s", "--n", "30", "--json", "../s.json"]) == 0
    m = json.loads((tmp_path / "s.json").read_text())
    assert m["n_samples"] == 30 and "fd_vae_floor" in m and math.isfinite(m["fd"])
    assert main(["report", "../t", "../s", "--out", "../report"]) == 0
    page = next((tmp_path / "report").glob("*.md")).read_text()
    assert "fd_vae_floor" in page or "vae floor" in page.lower(), page[:500]
    assert list((tmp_path / "report").rglob("*.png"))  # decoded sample grids
