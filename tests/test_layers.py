"""The layer rule of docs/architecture.md: ``core`` and ``losses`` are math. They never import
``train``, ``config``, ``cli``, logging, ``torch.distributed`` or plumbing (tensorboard,
matplotlib, diffusers), and never open files."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fewstep"
FORBIDDEN = ("fewstep.train", "fewstep.config", "fewstep.cli", "fewstep.bench", "logging",
             "torch.distributed", "torch.utils.tensorboard", "tensorboard", "matplotlib", "diffusers",
             "pickle", "safetensors")
FILES = sorted((SRC / "core").glob("*.py")) + sorted((SRC / "losses").glob("*.py"))


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_math_layers_import_no_plumbing(path):
    tree = ast.parse(path.read_text())
    bad = [n for n in _imports(tree) if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"{path.name} imports {bad}"
    calls = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert "open" not in calls, f"{path.name} opens files"


def test_import_core_is_light():
    import subprocess
    import sys

    code = ("import sys, fewstep.core; "
            "print(any(m.startswith(('diffusers', 'matplotlib')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
