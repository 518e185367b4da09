"""LoRA students and fake scores (Hu et al. 2022, eq. 3; DMD2's ``--generator_lora``), through peft.

A copy of the teacher gets a rank-r adapter on every ``nn.Linear`` and ``nn.Conv2d``:
``W x + (alpha / r) B A x`` with ``A`` random and ``B = 0`` (so the copy starts as the teacher, as a
full-parameter student does) and the copy's own weights frozen. What it saves is what a full student
costs beyond its weights: gradients and AdamW's two moments for every teacher-sized parameter
(docs/scaling.md, the memory model); the adapters add ``r (d_in + d_out)`` parameters per layer.

Exports merge the adapters into the weights (``merged``: a plain module with the teacher's own
state-dict keys, loadable by everything that reads a full student) and can also write the adapters
alone (``adapter_state_dict``, peft's key names).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fewstep.errors import ConfigError
from fewstep.train.rng import derive_seed

ADAPTED = (nn.Linear, nn.Conv2d)  # the layer types peft's LoRA wraps that fewstep's networks use


def lora_targets(net: nn.Module) -> list[str]:
    """Qualified names of the layers that get an adapter (every Linear and Conv2d)."""
    return [name for name, m in net.named_modules() if isinstance(m, ADAPTED) and name]


def add_lora(net: nn.Module, rank: int, alpha: float, seed: int, what: str) -> nn.Module:
    """Inject rank-``rank`` adapters into ``net`` in place and freeze its own weights.

    ``A``'s random initialisation is drawn from a generator of its own (``seed``, ``what``), so the
    adapters are the same in a fresh run and a resumed one and no other random stream moves."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError(f"{what}.lora_rank needs peft: pip install peft (or pip install "
                          "'fewstep[lora]')") from None
    targets = lora_targets(net)
    if not targets:
        raise ConfigError(f"{what}.lora_rank={rank}: the network has no Linear or Conv2d layer to adapt; "
                          f"set {what}.lora_rank=0")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, lora_dropout=0.0,
                        init_lora_weights=True)
    net.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "lora", what))
        inject_adapter_in_model(config, net)  # marks only the adapters trainable
    net.fewstep_lora = {"rank": rank, "alpha": float(alpha or rank)}
    return net


def adapted_layers(net: nn.Module) -> list[str]:
    """Qualified names of ``net``'s layers that carry an adapter (peft's LoRA layers)."""
    return [name for name, m in net.named_modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")]


def is_lora(net: nn.Module) -> bool:
    return hasattr(net, "fewstep_lora")


def set_requires_grad(net: nn.Module, flag: bool) -> None:
    """``net.requires_grad_(flag)``, except that a LoRA network's frozen weights stay frozen."""
    if not is_lora(net):
        net.requires_grad_(flag)
        return
    for name, p in net.named_parameters():
        if ".lora_" in name:  # peft's adapter parameters: lora_A / lora_B
            p.requires_grad_(flag)


def trainable(net: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimiser updates (all of them for a full network, the adapters for LoRA)."""
    return [p for p in net.parameters() if p.requires_grad]


def merged(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every adapter merged (``W + (alpha/r) B A``) and the LoRA layers replaced
    by their base layers: the plain network, with the teacher's state-dict keys."""
    if not is_lora(net):
        return net
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(net)
    wrapped = [(name, m) for name, m in out.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, m in wrapped:
        m.merge()
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, m.get_base_layer())
    del out.fewstep_lora
    return out


ADAPTER_WEIGHTS = "lora_adapters.safetensors"


def save_adapters(net: nn.Module, out) -> None:
    """The adapters alone beside an export, in peft's format (``...lora_A.weight`` keys of ``net``'s
    module names; rank, alpha and the adapted layers in the file's metadata), so they can be loaded
    onto another copy of the teacher with peft's ``set_peft_model_state_dict``."""
    import json

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in get_peft_model_state_dict(net).items()}
    meta = {**{k: str(v) for k, v in net.fewstep_lora.items()},
            "target_modules": json.dumps(adapted_layers(net))}
    save_file(state, str(out), metadata=meta)
