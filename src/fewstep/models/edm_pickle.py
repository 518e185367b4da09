"""Read NVlabs/edm and NVlabs/edm2 network pickles as data, never as code (specs/edm_checkpoints.md).

An EDM snapshot is ``pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=...))``
(EDM2: a ``dnnlib.EasyDict`` with ``ema``, ``encoder``, ``loss_fn``, ``dataset_kwargs``). Every network
class is a *persistent class* (``torch_utils/persistence.py``): it pickles as
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta = dict(type='class', version,
module_src, class_name, state)``, and a normal unpickle ``exec``s ``module_src``. Here a restricted
unpickler resolves only the globals such a file references, maps the reconstructor to a function that
returns ``meta`` as data, and refuses any other global before anything is called. fewstep then builds
its own network from ``class_name`` + ``state['_init_kwargs']`` and loads the tensors found in the
nested ``_parameters`` / ``_buffers`` strictly, after checking that every submodule's class and scalar
settings agree with what fewstep built.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch

from fewstep.errors import ModelError
from fewstep.models.edm_precond import SPEC_TYPES, build_edm_denoiser, spec_from_init_kwargs

try:  # numpy >= 2 (numpy.core is a deprecated alias there)
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray

PERSISTENT = ("torch_utils.persistence", "_reconstruct_persistent_obj")
REFUSAL_HINT = ("fewstep reads EDM/EDM2 network pickles as data and never runs pickled code; give an EDM "
                "snapshot, or weights as safetensors")


class PersistentMeta(dict):
    """The ``meta`` dict of one persistent object (``class_name``, ``state``, ...), kept as data."""


class _Frozen(type):
    """A stand-in class a pickle cannot modify (BUILD with slot state would ``setattr`` on it)."""

    def __setattr__(cls, name, value):
        raise pickle.UnpicklingError(f"the pickle tries to modify the class {cls.__name__}")


class _Container(metaclass=_Frozen):
    """Stand-in for ``torch.nn.ModuleList`` / ``ModuleDict``: records the pickled ``__dict__``."""

    class_name = "Module"
    state: dict | None = None  # NEWOBJ calls __new__ only; BUILD then calls __setstate__

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state for {self.class_name}")
        self.state = state


class ModuleList(_Container):
    class_name = "ModuleList"


class ModuleDict(_Container):
    class_name = "ModuleDict"


def _reconstruct_persistent_obj(meta):
    """Replaces EDM's reconstructor: the class's source is never compiled, the meta dict is returned."""
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str) \
            or not isinstance(meta.get("state"), dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("malformed persistent-object record")
    return PersistentMeta(meta)


def _load_storage(data):
    """``torch.storage._load_from_bytes``: the bytes are a legacy ``torch.save`` of one storage."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("tensor storage is not bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("tensor storage bytes do not hold a storage")
    return storage


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` with its argument types checked; hooks/metadata dropped."""
    ints = all(isinstance(v, int) for v in (offset, *size, *stride)) if isinstance(size, tuple) \
        and isinstance(stride, tuple) else False
    if not isinstance(storage, torch.storage.TypedStorage) or not ints or len(size) != len(stride):
        raise pickle.UnpicklingError("malformed tensor record")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = torch.empty((0,), dtype=storage.dtype)
        return t.set_(storage._untyped_storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("malformed parameter record")
    return data


# Exactly the globals an EDM / EDM2 snapshot references (spec section 1), each mapped to a data-only
# stand-in or to a constructor that cannot run code.
ALLOWED = {
    PERSISTENT: _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch.nn.modules.container", "ModuleList"): ModuleList,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _np_multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _np_multiarray.scalar,
    ("numpy.core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED`; any other global raises :class:`ModelError` naming it."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        target = ALLOWED.get((module, name))
        if target is None:
            raise ModelError(f"{self.path}: refused to load the global '{module}.{name}' (not part of an "
                             f"EDM network pickle); {REFUSAL_HINT}")
        return target

    def persistent_load(self, pid):
        raise ModelError(f"{self.path}: refused a persistent id (a torch.save file, not an EDM snapshot); "
                         f"{REFUSAL_HINT}")


def read_pickle(path: str | Path):
    """The data tree of an EDM pickle (persistent objects as :class:`PersistentMeta`)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, path).load()
    except ModelError:
        raise
    except OSError as e:
        raise ModelError(f"cannot read {path} ({e.strerror or e})") from None
    except Exception as e:  # truncated / malformed streams raise many types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path} is truncated or not an EDM network pickle ({msg})") from None


# --- the recovered tree ---------------------------------------------------------------------------
def find_network(tree, path: Path) -> PersistentMeta:
    """The denoiser in a snapshot: its ``ema`` entry (or the pickle itself if it is one network)."""
    if isinstance(tree, PersistentMeta):
        return tree
    if isinstance(tree, dict) and isinstance(tree.get("ema"), PersistentMeta):
        return tree["ema"]
    keys = sorted(map(str, tree)) if isinstance(tree, dict) else type(tree).__name__
    raise ModelError(f"{path} holds no EDM network (found {keys}); expected an EDM/EDM2 snapshot with an "
                     "'ema' network")


def _state(node, where: str) -> tuple[str, dict]:
    if isinstance(node, PersistentMeta):
        return node["class_name"], node["state"]
    if isinstance(node, _Container):
        return node.class_name, node.state or {}
    raise ModelError(f"unexpected {type(node).__name__} where a module belongs ({where or 'top'})")


def flatten(root: PersistentMeta) -> tuple[dict[str, str], dict[str, torch.Tensor], dict[str, dict]]:
    """-> (module path -> class name, state-dict key -> tensor, module path -> its state), with
    ``nn.Module.state_dict`` naming (``None`` entries and non-persistent buffers skipped)."""
    classes, tensors, states = {}, {}, {}
    stack = [("", root)]
    while stack:
        where, node = stack.pop()
        classes[where], state = _state(node, where)
        states[where] = state
        prefix = f"{where}." if where else ""
        skip = state.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            for name, t in (state.get(group) or {}).items():
                if t is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(t, torch.Tensor):
                    raise ModelError(f"{prefix}{name} is a {type(t).__name__}, not a tensor")
                tensors[prefix + name] = t
        for name, child in (state.get("_modules") or {}).items():
            if child is not None:
                stack.append((prefix + name, child))
    return classes, tensors, states


def _plain(v):
    """numpy / tuple / OrderedDict values -> JSON-able Python values."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict) and not isinstance(v, PersistentMeta):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def _same(a, b) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == b or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


SCALARS = (bool, int, float, str, np.generic, type(None), list, tuple)


def check_structure(D: torch.nn.Module, classes: dict[str, str], states: dict[str, dict]) -> None:
    """Every module path, class name and recorded scalar setting of the pickle equals fewstep's."""
    ours = {name: getattr(type(m), "EDM_CLASS", type(m).__name__) for name, m in D.named_modules()}
    for where in sorted(set(ours) | set(classes)):
        label = where or "the top level"
        if where not in ours:
            raise ModelError(f"module '{where}' ({classes[where]}) of the pickle has no counterpart in "
                             "fewstep's network built from its arguments")
        if where not in classes:
            raise ModelError(f"the pickle lacks module '{where}' ({ours[where]}) that its arguments imply")
        if classes[where] != ours[where]:
            raise ModelError(f"unsupported class '{classes[where]}' at {label} (fewstep builds "
                             f"'{ours[where]}' there)")
        module = D.get_submodule(where)
        for key, value in states[where].items():
            ours_value = getattr(module, key, None)
            if key.startswith("_") or key == "training" or not isinstance(value, SCALARS) \
                    or not hasattr(module, key) or isinstance(ours_value, (torch.Tensor, torch.nn.Module)):
                continue  # tensors and submodules are compared by the strict state-dict load
            if not _same(value, ours_value):
                raise ModelError(f"{label}.{key} is {_plain(value)!r} in the pickle but "
                                 f"{_plain(ours_value)!r} in fewstep's network (an EDM variant fewstep "
                                 "does not implement)")


def _init_kwargs(net: PersistentMeta) -> dict:
    state = net["state"]
    args, kwargs = state.get("_init_args"), state.get("_init_kwargs")
    if args:
        raise ModelError(f"{net['class_name']} was built with positional arguments; fewstep reads keyword "
                         "arguments only")
    if not isinstance(kwargs, dict):
        raise ModelError(f"{net['class_name']} records no constructor arguments (_init_kwargs)")
    return _plain(kwargs)


def _provenance(tree, net: PersistentMeta, path: Path, spec: dict) -> dict:
    pk = spec["precond_kwargs"]
    shape = [pk["img_channels"], pk["img_resolution"], pk["img_resolution"]]
    meta = {"source": "edm-pickle", "path": str(path), "class_name": net["class_name"],
            "model_type": SPEC_TYPES[spec["type"]],
            "data": {"shape": shape, "num_classes": int(pk["label_dim"])}}
    if isinstance(tree, dict):
        dk = tree.get("dataset_kwargs")
        if isinstance(dk, dict):
            meta["edm_dataset_kwargs"] = {k: _plain(v) for k, v in dk.items()
                                          if isinstance(_plain(v), (str, int, float, bool, type(None)))}
        enc = tree.get("encoder")
        if isinstance(enc, PersistentMeta):  # EDM2: StandardRGBEncoder (pixels) or StabilityVAEEncoder
            meta["edm2_encoder"] = enc["class_name"]
    return meta


def load_edm_pickle(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """An EDM / EDM2 ``.pkl`` -> (fewstep denoiser in eval mode with the checkpoint's weights, meta)."""
    path = Path(path)
    tree = read_pickle(path)
    net = find_network(tree, path)
    try:
        spec = spec_from_init_kwargs(net["class_name"], _init_kwargs(net))
        D = build_edm_denoiser(spec)
        classes, tensors, states = flatten(net)
        check_structure(D, classes, states)
        _load_strict(D, tensors)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
    return D.eval(), _provenance(tree, net, path, D.spec)


def _load_strict(D: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    from fewstep.models.io import _state_diff

    diff = _state_diff(D.state_dict(), tensors)
    if diff:
        raise ModelError(f"its weights do not match the network its arguments describe ({diff})")
    D.load_state_dict(tensors, strict=True)  # copies (and casts fp16 EDM2 weights) into float32
