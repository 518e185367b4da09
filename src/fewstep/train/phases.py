"""The two update phases of a distillation iteration: generator, and critic (fake score + GAN head).

A phase runs over the process's micro-batches (one unless ``train.micro_batch`` is set), sums
``weight * loss.mean()`` over its terms, back-propagates each micro-batch's sum scaled by its share
of the local batch, averages gradients over processes (``dist.sync_gradients``), refuses the
update if any term or gradient is non-finite on any process, then clips and steps. A refused
phase changes nothing: no optimiser steps, and term state (e.g. EL's calibration) is restored.
"""

from __future__ import annotations

import copy

import torch

from fewstep.losses.base import Batch, GenOut
from fewstep.models.lora import set_requires_grad
from fewstep.train import dist, precision
from fewstep.train.control import BadStep
from fewstep.train.ema import ema_beta, ema_update
from fewstep.train.loop import lr_at

GEN, FAKE, DISC = "generator", "fake_score", "discriminator"
CRITIC = "critic"  # the fake score and GAN head share one backward pass, hence one fp16 GradScaler


def set_trainable(run, phase: str) -> None:
    n = run.nets
    set_requires_grad(n.student.G, phase == GEN)
    if n.fake is not None:
        set_requires_grad(n.fake, phase != GEN)
    if n.head is not None:
        n.head.requires_grad_(phase != GEN)


def phase_loss(run, terms, batch: Batch, gen, grad_norms: bool, bad: dict, lam: dict):
    """``(sum of weighted term means, logs)``; non-finite terms are recorded in ``bad`` and left out.

    A calibrating term's weight (``Term.calibrates``: EL's gradient-ratio rule) is computed once per
    update (the first micro-batch) with gradient statistics averaged over processes, and cached
    in ``lam`` for the other micro-batches."""
    total, logs = 0.0, {}
    for term in terms:
        out = term(run.nets, batch, gen)
        w = term.weight
        if term.calibrates:
            if term.name not in lam:
                params = [p for p in run.nets.student.parameters() if p.requires_grad]
                lam[term.name] = term.calibrated_weight(params, total, out.loss.mean(), batch.step,
                                                        all_mean=dist.all_mean)
            w = lam[term.name]
            logs[f"{term.name}_lambda"] = float(w)
        loss = w * out.loss.mean()
        logs.update({k: float(v) for k, v in out.terms.items()})
        logs[f"loss_{term.name}"] = float(loss.detach())
        if not torch.isfinite(loss):
            bad.setdefault(term.name, float(loss.detach()))
            continue
        if grad_norms and gen is not None and gen.x is not None and gen.x.requires_grad:
            logs.update(_grad_norms(term.name, loss, gen))
        total = total + loss
    return total, logs


def _grad_norms(name: str, loss: torch.Tensor, gen: GenOut) -> dict:
    """Norm of a term's gradient on the generator output and on each other output of the rollout
    (``GenOut.aux``, e.g. DP-DMD's first-step prediction: ``gradnorm_<term>_first``)."""
    outs = {"": gen.x, **{f"_{k}": v for k, v in gen.aux.items() if v is not gen.x}}
    grads = torch.autograd.grad(loss, list(outs.values()), retain_graph=True, allow_unused=True)
    return {f"gradnorm_{name}{k}": 0.0 if g is None else float(g.norm()) for k, g in zip(outs, grads)}


def _backward(total, batch: Batch, local_batch: int, scaler=None) -> None:
    """Back-propagate one micro-batch's loss, weighted by its share of the local batch, so the
    summed gradient is that of the mean over the whole local batch (exact for per-sample terms);
    fp16 runs scale it by the phase's GradScaler first (``train/precision.py``)."""
    share = len(batch.z) / local_batch
    loss = total if share == 1 else total * share
    (loss if scaler is None else scaler.scale(loss)).backward()


def clip_and_check(params, max_norm: float, what: str, max_value: float = 0.0,
                   scaled: bool = False) -> None:
    """Clip; a non-finite gradient refuses the step (``BadStep``), except under a GradScaler
    (``scaled``), whose ``step`` skips it and lowers the loss scale instead (fp16 overflow)."""
    params = [p for p in params if p.grad is not None]
    if max_value > 0:  # SiDA clips the critic by value (sid.md section 5)
        torch.nn.utils.clip_grad_value_(params, max_value)
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) if params else 0
    if not scaled and not torch.isfinite(torch.as_tensor(norm)):
        raise BadStep(f"{what} gradient is not finite")


def apply_updates(run, specs, terms, bad: dict, scaler=None) -> None:
    """Average gradients over processes; refuse if a term or gradient is not finite anywhere
    (every process agrees), else clip and step each ``(optimiser name, network, config)``; with a
    GradScaler (fp16) each optimiser's gradients are unscaled before clipping, and an overflow
    skips that optimiser's step and lowers the scale."""
    params = [p for _, net, _ in specs for p in net.parameters() if p.requires_grad]  # LoRA: adapters
    flags = dist.sync_gradients(params, torch.tensor([float(t.name in bad) for t in terms]))
    names = [t.name for t, f in zip(terms, flags.tolist()) if f > 0]
    if names:
        raise BadStep("; ".join(f"term '{n}' is {bad[n]}" if n in bad else
                                f"term '{n}' is not finite on another process" for n in names))
    for name, net, o in specs:  # check everything before stepping anything
        precision.unscale(run.opts[name], scaler)
        clip_and_check(net.parameters(), o.grad_clip, name, o.grad_clip_value, scaler is not None)
    for name, _, o in specs:
        for g in run.opts[name].param_groups:
            g["lr"] = lr_at(o, run.step)
        precision.step(run.opts[name], scaler)
    if scaler is not None:
        scaler.update()


def term_states(run) -> dict:
    return {id(t): copy.deepcopy(t.state_dict()) for m in run.methods for t in m.terms}


def restore_term_states(run, states: dict) -> None:
    for m in run.methods:
        for t in m.terms:
            t.load_state_dict(states[id(t)])


def _as_list(batches):
    return ([batches], True) if isinstance(batches, Batch) else (list(batches), False)


def mean_logs(logs: list[dict]) -> dict:
    """Per-micro-batch logs averaged key by key (some, e.g. EL's calibration, exist only once)."""
    if len(logs) == 1:
        return logs[0]
    keys = dict.fromkeys(k for d in logs for k in d)
    return {k: sum(vals) / len(vals) for k in keys if (vals := [d[k] for d in logs if k in d])}


def _detached(gen: GenOut | None) -> GenOut | None:
    return None if gen is None else GenOut(x=gen.x.detach(), x_T=gen.x_T.detach(), sigma=gen.sigma)


def generator_update(run, batches, log_norms: bool):
    """The generator phase; returns the (detached) samples per micro-batch and the logs.

    ``batches`` is one Batch (returns one sample) or the list of micro-batches."""
    batches, single = _as_list(batches)
    set_trainable(run, GEN)
    terms = run.terms({GEN})
    run.opts[GEN].zero_grad(set_to_none=True)
    saved, gens, logs, bad, lam = term_states(run), [], [], {}, {}
    local, scaler = sum(len(b.z) for b in batches), run.scalers.get(GEN)
    for batch in batches:
        gen = None
        if any(t.uses_sample for t in terms):
            gen = run.rollout(run.nets.student, batch, batch.z)
        total, lg = phase_loss(run, terms, batch, gen, log_norms, bad, lam)
        if not bad:
            _backward(total, batch, local, scaler)
        gens.append(_detached(gen))
        logs.append(lg)
    try:
        apply_updates(run, [(GEN, run.nets.student, run.cfg.optim)], terms, bad, scaler)
    except BadStep:
        restore_term_states(run, saved)
        raise
    _after_generator_step(run)
    return (gens[0] if single else gens), _scale_log(mean_logs(logs), GEN, scaler)


def _scale_log(logs: dict, phase: str, scaler) -> dict:
    """fp16: the phase's loss scale after its update (it halves on each skipped overflow step)."""
    if scaler is not None:
        logs[f"amp_scale_{phase}"] = float(scaler.get_scale())
    return logs


def generator_update_index(schedule, step: int) -> int:
    """0-based index of the generator update made at iteration ``step`` (``step % ratio ==
    gen_offset``): the clock of the student's EMA."""
    return (step - schedule.gen_offset) // schedule.ratio


def _after_generator_step(run) -> None:
    if run.ema is not None:  # half-life and ramp-up count generator updates, the EMA's own steps
        k = generator_update_index(run.cfg.schedule, run.step)
        t = run.cfg.train
        ema_update(run.ema, run.nets.student, ema_beta(k, t.ema_halflife, t.ema_rampup))
    if run.nets.target is not None:
        ema_update(run.nets.target, run.nets.student, run.target_rate)


def critic_update(run, batches, gens=None) -> dict:
    """The critic phase on the generator phase's samples (detached), or on a fresh no-grad rollout
    from the ``z_critic`` stream when the generator did not go first."""
    batches, single = _as_list(batches)
    gens = [gens] if single else (gens or [None] * len(batches))
    terms = run.terms({FAKE, DISC})
    if not terms:
        return {}
    set_trainable(run, FAKE)
    for name in (FAKE, DISC):
        if name in run.opts:
            run.opts[name].zero_grad(set_to_none=True)
    logs, bad, local = [], {}, sum(len(b.z) for b in batches)
    scaler = run.scalers.get(CRITIC)
    for batch, gen in zip(batches, gens):
        if gen is None:
            with torch.no_grad():
                z = batch.rnd.randn("z_critic", *run.data.shape).to(batch.z)
                gen = run.rollout(run.nets.student, batch, z)
        total, lg = phase_loss(run, terms, batch, _detached(gen), False, bad, {})
        if not bad:
            _backward(total, batch, local, scaler)
        logs.append(lg)
    specs = [(name, net, o) for name, net, o in ((FAKE, run.nets.fake, run.cfg.fake_optim),
                                                 (DISC, run.nets.head, run.cfg.disc_optim))
             if name in run.opts]
    apply_updates(run, specs, terms, bad, scaler)
    return _scale_log(mean_logs(logs), CRITIC, scaler)
