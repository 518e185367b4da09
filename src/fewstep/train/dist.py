"""Multi-process training under torchrun (DESIGN.md "Scale", docs/scaling.md).

One process per device, started by ``torchrun --nproc_per_node N -m fewstep teacher|distill ...``;
rank and world size come from the environment torchrun sets. gloo on CPU, nccl on CUDA. Every
random draw is made for the global batch and sliced to this process (``train/rng.py``), so N
processes give one process's result with the same global batch, up to float summation order.

Gradients: the teacher loop (one forward per backward) uses DistributedDataParallel; the
distillation phases run the student several times per backward (rollouts, regression, extra
samples), so they average ``.grad`` explicitly with :func:`sync_gradients` before each step.
Files are written by rank 0 only (:func:`on_main`); the other ranks wait for it and share its
outcome, so a disk-full error stops every rank with the same message.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist

from fewstep.errors import FewstepError
from fewstep.train.device import resolve_device
from fewstep.train.rng import derive_seed

TORCHRUN_KEYS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BUCKET_NUMEL = 1 << 22  # elements per gradient all-reduce (16 MB in fp32): bounded extra memory
TIMEOUT_S = int(os.environ.get("FEWSTEP_DIST_TIMEOUT", "1800"))


class LaunchError(FewstepError):
    """A mistake in how the processes were launched (environment, batch split, devices)."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_current = {"env": DistEnv(), "device": torch.device("cpu"), "joined": False}


def env() -> DistEnv:
    """The environment of the running training session (single process outside one)."""
    return _current["env"]


def _int(environ, key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise LaunchError(f"{key}={environ[key]!r} is not an integer; launch with torchrun, which "
                          "sets it") from None


def env_from(environ=None) -> DistEnv:
    """Rank and world size from torchrun's variables; one process when ``WORLD_SIZE`` is unset."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        stray = [k for k in ("RANK", "LOCAL_RANK") if k in environ]
        if stray:
            raise LaunchError(f"{stray[0]} is set but WORLD_SIZE is not; launch with 'torchrun "
                              "--nproc_per_node N -m fewstep ...' or unset " + " and ".join(stray))
        return DistEnv()
    world = _int(environ, "WORLD_SIZE")
    if world < 1:
        raise LaunchError(f"WORLD_SIZE={world} must be >= 1")
    if world == 1:
        return DistEnv()
    missing = [k for k in TORCHRUN_KEYS if not environ.get(k)]
    if missing:
        raise LaunchError(f"WORLD_SIZE={world} is set but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not; launch with 'torchrun "
                          f"--nproc_per_node {world} -m fewstep ...' or unset WORLD_SIZE")
    rank, local, port = _int(environ, "RANK"), _int(environ, "LOCAL_RANK"), _int(environ, "MASTER_PORT")
    if not 0 <= rank < world or local < 0:
        raise LaunchError(f"RANK={rank} (LOCAL_RANK={local}) is outside WORLD_SIZE={world}; "
                          "launch with torchrun, which sets them consistently")
    if not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return DistEnv(rank, world, local)


def check_batch(e: DistEnv, global_batch: int, micro_batch: int = 0) -> None:
    """The global batch must split evenly over the processes (each draws the same slice size)."""
    if global_batch % e.world:
        up = (global_batch // e.world + 1) * e.world
        raise LaunchError(f"train.batch={global_batch} does not split over {e.world} processes; use a "
                          f"multiple of {e.world} (e.g. train.batch={up}) or --nproc_per_node dividing "
                          f"{global_batch}")
    if micro_batch < 0:
        raise LaunchError(f"train.micro_batch={micro_batch} must be >= 0 (0 = off)")


def shard(e: DistEnv, global_batch: int, micro_batch: int = 0) -> list[tuple[int, int]]:
    """This process's ``[lo, hi)`` slices of the global batch: one per micro-batch."""
    n = global_batch // e.world
    lo, hi = e.rank * n, (e.rank + 1) * n
    step = micro_batch if 0 < micro_batch < n else n
    return [(a, min(a + step, hi)) for a in range(lo, hi, step)]


def _device_for(e: DistEnv, name: str) -> torch.device:
    device = resolve_device(name)
    if not e.enabled:
        return device
    if device.type == "mps":
        raise LaunchError("multi-process training runs on CPU (gloo) or CUDA (nccl), not mps; "
                          "pass --device cpu")
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if e.local_rank >= n:
            raise LaunchError(f"local rank {e.local_rank} has no GPU (this machine has {n}); use "
                              f"--nproc_per_node {n} or fewer, or --device cpu")
        torch.cuda.set_device(e.local_rank)
        return torch.device("cuda", e.local_rank)
    return device


@contextmanager
def session(device_name: str, global_batch: int, micro_batch: int = 0):
    """Join the process group (if launched by torchrun) for one training run; yields ``(env, device)``.

    Launch mistakes are checked before joining, so every rank fails fast with the same message."""
    e = env_from()
    check_batch(e, global_batch, micro_batch)
    device = _device_for(e, device_name)
    joined = False
    if e.enabled and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            tdist.init_process_group(backend, rank=e.rank, world_size=e.world,
                                     timeout=timedelta(seconds=TIMEOUT_S))
        except (RuntimeError, ValueError) as err:
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LaunchError(f"could not join the process group at {where} ({msg}); check "
                              "MASTER_ADDR/MASTER_PORT or launch with torchrun") from None
        joined = True
    _current.update(env=e, device=device if device.type == "cuda" else torch.device("cpu"),
                    joined=_current["joined"] or joined)
    try:
        yield e, device
        barrier()  # leave together: a rank tearing down its sockets early aborts the others
    finally:
        _current.update(env=DistEnv(), device=torch.device("cpu"))
        if joined and tdist.is_initialized():
            tdist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# collectives (identity in one process)
# ---------------------------------------------------------------------------------------------
def joined_a_group() -> bool:
    """Whether this process ever joined a process group (the CLI then leaves with ``os._exit``:
    gloo's worker threads may still be releasing tensors of finished collectives, which needs the
    GIL, while the interpreter finalises; that aborts the process — seen about once in ten runs on
    torch 2.13 CPU; pytorch/pytorch#179291 describes the mechanism)."""
    return _current["joined"]


def all_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of a float tensor over processes (a new tensor; ``t`` itself when alone)."""
    if not env().enabled:
        return t
    out = t.detach().to(_current["device"], copy=True)
    tdist.all_reduce(out)
    return (out / env().world).to(t.device)


def all_max(value: int) -> int:
    """The largest of one integer per process (e.g. 'a stop signal arrived somewhere')."""
    if not env().enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_current["device"])
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if env().enabled:
        tdist.barrier()


def sync_gradients(params, flags: torch.Tensor) -> torch.Tensor:
    """Average ``.grad`` of ``params`` over processes in place; returns ``flags`` summed.

    Flattened buckets (one all-reduce per ~16 MB, per dtype) instead of one call per tensor. A
    parameter gets a gradient if any process produced one (as a single process would, given the
    whole batch); a missing gradient counts as zero in the mean. ``flags`` (e.g. 'term i was not
    finite here') travel in the same small all-reduce as the has-gradient markers."""
    if not env().enabled:
        return flags
    params, dev, world = list(params), _current["device"], env().world
    has = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64)
    meta = torch.cat([has, flags.double().cpu()]).to(dev)
    tdist.all_reduce(meta)
    meta = meta.cpu()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket]).to(dev)
        tdist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    for p, g, h in zip(params, grads, meta[:len(params)].tolist()):
        p.grad = g if h > 0 else None
    return meta[len(params):].to(flags.dtype)


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive groups of one dtype and at most ``BUCKET_NUMEL`` elements (or one big tensor)."""
    out, cur, size = [], [], 0
    for t in tensors:
        if cur and (t.dtype != cur[0].dtype or size + t.numel() > BUCKET_NUMEL):
            out.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += t.numel()
    return out + ([cur] if cur else [])


def mean_floats(record: dict) -> dict:
    """Average the float values of a log record over processes (keys are the same on every rank,
    since every rank runs the same terms); other values are kept as rank 0 has them."""
    if not env().enabled:
        return record
    keys = sorted(k for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool))
    tag = derive_seed(*keys)
    if all_max(tag) != -all_max(-tag):  # a rank logged other keys: keep rank 0's values, not a mix
        return record
    vals = all_mean(torch.tensor([float(record[k]) for k in keys], dtype=torch.float64)).tolist()
    return {**record, **dict(zip(keys, vals))}


def _broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank (length first, then UTF-8 bytes)."""
    dev = _current["device"]
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=dev)
    n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    tdist.broadcast(n, 0)
    if not env().is_main:
        data = torch.empty(int(n.item()), dtype=torch.uint8, device=dev)
    if int(n.item()):
        tdist.broadcast(data, 0)
    return bytes(data.cpu().tolist()).decode()


def on_main(fn, *args):
    """Run ``fn(*args)`` on rank 0 only (file writes); the other ranks wait for it.

    Rank 0's ``FewstepError`` is raised on every rank with the same message, so all stop cleanly.
    A string result is shared with every rank (e.g. the run-directory status); other results are
    returned on rank 0 only."""
    if not env().enabled:
        return fn(*args)
    result, err, exc = None, "", None
    if env().is_main:
        try:
            result = fn(*args)
        except FewstepError as e:
            err, exc = "E" + str(e), e
        except BaseException as e:
            _broadcast_text(f"Erank 0 failed ({type(e).__name__}: {e})")
            raise
    text = _broadcast_text(err or "R" + (result if isinstance(result, str) else ""))
    if text.startswith("E"):
        raise exc if exc is not None else FewstepError(text[1:])
    return result if env().is_main else (text[1:] or None)
