"""Files in and out, for every stage: atomic outputs and the one strict config loader.

Atomic outputs: a result directory appears whole or not at all, and never outside the output folder.
Config: every stage's settings are a dataclass built by :func:`from_dict` from a YAML/JSON mapping
(:func:`read_yaml_mapping`): unknown keys are refused, types are checked, nested dataclasses recurse, and every
failure is one :class:`CalciscopeError` line naming the file and the key. :func:`save_yaml` writes it back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from calciscope.errors import CalciscopeError


def child_dir(root: str | Path, name: str) -> Path:
    """``root/name`` for an already-sanitised ``name``, refusing anything that would leave ``root``."""
    root = Path(root).resolve()
    path = (root / name).resolve()
    if path.parent != root or name in ("", ".", ".."):
        raise CalciscopeError(f"refusing to write outside {root}: {name!r}")
    return path


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; on success it replaces ``final``, on error it vanishes."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; results are ordinary folders
    except OSError as exc:
        raise CalciscopeError(f"{final.parent}: output directory is not writable ({exc.strerror})") from exc
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks (slides are gigabytes); of a folder (a DICOM series), the sha256
    over the names and sha256s of the files directly in it, in name order (hidden files and subfolders left out)."""
    digest = hashlib.sha256()
    if Path(path).is_dir():
        for child in sorted(Path(path).iterdir()):
            if child.is_file() and not child.name.startswith("."):
                digest.update(child.name.encode("utf-8") + b"\0" + bytes.fromhex(sha256_file(child, chunk_bytes)))
        return digest.hexdigest()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write through a temporary name and a rename: readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """Write JSON through a temporary file and a rename (readers never see half a file). ``indent=None`` writes it
    compact, through json's C encoder (an indent selects its pure-Python one: ~10× slower on a slide's GeoJSON)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    text = json.dumps(obj, indent=indent, separators=None if indent is not None else (",", ":"), default=_jsonable)
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _jsonable(obj: Any):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def read_yaml_mapping(path: str | Path) -> dict:
    """A config file's top-level mapping; a missing file, bad YAML or a non-mapping is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CalciscopeError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise CalciscopeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise CalciscopeError(f"{path}: expected a mapping at the top level")
    return raw


def from_dict(cls, data: dict, where: str):
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses; unknown keys are refused."""
    if not isinstance(data, dict):
        raise CalciscopeError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CalciscopeError(f"{where}: unknown key(s) {unknown} in {cls.__name__}; valid: {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, f"{where}:{key}")
        else:
            kwargs[key] = check_type(value, hint, f"{where}: {cls.__name__.removesuffix('Config').lower()}.{key}")
    return cls(**kwargs)


def check_type(value, hint, where: str):
    """``value`` if it is a ``hint`` (Optional/Union, list[...], dict, Any, int, float, str, bool), else one error line.

    An int is accepted for a float (YAML writes ``1`` for ``1.0``); a bool is never an int.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(value, arg, where)
            except CalciscopeError:
                continue
        raise CalciscopeError(f"{where}: {value!r} is not a {hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise CalciscopeError(f"{where}: expected a list, got {value!r}")
        return [check_type(v, args[0], where) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise CalciscopeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise CalciscopeError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def load_dataclass(cls, path: str | Path):
    """``cls`` built strictly from the YAML/JSON file at ``path`` (errors name the file)."""
    return from_dict(cls, read_yaml_mapping(path), str(path))


def save_yaml(obj: Any, path: str | Path) -> Path:
    """Write a dataclass (or a mapping) as YAML in key order, atomically; the form :func:`read_yaml_mapping` reads."""
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    return write_bytes_atomic(path, yaml.safe_dump(data, sort_keys=False).encode("utf-8"))
