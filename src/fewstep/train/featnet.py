"""Train the digits feature network, deterministically (bit-for-bit on one CPU build).

``python -m fewstep.train.featnet [OUT.safetensors] [--seed 0] [--epochs N]`` retrains the shipped
``fewstep/assets/digits_featnet.safetensors`` (+ ``.json``) on the ``digits8`` train split only.
Determinism: every draw comes from generators seeded by ``seed``; one intra-op thread and
``torch.use_deterministic_algorithms(True)`` while training (both restored afterwards).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from fewstep.models.featnet import DigitsFeatNet, default_weights_path, sha256_file

EPOCHS = 60
BATCH = 60
LR = 3e-3
WEIGHT_DECAY = 1e-4
LABEL_SMOOTHING = 0.05


@contextlib.contextmanager
def deterministic_cpu(seed: int) -> Iterator[None]:
    """One thread, deterministic kernels, global RNG seeded by ``seed``; all restored on exit."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(det)
            torch.set_num_threads(threads)


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image ``[B, 1, 8, 8]`` by -1, 0 or +1 px per axis (background -1 fills the edge)."""
    B, _, H, W = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)[:, 0]
    d = torch.randint(0, 3, (B, 2), generator=generator)
    rows = (d[:, 0, None] + torch.arange(H))[:, :, None]
    cols = (d[:, 1, None] + torch.arange(W))[:, None, :]
    return padded[torch.arange(B)[:, None, None], rows, cols][:, None]


@torch.no_grad()
def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Fraction of ``x`` ``[N, 1, 8, 8]`` classified as ``y`` ``[N]``."""
    was_training = net.training
    net.eval()
    hits = sum(int((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    net.train(was_training)
    return hits / len(x)


def _fit(net: DigitsFeatNet, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
         log: Callable[[str], None]) -> None:
    """AdamW + cosine learning rate, label smoothing, random +-1 px shifts."""
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / BATCH)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        running = 0.0
        for i in range(0, len(x), BATCH):
            idx = perm[i:i + BATCH]
            loss = F.cross_entropy(net(random_shift(x[idx], gen)), y[idx], label_smoothing=LABEL_SMOOTHING)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            log(f"epoch {epoch + 1}/{epochs} loss {running / len(x):.4f}")


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` to a temp file in ``path``'s folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _save(net: DigitsFeatNet, out: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    _atomic_write(out, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    meta = {**meta, "sha256": sha256_file(out)}
    text = json.dumps(meta, indent=2) + "\n"
    _atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))


def train_featnet(out_path: str | Path, seed: int = 0, epochs: int = EPOCHS,
                  log: Callable[[str], None] = print) -> dict:
    """Train on the ``digits8`` train split (900 images), write ``out_path`` (.safetensors) and the json
    beside it, and return ``{"test_accuracy", "train_accuracy", "seconds", "sha256"}``."""
    from fewstep.data import load_dataset

    out = Path(out_path)
    data = load_dataset("digits8", conditional=True)
    t0 = time.perf_counter()
    with deterministic_cpu(seed):
        net = DigitsFeatNet()
        _fit(net, data.x_train, data.y_train, epochs, seed, log)
        net.eval()
        test_acc = accuracy(net, data.x_test, data.y_test)
        train_acc = accuracy(net, data.x_train, data.y_train)
    seconds = time.perf_counter() - t0
    meta = {"architecture": {"name": "DigitsFeatNet", **net.config, "feature_dim": net.feature_dim},
            "data": "digits8 train split (900 images; RandomState(0) shuffle, first 900)",
            "seed": seed, "epochs": epochs, "batch": BATCH, "lr": LR, "weight_decay": WEIGHT_DECAY,
            "label_smoothing": LABEL_SMOOTHING, "augmentation": "random shifts of -1/0/+1 px",
            "test_accuracy": test_acc, "train_accuracy": train_acc, "torch": torch.__version__}
    _save(net, out, meta)
    log(f"test accuracy {test_acc:.4f} (897 images), train {train_acc:.4f}, {seconds:.1f} s -> {out}")
    return {"test_accuracy": test_acc, "train_accuracy": train_acc, "seconds": seconds,
            "sha256": sha256_file(out)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Retrain the digits feature network (deterministic).")
    p.add_argument("out", nargs="?", default=str(default_weights_path()), help="output .safetensors path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    a = p.parse_args(argv)
    train_featnet(a.out, seed=a.seed, epochs=a.epochs)


if __name__ == "__main__":
    main()
