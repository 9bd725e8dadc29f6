"""Plumbing every stage shares, and no method: one-line user errors, the CLI, presets, flag checks,
atomic files and folders, json and npz hand-offs. The stages import it; it imports no stage."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import tyro


class UserError(Exception):
    """A problem the user can fix (bad file, bad flag). Printed as one line, exit status 2."""


def run_cli(main_fn, args_type) -> None:
    """Parse `args_type` with tyro, run `main_fn(args)`, turn UserError into one line + exit 2."""
    args = tyro.cli(args_type)
    try:
        main_fn(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def with_preset(args, table: dict):
    """A copy of a stage's Args with the preset's value for every field left unset (None)."""
    return dataclasses.replace(args, **{k: v for k, v in table.items() if getattr(args, k) is None})


def check_number(args, name: str, low: float, *, above: bool = False, high: float | None = None,
                 fix: str | None = None) -> None:
    """Refuse `--name` unless it is a finite number >= low (> low with above; <= high when given).
    None (a field left unset that no preset fills) is allowed."""
    value = getattr(args, name)
    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > low if above else value >= low)
    ok = ok and (high is None or value <= high)
    if not ok:
        bound = (f"> {low}" if above else f">= {low}") + (f" and <= {high}" if high is not None else "")
        flag = "--" + name.replace("_", "-")
        raise UserError(f"{flag} {value} is out of range: it must be {bound}; {fix or f'pass {flag} {bound}'}")


def check_device(device: str, allow_auto: bool = False) -> None:
    """Refuse a --device torch cannot parse, or CUDA where there is none."""
    if allow_auto and device == "auto":
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device} is not a torch device; pass cpu or cuda"
                        + (" (or auto)" if allow_auto else "")) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; pass --device cpu")


def check_output(path: Path, flag: str) -> None:
    """Refuse an output folder that cannot be made: a file in its place or above it, or no write access."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"{flag} {path}: {folder} is a file, not a folder; pass another {flag}")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise UserError(f"{flag} {path}: {folder} is not writable; pass another {flag}")
            return


def run_relative(path, run_dir: Path) -> str | None:
    """`path` relative to the run folder, however either is spelled (relative, absolute, through a
    symlink): what checkpoints and manifests store, so a moved or respelled run folder still matches."""
    if path is None:
        return None
    return os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())


@contextlib.contextmanager
def atomic_write(path: Path):
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield `path.tmp/` to fill; it becomes `path/` (replacing an old one) only when complete."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # a half-written folder from a killed run
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (np.ndarray, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj))


def write_json(path: Path, obj) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def save_npz(path: Path, **arrays) -> None:
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def read_json(path: Path, made_by: str) -> dict:
    """A json object file (manifest, model config), or a one-line error naming it and the command that makes it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} is missing; make it with `{made_by}`")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise UserError(f"{path} is not valid json ({type(err).__name__}); re-run `{made_by}`") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a json {type(obj).__name__}, not an object; re-run `{made_by}`")
    return obj


def read_npz_key(path: Path, key: str, made_by: str, shape: tuple | None = None) -> np.ndarray:
    """One finite float32 array of a small npz hand-off (a sample's views.npz, joints.npz), checked
    against `shape` (None entries match any size); any failure is one line naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} is missing; make it with `{made_by}`")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if key not in npz.files:
                raise UserError(f"{path} lacks key '{key}'; re-run `{made_by}`")
            array = npz[key]
    except UserError:
        raise
    except Exception as err:  # a truncated or foreign file means the same to a user
        raise UserError(f"{path} is not a readable npz ({type(err).__name__}); re-run `{made_by}`") from None
    if array.dtype.kind not in "fiu" or (shape is not None and (
            array.ndim != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)))):
        want = "x".join("?" if n is None else str(n) for n in shape) if shape else "numeric"
        raise UserError(f"{path}: '{key}' is {array.dtype} {tuple(array.shape)}, expected {want}; re-run `{made_by}`")
    if not np.isfinite(array).all():
        raise UserError(f"{path}: '{key}' has NaN or Inf; re-run `{made_by}`")
    return array.astype(np.float32)
