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


def _code_names(path: Path) -> set[str]:
    """Identifiers and string literals of a file (comments and docstrings left out)."""
    import io
    import tokenize

    names, prev = set(), None
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.NAME:
            names.add(tok.string)
        elif tok.type == tokenize.STRING and prev not in (tokenize.INDENT, tokenize.NEWLINE, None):
            names.update(w.strip("\"'") for w in tok.string.replace(".", " ").split())
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            prev = tok.type
    return names


@pytest.mark.parametrize("path", sorted((SRC / "train").glob("*.py")), ids=lambda p: f"train/{p.name}")
def test_engine_names_no_method(path):
    """A method is sealed (DESIGN.md): the engine reaches methods only through the registry and the
    contract of losses/base.py, so no file in train/ names a registered method or its module."""
    from fewstep.losses import BASES, EXTRAS

    named = sorted((set(BASES) | set(EXTRAS)) & _code_names(path))
    assert not named, f"{path.name} names method(s) {named}"


def test_engine_probes_no_method_attributes():
    """No hasattr/getattr probing of methods or terms in train/: the contract declares every hook."""
    probes = []
    for path in sorted((SRC / "train").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("hasattr", "getattr") and node.args:
                target = ast.unparse(node.args[0])
                if target in ("t", "m", "term", "method", "base") or "methods" in target:
                    probes.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert not probes, probes


def test_no_import_cycle_through_the_cli():
    """Nothing below the CLI imports it (bench/perf used to import private CLI functions)."""
    users = [p for p in SRC.rglob("*.py") if p.name != "cli.py" and p.name != "__main__.py"
             and "fewstep.cli" in _imports(ast.parse(p.read_text()))]
    assert not users, users
