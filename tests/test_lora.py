"""LoRA students and fake scores (issue 21; models/lora.py, peft).

* a LoRA student starts as the teacher (B = 0) and only its adapters are trainable / in the optimiser;
* training moves the adapters and never the frozen copy of the teacher's weights;
* the export merges the adapters: the model directory has the teacher's keys, loads as a plain
  student, and samples what the LoRA network samples;
* the adapter count is r (d_in + d_out) per Linear (+ r (c_in k^2 + c_out) per Conv2d);
* the UNet (Conv2d) path, and bad ranks as one-line config errors.
(Bit-for-bit resume of a LoRA run: tests/test_resume.py, case dmd_lora.)
"""

import json

import pytest
import torch

from fewstep.cli import main
from fewstep.models.io import load_model
from fewstep.recipe import distill_config
from fewstep.train.distill import build_run, train_iteration
from fewstep.train.phases import GEN
from tests.helpers import save_tiny_teacher

pytest.importorskip("peft")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "t")


def _run(teacher, *overrides):
    cfg = distill_config(str(teacher), "dmd", overrides=["train.batch=16", "schedule.ratio=1",
                                                         "train.ema_halflife=0", *overrides])
    return build_run(cfg, CPU)


def _adapter_names(net):
    return {n for n, p in net.named_parameters() if p.requires_grad}


def test_lora_student_starts_as_the_teacher_and_trains_only_its_adapters(teacher):
    run = _run(teacher, "student.lora_rank=4", "fake.lora_rank=2")
    G, fake, T = run.nets.student.G, run.nets.fake, run.nets.teacher
    x, sigma = torch.randn(32, 2), torch.full((32,), 2.0)
    with torch.no_grad():
        assert torch.equal(G(x, sigma, None), T(x, sigma, None))  # B = 0: the teacher exactly
        assert torch.equal(fake(x, sigma, None), T(x, sigma, None))
    for net in (G, fake):
        names = _adapter_names(net)
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    in_opt = {id(p) for g in run.opts[GEN].param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in G.parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in G.named_parameters() if not p.requires_grad}
    for _ in range(3):
        logs = train_iteration(run)
        assert "refused_step" not in logs, logs
    after = dict(G.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())  # the copy of the teacher stays
    assert any(after[n].abs().max() > 0 for n in after if ".lora_B." in n)  # the adapters moved


def test_adapter_count_is_rank_times_fan_in_plus_fan_out(teacher):
    run, r = _run(teacher, "student.lora_rank=3"), 3
    G = run.nets.student.G
    want = 0
    for m in G.modules():
        base = m.get_base_layer() if hasattr(m, "get_base_layer") else None
        if isinstance(base, torch.nn.Linear):
            want += r * (base.in_features + base.out_features)
    assert want > 0 and sum(p.numel() for p in G.parameters() if p.requires_grad) == want


def test_export_merges_the_adapters_into_a_plain_student(teacher, tmp_path):
    out = tmp_path / "s"
    assert main(["distill", "--teacher", str(teacher), "--method", "dmd", "--out", str(out), "--iters", "4",
                 "--batch", "16", "--no-progress", "train.eval_n=50", "schedule.ratio=1",
                 "student.lora_rank=2", "student.lora_alpha=4", "train.ema_halflife=0"]) == 0
    meta = json.loads((out / "model.json").read_text())["meta"]
    assert meta["lora"] == {"rank": 2, "alpha": 4.0}
    plain, _ = load_model(out)  # strict load: the teacher's own keys, no lora_A / base_layer
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
    from fewstep.train import checkpoint as ckpt

    last = ckpt.checkpoint_paths(out / "checkpoints")[-1]
    run = _run(teacher, "student.lora_rank=2", "student.lora_alpha=4")
    run.nets.student.load_state_dict(ckpt.load_checkpoint(last)["student"])
    x, sigma = torch.randn(64, 2), torch.full((64,), 1.5)
    with torch.no_grad():
        lora_out, merged_out = run.nets.student.G(x, sigma, None), plain(x, sigma, None)
        base_out = run.nets.teacher(x, sigma, None)
    assert torch.allclose(lora_out, merged_out, atol=1e-5)
    assert (lora_out - base_out).abs().max() > 1e-4  # the merge carried a trained, non-zero update

    # the adapters alone (peft format) on a fresh copy of the teacher give the same network
    from peft import set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    fresh = _run(teacher, "student.lora_rank=2", "student.lora_alpha=4").nets.student.G
    set_peft_model_state_dict(fresh, load_file(str(out / "lora_adapters.safetensors")))
    with safe_open(str(out / "lora_adapters.safetensors"), "pt") as f:
        assert f.metadata()["rank"] == "2" and "target_modules" in f.metadata()
    with torch.no_grad():
        assert torch.allclose(fresh(x, sigma, None), merged_out, atol=1e-5)


def test_unet_student_gets_conv_adapters(tmp_path):
    spec = {"type": "unet", "shape": [1, 8, 8], "block_out_channels": [8, 16], "layers_per_block": 1,
            "num_classes": 0, "sigma_data": 0.5}
    t = save_tiny_teacher(tmp_path / "unet", spec=spec,
                          data={"name": "digits8", "kind": "image", "shape": [1, 8, 8], "num_classes": 0})
    run = _run(t, "student.lora_rank=2", "train.eval_n=20")
    G = run.nets.student.G
    kinds = {type(m.get_base_layer()).__name__ for m in G.modules() if hasattr(m, "lora_A")}
    assert kinds == {"Conv2d", "Linear"}
    full = sum(p.numel() for p in G.parameters() if not p.requires_grad)
    assert sum(p.numel() for p in G.parameters() if p.requires_grad) < 0.5 * full
    assert "refused_step" not in train_iteration(run)


@pytest.mark.parametrize("bad", ["student.lora_rank=-1", "fake.lora_rank=1.5"])
def test_bad_rank_is_a_one_line_error(teacher, tmp_path, capsys, bad):
    code = main(["distill", "--teacher", str(teacher), "--method", "dmd", "--out", str(tmp_path / "x"),
                 "--iters", "2", "--no-progress", bad])
    err = capsys.readouterr().err
    assert code == 2 and "lora_rank" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
