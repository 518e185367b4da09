"""`fewstep teacher --vae DIR` (flow_and_latent.md section 2): the documented spelling of data.vae=DIR,
recorded absolute, and a clean exit-2 error for a folder that is not a diffusers VAE."""

import json
import shutil

import pytest
import yaml

from fewstep.cli import main
from fewstep.errors import DataError
from fewstep.recipe import teacher_config
from fewstep.train.vae import VAETrainConfig, build_vae


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """An untrained tiny AutoencoderKL saved by diffusers (the flag only checks the folder)."""
    out = tmp_path_factory.mktemp("vaes") / "vae"
    cfg = VAETrainConfig(channels=[8, 16, 16], norm_num_groups=8)
    build_vae(cfg, 1, 28).save_pretrained(str(out), safe_serialization=True)
    return out


def _dry_run(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["teacher", "--data", "mnist28", "--out", "t", "--dry-run", *args]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_vae_flag_is_data_vae_and_records_the_path_absolute(vae_folder, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(vae_folder, work / "runs" / "vae")
    monkeypatch.chdir(work)
    flag = _dry_run(capsys, "--vae", "runs/vae", "--objective", "flow")
    key = _dry_run(capsys, "--objective", "flow", "data.vae=runs/vae")
    assert flag == key
    assert flag["data"]["vae"] == str((work / "runs" / "vae").resolve())
    assert flag["model"]["objective"] == "flow"
    assert teacher_config("mnist28", vae="runs/vae") == teacher_config("mnist28", ["data.vae=runs/vae"])
    # --vae wins over data.vae, as the other flags win over their keys
    assert _dry_run(capsys, "--vae", "runs/vae", "data.vae=elsewhere")["data"]["vae"] == flag["data"]["vae"]
    # a pipeline folder with a vae/ subfolder is a VAE folder too (recorded as given, absolute)
    shutil.copytree(vae_folder, work / "pipe" / "vae")
    assert _dry_run(capsys, "--vae", "pipe")["data"]["vae"] == str((work / "pipe").resolve())
    assert _dry_run(capsys)["data"]["vae"] == ""  # no VAE: pixel space, as before


def _bad_folders(root, vae_folder):
    (root / "empty").mkdir()
    unet = root / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(vae_folder / "config.json", pickled / "config.json")
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"")
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    return {"missing": (root / "nope", "does not exist"), "empty": (root / "empty", "no config.json"),
            "unet": (unet, "UNet2DModel model, not a VAE"), "pickled": (pickled, "safetensors only"),
            "broken": (broken, "cannot read")}


@pytest.mark.parametrize("case", ["missing", "empty", "unet", "pickled", "broken"])
@pytest.mark.parametrize("spelling", ["flag", "key"])
def test_a_folder_that_is_not_a_vae_is_one_line_exit_2(vae_folder, tmp_path, capsys, case, spelling):
    path, why = _bad_folders(tmp_path, vae_folder)[case]
    arg = ["--vae", str(path)] if spelling == "flag" else [f"data.vae={path}"]
    capsys.readouterr()
    assert main(["teacher", "--data", "mnist28", "--out", str(tmp_path / "t"), "--dry-run", *arg]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and why in err and err.count("\n") == 1, err
    assert not (tmp_path / "t").exists()
    with pytest.raises(DataError, match=why):
        teacher_config("mnist28", vae=str(path))


@pytest.mark.slow  # ~15 s: encodes mnist28 once and computes the VAE floors
def test_eval_samples_with_vae_scores_decoded_latents(vae_folder, tmp_path, capsys):
    """`eval --samples Z --vae DIR` decodes the latents and scores pixels: the same fd as the decoded
    images given as pixel samples, plus the VAE floors a latent model's evaluation carries."""
    import numpy as np

    from fewstep.data.datasets import load_dataset

    latent = load_dataset("mnist28", vae=str(vae_folder))
    z = latent.x_test[:40]
    x = latent.decode(z).detach()
    np.savez(tmp_path / "z.npz", x=x.numpy(), z=z.numpy())  # the layout of `fewstep sample --out f.npz`
    np.savez(tmp_path / "x.npz", x=x.numpy())
    run = ["eval", "--data", "mnist28", "--json"]
    assert main([*run, str(tmp_path / "mz.json"), "--samples", str(tmp_path / "z.npz"), "--vae",
                 str(vae_folder)]) == 0
    assert main([*run, str(tmp_path / "mx.json"), "--samples", str(tmp_path / "x.npz")]) == 0
    mz, mx = (json.loads((tmp_path / f).read_text()) for f in ("mz.json", "mx.json"))
    assert mz["n_samples"] == mx["n_samples"] == 40 and mz["fd"] == pytest.approx(mx["fd"], rel=1e-6)
    assert "fd_vae_floor" in mz and "fd_vae_floor" not in mx and mz["vae"] == str(vae_folder.resolve())
    capsys.readouterr()
    assert main([*run, str(tmp_path / "bad.json"), "--samples", str(tmp_path / "x.npz"), "--vae",
                 str(vae_folder)]) == 2  # pixels are not latents
    err = capsys.readouterr().err
    assert "the VAE's latents are [4, 7, 7]" in err and err.count("\n") == 1, err
    assert main(["eval", str(tmp_path), "--vae", str(vae_folder)]) == 2  # a model records its VAE
    assert "--vae goes with --samples" in capsys.readouterr().err
