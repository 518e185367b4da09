"""Where a run's user data came from, so the run finds it again from any working directory.

model.json's ``data`` section keeps the data set's ``name`` (the file or folder name for user data, the
built-in name otherwise) and, for user data, the resolved absolute ``path`` and a ``sha256`` content
hash. Commands that need the training data again (``eval``, ``distill --teacher``, ``sample``'s
scatter plot) read it back through :func:`recorded_data`, which refuses a moved or changed file with a
one-line :class:`DataError` instead of silently using other data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fewstep.data import loaders as L
from fewstep.errors import DataError

_CHUNK = 1 << 20


def _hash_file(h, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise DataError(f"cannot read {path} to hash it ({e.strerror or e}); check its permissions") from None


def content_hash(path: str | Path) -> str:
    """sha256 hex digest of a data file, or of an image folder: its image files in the loader's order
    (sorted, class subfolders included), each framed by its relative path and size, so renaming,
    adding, removing or editing any image changes the digest while unrelated files do not."""
    path = Path(path)
    h = hashlib.sha256()
    if not path.is_dir():
        _hash_file(h, path)
        return h.hexdigest()
    files, _, _ = L.folder_layout(path)
    for f in files:
        rel = f.relative_to(path).as_posix().encode()
        h.update(len(rel).to_bytes(8, "little") + rel + f.stat().st_size.to_bytes(8, "little"))
        _hash_file(h, f)
    return h.hexdigest()


def source_record(path: str | Path | None) -> dict:
    """``{"path": absolute path, "sha256": digest}`` for user data, ``{}`` for built-in data sets."""
    if path is None:
        return {}
    path = Path(path).resolve()
    return {"path": str(path), "sha256": content_hash(path)}


def recorded_data(data_meta: dict | None, model: str | Path, override: str | None = None) -> str | None:
    """The data set to load for a model: ``override`` (``--data`` / ``data.name``) if given, else the
    recorded absolute path (checked to exist and to hash as recorded), else the recorded name (built-in
    data sets and runs written before paths were recorded). ``None`` if nothing is recorded."""
    if override:
        return override
    data_meta = data_meta or {}
    path = data_meta.get("path")
    if not path:
        return data_meta.get("name") or None
    where = Path(model) / "model.json"
    if not Path(path).exists():
        raise DataError(f"the training data {path} recorded in {where} no longer exists; pass --data PATH "
                        "(data.name=PATH for distill) to point to its new location")
    expected = data_meta.get("sha256")
    if expected:
        actual = content_hash(path)
        if actual != expected:
            raise DataError(f"{path} changed since it was recorded in {where} (sha256 {expected[:16]}... "
                            f"recorded, {actual[:16]}... now); restore it, or pass --data {path} to use "
                            "the changed data deliberately")
    return path
