"""Plumbing every stage shares, and no method: one-line user errors, the CLI, presets, flag checks,
output-folder guards and locks, atomic files and folders, json and npz hand-offs, the run scaffold of the two trainers (start or resume,
end of step, save; checkpoint folders) and the CUDA speed-ups of no-grad calls. The stages import it; it
imports no stage."""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import datetime
import fcntl
import functools
import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import tyro
from PIL import Image
from accelerate import Accelerator
from accelerate.utils import broadcast, gather_object
from safetensors.torch import load_file, save_file
from tqdm import tqdm


class UserError(Exception):
    """A problem the user can fix (bad file, bad flag). Printed as one line, exit status 2."""


SEED_MAX = 2**32 - 1  # every --seed: numpy and torch take it, with room for the stages' per-sample offsets


def run_cli(main_fn, args_type) -> None:
    """Parse `args_type` with tyro, check the flags, claim the output folders (`Args.outputs`, see
    `claim_outputs`), run `main_fn(args)`; a UserError or a parse error is one line + exit 2."""
    args = parse_cli(args_type)
    with one_line_errors():
        checked = args.resolved() if hasattr(args, "resolved") else args.check()
        with claim_outputs(getattr(checked, "outputs", ())):
            main_fn(args)


@contextlib.contextmanager
def one_line_errors():
    """A UserError raised in the block ends the process as every stage's does: `error: ...`, one line on
    stderr, exit status 2 (the scripts under bench/ run their main in it)."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BORDER = "│├┤╭╮╰╯─┃━┏┓┗┛|+ "  # what tyro draws its error box with (box characters, or ASCII)


def _separator(line: str) -> bool:
    """A blank line, a box edge or a horizontal rule of tyro's error box."""
    return not line.strip(_BORDER + "-=═")


def parse_cli(args_type):
    """`tyro.cli(args_type)`, with tyro's error box (unknown flag, a choice not offered, not a number)
    turned into one line and exit status 2, like every other refusal; --help prints as tyro does."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = tyro.cli(args_type)
    except SystemExit as exc:
        if exc.code not in (0, None):
            print(f"error: {cli_error_line(captured.getvalue())}", file=sys.stderr)
            sys.exit(2)
        sys.stderr.write(captured.getvalue())
        raise
    sys.stderr.write(captured.getvalue())  # tyro's warnings, if any
    return args


def cli_error_line(box: str) -> str:
    """The message of a tyro error box (drawn with box characters or in ASCII) as one line, plus where to
    look for the flags: the box's title and everything after the message's first paragraph dropped."""
    lines = _ANSI.sub("", box).splitlines()
    while lines and _separator(lines[0]):
        lines.pop(0)
    if lines and (lines[0].lstrip().startswith("╭") or (
            len(lines) > 1 and _separator(lines[1]) and re.search(r"[-─━═]{3}", lines[1]))):
        lines.pop(0)  # the title: in the top border, or above a rule
    words = []
    for line in lines:
        if _separator(line):
            if words:
                break
            continue
        words.append(" ".join(line.strip().strip(_BORDER).split()))
    message = " ".join(words).rstrip(". ") or "the command line could not be parsed"
    return f"{message}; check the flags and their values with --help"




def some(items: list) -> str:
    """The first three of `items` for a one-line message, then '...' if there are more."""
    return ", ".join(str(i) for i in items[:3]) + (" ..." if len(items) > 3 else "")


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


# --- output folders: whose they are, who may replace them, one writer at a time -----------------------

RUN_FOLDER = "run folder"  # a run folder holds the stages' folders; it is no stage's output
# Which stage made a folder: the `stage` field of its config or manifest, else (a folder written before
# that field) the marker file below and a key it holds. Data sets, checkpoints and reconstructions come
# several to a folder (data/, <out>_ckpt/, recon/): a folder whose every sub-folder is one of those (of
# one stage) is that stage's too.
STAGE_MARKERS = (  # (file, a key it holds or None, stage, one of several in a folder)
    ("prepare_data.json", None, RUN_FOLDER, False),
    ("posescore_config.json", None, "posescore", False),
    ("model_config.json", "drpose", "finetune", False),
    ("model_config.json", None, "pretrain", False),
    ("drpose_config.json", "drpose", "finetune", False),  # the model config's name before model_config.json
    ("drpose_config.json", None, "pretrain", False),
    ("state.json", "drpose", "finetune", True),  # a checkpoint step_NNNNNN/
    ("state.json", None, "pretrain", True),
    ("manifest.json", "conventions", "prepare_data", True),  # a data set (scans/, drpose/, bench/, ...)
    ("manifest.json", "loader", "prepare_data", False),  # body/
    ("manifest.json", "skeleton", "reconstruct", True),  # recon/<tag>/
    ("manifest.partial.json", "skeleton", "reconstruct", True),  # recon/<tag>/ while it is written
    ("results.json", None, "evaluate", False),
)
STAGE_SCRIPTS = {"prepare_data": "prepare_data.py", "posescore": "posescore.py train", "pretrain": "pretrain.py",
                 "finetune": "finetune.py", "reconstruct": "reconstruct.py", "evaluate": "evaluate.py"}
STAGE_PRODUCTS = {"prepare_data": "data", "posescore": "g_skel (reward or pose reader)",
                  "pretrain": "base or ceiling model", "finetune": "DrPose model", "reconstruct": "reconstruction",
                  "evaluate": "evaluation"}


def _described(stage: str) -> str:
    if stage == RUN_FOLDER:
        return "a run folder (it holds the stages' folders)"
    return f"a {STAGE_PRODUCTS[stage]} folder made by {STAGE_SCRIPTS[stage]}"


def _json_object(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _own_stage(folder: Path, members_only: bool = False) -> tuple[str, bool] | None:
    """(stage, one of several) from the folder's own marker files, or None."""
    for name, key, stage, member in STAGE_MARKERS:
        if members_only and not member:
            continue
        path = folder / name
        if path.is_file():
            obj = _json_object(path)
            if key is None or key in obj:
                recorded = obj.get("stage")  # the field, where the folder was written with it
                return (recorded if recorded in STAGE_SCRIPTS and stage != RUN_FOLDER else stage), member
    return None


def folder_stage(folder: Path) -> str | None:
    """The stage whose product `folder` is (a key of STAGE_SCRIPTS), RUN_FOLDER, or None (no stage's)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    try:
        own = _own_stage(folder)
        if own is not None:
            return own[0]
        children = [_own_stage(child, members_only=True) for child in folder.iterdir()
                    if child.is_dir() and not child.name.endswith(".tmp")]
    except OSError:  # a folder we may not read is no stage's we could replace
        return None
    if not children or None in children:  # a collection holds nothing but its members
        return None
    stages = {stage for stage, _ in children}
    return stages.pop() if len(stages) == 1 else None


def guard_output(path: Path, flag: str, stage: str, whole: bool = True, place_flag: str | None = None) -> None:
    """Refuse an output folder another stage owns, before any work: `path` must lie inside no other stage's
    folder and be new, empty or `stage`'s own product (which the stage then replaces atomically, as
    documented). `whole=False`: a folder the stage only adds to (checkpoints: a run replaces its own
    step_* folders, nothing else), refused only when it holds another stage's. `place_flag`: the flag
    that chose where the folder lies, when not `flag` (reconstruct's --run-dir)."""
    path = Path(path)
    check_output(path, flag)
    for folder in path.resolve().parents:
        owner = folder_stage(folder)
        if owner not in (None, RUN_FOLDER, stage):
            raise UserError(f"{place_flag or flag}: {path} would lie inside {folder}, {_described(owner)}; pass a "
                            f"{place_flag or flag} outside it")
    if not path.is_dir():
        return
    owner = folder_stage(path)
    if owner == stage:
        return
    if owner is not None:
        raise UserError(f"{flag} {path} is {_described(owner)}, which {STAGE_SCRIPTS[stage]} would replace; "
                        f"pass another {flag}")
    if not whole:
        others = {found[0] for found in (_own_stage(child, members_only=True) for child in path.iterdir()
                                         if child.is_dir()) if found and found[0] != stage}
        if others:
            raise UserError(f"{flag} {path} holds checkpoints of {STAGE_SCRIPTS[others.pop()]}, which "
                            f"{STAGE_SCRIPTS[stage]} would replace; pass another {flag}")
        return
    foreign = sorted(p.name for p in path.iterdir() if not p.name.endswith((".tmp", ".lock")))
    unreadable = [name for name in foreign if name in {marker for marker, *_ in STAGE_MARKERS}]
    if unreadable:
        raise UserError(f"{flag} {path}: {path / unreadable[0]} is not a json object of a stage, so whose folder "
                        f"this is cannot be told; delete the folder or pass another {flag}")
    if foreign:
        raise UserError(f"{flag} {path} holds files that no {STAGE_SCRIPTS[stage]} run wrote ({', '.join(foreign[:3])}"
                        f"{' ...' if len(foreign) > 3 else ''}), which it would replace; pass a new or empty folder")


def guard_output_file(path: Path, flag: str) -> None:
    """Refuse an output file that would replace a stage's marker (a manifest or config) or land in a
    model, g_skel or data folder; results files may go into reconstruction and evaluation folders."""
    path = Path(path)
    check_output(path.parent, flag)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a file name such as score.json")
    if path.name in {name for name, *_ in STAGE_MARKERS}:
        raise UserError(f"{flag} {path} would replace a stage's {path.name}; pass another file name")
    for folder in path.resolve().parents:
        owner = folder_stage(folder)
        if owner not in (None, RUN_FOLDER, "reconstruct", "evaluate"):
            raise UserError(f"{flag} {path} lies inside {folder}, {_described(owner)}; pass a path outside it")


def check_name(name: str, flag: str, fix: str = "pass a name such as base or drpose_v2") -> None:
    """A name that becomes one folder under the run folder (--tag, --models): no separators, no '..'."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise UserError(f"{flag} {name!r} is not a plain folder name (no '/', '..' or leading '.'): it must stay "
                        f"inside the run folder; {fix}")


def _lock_holder(handle) -> str:
    try:
        handle.seek(0)
        return handle.read().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def claim_outputs(paths):
    """Hold an exclusive lock (fcntl.flock on `<folder>.lock`, next to it) on each output folder while the
    block runs: a second run writing to one of them is refused in one line instead of racing the first
    for `<folder>.tmp`. The kernel drops a lock whose process dies, even by kill -9, so a stale lock file
    never blocks; a clean exit removes it. Under `accelerate launch` only process 0 claims (it alone writes)."""
    paths = sorted({Path(p) for p in paths})
    if os.environ.get("RANK", "0") != "0" or not paths:
        yield
        return
    held, made = [], []
    try:
        for path in paths:
            made += [p for p in reversed(path.parents) if not p.exists()]
            path.parent.mkdir(parents=True, exist_ok=True)
            held.append(_take_lock(path.with_name(path.name + ".lock"), path))
        yield
    finally:
        for lock_path, handle in reversed(held):
            with contextlib.suppress(OSError):
                lock_path.unlink()  # while still held: a waiting run re-checks the file it locked
            handle.close()
        for folder in reversed(made):  # folders made only to hold a lock file, if nothing else went there
            with contextlib.suppress(OSError):
                folder.rmdir()


def _take_lock(lock_path: Path, folder: Path):
    while True:
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(handle)
            handle.close()
            raise UserError(f"{folder} is being written by another run ({holder}, lock {lock_path}); wait for it "
                            "to finish, or pass another output folder") from None
        try:  # the previous holder may have removed the file between our open and our lock: take the new one
            if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {datetime.datetime.now().isoformat(timespec='seconds')}\n")
    handle.flush()
    return lock_path, handle


# --- what made a folder: recorded in each model folder's config -------------------------------------------

@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The git commit of this code (with '-dirty' when files differ from it), or 'unknown' outside git."""
    repo = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance(args) -> dict:
    """What made a folder besides its flags (which each config records in full), so two runs can be told
    apart: the seed, the command line, the code version and when it started."""
    return dict(seed=getattr(args, "seed", None), command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                code=code_version(), started=datetime.datetime.now().isoformat(timespec="seconds"))


def check_finite_weights(named_tensors, what: Path, fix: str) -> None:
    """Refuse weights holding NaN or Inf when they are loaded (a model trained past a blow-up, a damaged
    file), naming the first such tensor and `fix`."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{what}: the weights hold NaN or Inf ({name}); {fix}")


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
    """Yield `path.tmp/` to fill; it becomes `path/` (replacing an old one) only when complete. The tmp
    folder is flock-ed while it is filled, so a second writer of the same folder is refused in one line
    instead of sharing it; one left by a killed run holds no lock and is cleared."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        with _dir_lock(tmp, path):
            shutil.rmtree(tmp)  # a half-written folder from a killed run
    try:
        tmp.mkdir(parents=True)
    except FileExistsError:  # another writer made it since the check above
        raise UserError(f"{path} is being written by another run ({tmp.name} appeared); wait for it to finish, "
                        "or pass another output folder") from None
    with _dir_lock(tmp, path):  # held until the rename: the lock stays on the folder, not its name
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)


@contextlib.contextmanager
def _dir_lock(folder: Path, target: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{target} is being written by another run (its {folder.name} is locked); wait for it "
                            "to finish, or pass another output folder") from None
        yield
    finally:
        os.close(fd)


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


def read_manifest(folder: Path, made_by: str) -> dict:
    """The manifest.json of a data folder, or a one-line error saying which command makes it."""
    return read_json(Path(folder) / "manifest.json", made_by)


def read_npz(path: Path, expect_keys, made_by: str, count: int | None = None) -> dict:
    """Every array of an npz hand-off, with `expect_keys`, all of one length (`count` when given, its
    manifest's); any failure is one line naming the file and the command that makes it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} is missing; make it with `{made_by}`")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as err:  # zipfile, pickle or value errors all mean the same to a user
        raise UserError(f"{path} is not a readable npz ({type(err).__name__}); re-run `{made_by}`") from None
    missing = [k for k in expect_keys if k not in arrays]
    if missing:
        raise UserError(f"{path} lacks keys {missing}; re-run `{made_by}`")
    if not arrays or len({len(v) if v.ndim else -1 for v in arrays.values()}) != 1:
        raise UserError(f"{path} has no arrays, or arrays of different lengths; re-run `{made_by}`")
    if count is not None and len(next(iter(arrays.values()))) != count:
        raise UserError(f"{path} holds a different count than its manifest.json; re-run `{made_by}`")
    return arrays


def contact_sheet(path: Path, rows: list[np.ndarray]) -> None:
    """A png grid: each row is (V, 3, H, W) uint8 views laid side by side."""
    strips = [np.concatenate(list(row.transpose(0, 2, 3, 1)), axis=1) for row in rows]
    width = max(s.shape[1] for s in strips)
    strips = [np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips]
    with atomic_write(path) as tmp:
        Image.fromarray(np.concatenate(strips, axis=0)).save(tmp, format="png")


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


# --- files that may hold pickles: numpy arrays and plain containers only ---------------------------
# Model pickles (a .pkl, or an .npz's object arrays, which smplx loads with allow_pickle=True) and
# motion .pkl files are unpickled with numpy arrays and plain containers only: a pickle naming any
# other global (os.system, ...) is refused when that name is looked up, before anything can call it.

class RefusedPickle(pickle.UnpicklingError):
    """A pickle naming a global that PlainUnpickler does not allow."""


class PlainUnpickler(pickle.Unpickler):
    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def __init__(self, file, extra=frozenset()):
        super().__init__(file, encoding="latin1")  # latin1: numpy arrays pickled by Python 2
        self.allowed = self.ALLOWED | set(extra)

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise RefusedPickle(f"it names {module}.{name}, which is not a numpy array or plain container")
        return super().find_class(module, name)


# What an official SMPL-X .pkl holds besides arrays: scipy sparse matrices, pickled by Python 2.
SPARSE_PICKLE = {(m, n) for m in ("scipy.sparse.csc", "scipy.sparse._csc", "scipy.sparse.csr", "scipy.sparse._csr")
                 for n in ("csc_matrix", "csr_matrix")}
SPARSE_PICKLE |= {("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"), ("__builtin__", "object"),
                  ("builtins", "object")}


def check_pickles(path: Path, extra=frozenset()) -> None:
    """Unpickle the pickled parts of a .pkl or an .npz with PlainUnpickler (raises RefusedPickle), so that
    a loader that unpickles them after (smplx) meets only what this allowed."""
    if path.suffix == ".pkl":
        with open(path, "rb") as fh:
            PlainUnpickler(fh, extra).load()
        return
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            with archive.open(member) as fh:
                version = np.lib.format.read_magic(fh)
                _, _, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(fh))
                if dtype.hasobject:
                    PlainUnpickler(fh).load()


def read_arrays(path: Path, fix: str):
    """An .npy, .npz or .pkl file's contents: {'': array} for an .npy, {key: array} for an .npz (object
    arrays read as None, never unpickled), whatever PlainUnpickler gives for a .pkl. Any failure is one
    line naming the file, ending in `fix`."""
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".npy":
            return {"": np.load(path, allow_pickle=False)}
        if suffix == ".pkl":
            with open(path, "rb") as fh:
                return PlainUnpickler(fh).load()
        data = {}
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                try:
                    data[key] = npz[key]
                except ValueError as err:
                    if "allow_pickle" not in str(err):
                        raise
                    data[key] = None  # a pickled object: not ours to run
        return data
    except RefusedPickle as err:
        raise UserError(f"{path} was refused: {err}; only pickles of numpy arrays and plain containers are read") \
            from None
    except Exception as err:  # truncated zip or pickle, bad header, object .npy ...
        raise UserError(f"{path} is not a readable {suffix} file ({type(err).__name__}); {fix}") from None


def key_path(path: Path, data, dotted: str, flag: str):
    """The value at a dotted key path (given by `flag`) of a nested file read by `read_arrays`: dict keys,
    list indices and numeric dict keys; a path that stops is refused in one line naming where."""
    node = data
    for step in dotted.split("."):
        found = [k for k in (step, int(step) if step.isdigit() else None) if isinstance(node, dict) and k in node]
        if found or (isinstance(node, (list, tuple)) and step.isdigit() and int(step) < len(node)):
            node = node[found[0] if found else int(step)]
            continue
        there = f"keys {some(sorted(map(str, node)))}" if isinstance(node, dict) else f"a {type(node).__name__}"
        raise UserError(f"{path}: {flag} path {dotted!r} stops at {step!r} ({there} there); fix {flag}")
    return node


def read_scalar(path: Path, arrays: dict, key: str, positive: str | None = None):
    """The one value of a file's key (read by `read_arrays`); with `positive` (what it is), a float > 0."""
    value = arrays[key]
    if value is None or np.size(value) != 1:
        held = "a pickled object" if value is None else f"shape {np.shape(value)}"
        raise UserError(f"{path}: key '{key}' should hold one value, not {held}")
    value = np.asarray(value).reshape(-1)[0]
    value = value.decode() if isinstance(value, bytes) else value
    if positive is None:
        return value
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not (np.isfinite(value) and value > 0):
        raise UserError(f"{path}: '{key}' is {arrays[key]!r}; expected a positive number ({positive})")
    return value


def jsonable(obj):
    """`obj` as plain json types (paths and other objects as strings)."""
    return json.loads(json.dumps(obj, default=str))


# --- the run scaffold of both trainers: start or resume, end of step, save --------------------------
# pretrain.train_base and finetune.drpose differ in their step and agree on everything around it, which
# lives here once: --resume (refused before anything loads when there is nothing to resume), a fresh run
# deleting its own stale step_* folders, the NaN guard, the log line, --max-minutes, checkpoints, the
# final folder written atomically with the metrics log.

class TrainingRun:
    """One training run of `stage` writing `out/` and checkpoints to `<out>_ckpt/step_NNNNNN/`.

    `args` needs steps, resume, max_minutes, log_every, checkpoint_every, keep_checkpoints and device.
    Building it refuses a --resume with nothing to resume (before the caller loads anything) and starts
    the accelerator; `start` resumes or starts fresh, `optimise` is the optimiser step with the NaN guard,
    `end_of_step` logs, checkpoints and keeps the time budget, `finish` writes `out/`. `hook(step)` runs
    after every step and its checkpoint (tests use it to kill a run)."""

    def __init__(self, stage: str, out: Path, args, hook: Callable[[int], None] | None = None, desc: str | None = None):
        self.stage, self.out, self.args, self.hook, self.started = stage, Path(out), args, hook, time.time()
        self.desc = desc or stage
        self.ckpt_root = checkpoint_root(out)
        self.metrics_path = self.ckpt_root / "metrics.jsonl"
        if args.resume and latest_checkpoint(self.ckpt_root) is None:
            raise UserError(f"--resume: no complete checkpoint under {self.ckpt_root}; drop --resume to train from "
                            f"step 0 (which replaces {self.out} when done)")
        self.use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=not self.use_cuda, mixed_precision="bf16" if self.use_cuda else "no")
        self.device, self.rank = self.accelerator.device, self.accelerator.process_index
        self.world, self.is_main = self.accelerator.num_processes, self.accelerator.is_main_process

    def start(self, model, optimizer, params: list, generator: torch.Generator, lr_at: Callable[[int], float],
              expect: dict, record: dict, trainable_only: bool = False, postfix: tuple[str, ...] = ("loss",),
              extras: dict | None = None):
        """Resume from the newest checkpoint (weights, optimizer, this process's RNG) or start fresh, then
        hand model and optimizer to accelerate. `expect`: what must match to resume (a checkpoint that
        differs is refused in one line); `record`: what every checkpoint stores besides; `lr_at(step)`: the
        learning rate; `extras`: more state by name (e.g. an EMA of the weights: anything with state_dict /
        load_state_dict), saved as <name>.pt in every checkpoint and restored on resume. Returns (model,
        optimizer, step) with model and optimizer prepared."""
        step = 0
        found = latest_checkpoint(self.ckpt_root) if self.args.resume else None
        if found is not None:
            step, rng_states = load_checkpoint(found, model, optimizer, expect)
            if step > self.args.steps:
                raise UserError(f"{found} is past --steps {self.args.steps}; raise --steps or pass another --out")
            for name, state in (extras or {}).items():
                state.load_state_dict(torch.load(found / f"{name}.pt", map_location="cpu", weights_only=True))
                state.to(self.device)
            generator.set_state(rng_from_str(rng_states[self.rank]))
            self.accelerator.print(f"resumed from {found} (step {step})")
        elif self.is_main and self.ckpt_root.exists():
            # A fresh run replaces its own old checkpoints, so a later --resume cannot mix the two runs.
            for old in (p for p in self.ckpt_root.glob("step_*") if p.is_dir()):
                shutil.rmtree(old)
        if self.is_main:
            truncate_log(self.metrics_path, step)  # drop lines a killed run logged after its last checkpoint
        model, optimizer = self.accelerator.prepare(model, optimizer)
        self.model, self.optimizer, self.params, self.generator = model, optimizer, params, generator
        self.lr_at, self.trainable_only, self.postfix, self.extras = lr_at, trainable_only, postfix, extras or {}
        self.record = dict(record, resume_key=expect)
        self.step, self.first_step, self.loop_start, self.tick = step, step, time.time(), time.time()
        self.bar = tqdm(total=self.args.steps, initial=step, desc=self.desc,
                        disable=None if self.is_main else True)  # None: a bar on a terminal only
        return model, optimizer, step

    def optimise(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward, gradient clip, the NaN guard, then the optimiser step at `lr_at(step)`. Returns the
        gradient norm before clipping."""
        self.lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        grad_norm = self.accelerator.clip_grad_norm_(self.params, self.args.grad_clip)
        check_finite(self.stage, self.step + 1, loss, grad_norm, self.ckpt_root)
        self.optimizer.step()
        return grad_norm

    def end_of_step(self, step: int, log_line: Callable[[], dict]) -> bool:
        """After the optimiser step that made it `step`: a log line every --log-every steps (tqdm postfix +
        metrics.jsonl; `log_line()` gives the trainer's numbers), a checkpoint every --checkpoint-every
        steps, at the end and when --max-minutes is about to run out. Returns True to stop early."""
        args, self.step = self.args, step
        self.bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            line = dict(step=step, **log_line(), lr=self.lr,
                        sec_per_step=round((time.time() - self.tick) / args.log_every, 4))
            self.bar.set_postfix({k: line[k] for k in self.postfix if k in line})
            if self.is_main:
                append_log(self.metrics_path, line)
            self.tick = time.time()
        stop = step < args.steps and out_of_time(self.started, args.max_minutes, self.loop_start,
                                                 step - self.first_step, self.accelerator)
        if step % args.checkpoint_every == 0 or step == args.steps or stop:
            rng_states = gather_object([rng_to_str(self.generator.get_state())])
            if self.is_main:
                save_checkpoint(self.ckpt_root, step, self.accelerator.unwrap_model(self.model), self.optimizer,
                                rng_states, self.record, args.keep_checkpoints, self.trainable_only,
                                {name: state.state_dict() for name, state in self.extras.items()})
            self.accelerator.wait_for_everyone()
        if self.hook is not None:
            self.hook(step)
        return stop

    def finish(self, step: int, save: Callable[[Path], None]) -> Path:
        """Write `out/` (through `save(tmp_folder)`, with the metrics log) and return it; a run stopped
        by --max-minutes writes nothing and returns its checkpoint folder."""
        self.bar.close()
        if step < self.args.steps:
            self.accelerator.print(f"--max-minutes {self.args.max_minutes}: stopped at step {step}; "
                                   "continue with --resume")
            return self.ckpt_root / f"step_{step:06d}"
        if self.is_main:
            with atomic_dir(self.out) as tmp:
                save(tmp)
                if self.metrics_path.exists():
                    shutil.copy(self.metrics_path, tmp / "metrics.jsonl")
        self.accelerator.wait_for_everyone()
        return self.out


def step_rows(step: int, num: int, batch: int, world: int, rank: int, seed: int) -> torch.Tensor:
    """(batch,) indices this process trains on at `step`: its slice of the global batch of the step's
    epoch permutation, a pure function of (seed, epoch), so a resumed run replays the same data order
    without saving a data-loader state."""
    per_epoch = num // (batch * world)
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed * 100003 + step // per_epoch))
    return perm[: per_epoch * batch * world].reshape(per_epoch, world, batch)[step % per_epoch, rank]


def out_of_time(start: float, max_minutes: float | None, loop_start: float, steps_done: int, accelerator) -> bool:
    """True when one more step would end past the job's wall-clock budget (minutes since `start`), at
    the mean time per step since `loop_start`. Process 0 decides for all."""
    if max_minutes is None or steps_done == 0:
        return False
    now = time.time()
    late = now + (now - loop_start) / steps_done - start > 60 * max_minutes
    if accelerator.num_processes > 1:  # every process must stop at the same step
        late = bool(broadcast(torch.tensor([late], device=accelerator.device), from_process=0).item())
    return late


def append_log(path: Path, line: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(line) + "\n")


def truncate_log(path: Path, step: int) -> None:
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def autocast(device: torch.device):
    """bf16 autocast on CUDA (for the parts accelerate does not wrap, e.g. sampling); none on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# --- checkpoints: one folder per step, written atomically ---------------------------------------------

STEP_DIR = re.compile(r"^step_(\d{6})$")


def checkpoint_root(out: Path) -> Path:
    """Where a trainer writing the model folder `out` keeps its checkpoints: <out>_ckpt/."""
    return Path(str(out) + "_ckpt")


def rng_to_str(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def rng_from_str(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def architecture(config) -> dict:
    """The fields of a diffusers config that make the network, sorted, without diffusers' private
    bookkeeping ('_' keys: `_name_or_path` is a path, `_use_default_values` is in hash-seed order)."""
    return {k: v for k, v in sorted(jsonable(dict(config or {})).items()) if not k.startswith("_")}


def trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def save_checkpoint(root: Path, step: int, model, optimizer, rng_states: list[str], record: dict, keep: int,
                    trainable_only: bool = False, extra_state: dict | None = None) -> Path:
    """<out>_ckpt/step_NNNNNN/: model.safetensors, optimizer.pt, state.json (step, RNG, args,
    versions, model config) and <name>.pt per `extra_state` entry. Written as step_NNNNNN.tmp/ and renamed
    when complete. trainable_only: only the weights that train (LoRA adapters; the frozen base is reloaded
    from its own folder)."""
    folder = Path(root) / f"step_{step:06d}"
    keys = trainable_names(model) if trainable_only else model.state_dict().keys()
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k in keys},
                  tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        for name, state in (extra_state or {}).items():  # e.g. ema.pt: inside the folder, so complete with it
            torch.save(state, tmp / f"{name}.pt")
        write_json(tmp / "state.json", dict(record, step=step, rng=rng_states, unet_config=architecture(model.config),
                                            weights="trainable" if trainable_only else "all"))
    for old in sorted(p for p in Path(root).iterdir() if STEP_DIR.match(p.name))[:-keep]:
        shutil.rmtree(old)
    return folder


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete step_*/ folder (a .tmp folder from a killed write is ignored)."""
    done = [p for p in Path(root).glob("step_*") if STEP_DIR.match(p.name) and (p / "state.json").exists()]
    return max(done, key=lambda p: p.name) if done else None


def load_checkpoint(folder: Path, model, optimizer, expect: dict) -> tuple[int, list[str]]:
    """Restore weights and optimizer in place; return (step, RNG states). A checkpoint made with a
    different network or a different `expect` (data, world size, ...) is refused in one line."""
    fix = f"delete {folder.parent} or pass another --out"
    try:
        state = json.loads((folder / "state.json").read_text())
        weights = load_file(folder / "model.safetensors")
        opt_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{folder} is unreadable ({type(err).__name__}); {fix}") from None
    state = state if isinstance(state, dict) else {}
    step, rng = state.get("step"), state.get("rng")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or STEP_DIR.match(folder.name) is None \
            or int(STEP_DIR.match(folder.name).group(1)) != step:
        raise UserError(f"{folder}/state.json: step {step!r} is not the folder's step number; {fix}")
    if not isinstance(rng, list) or not rng or not all(isinstance(r, str) for r in rng):
        raise UserError(f"{folder}/state.json: 'rng' is not a list of generator states; {fix}")
    check_finite_weights(weights.items(), folder / "model.safetensors",
                         f"delete {folder} to resume from the one before")
    if architecture(state.get("unet_config")) != architecture(model.config):
        raise UserError(f"{folder} is incompatible: it holds a different network (unet_config); {fix}")
    for key, want in jsonable(expect).items():
        if jsonable(state.get("resume_key", {})).get(key) != want:
            raise UserError(f"{folder} is incompatible: its {key} differs from this run's; {fix}")
    partial = state.get("weights") == "trainable"
    if partial and set(weights) != trainable_names(model):
        raise UserError(f"{folder} holds other trainable weights than this model's (adapter rank or targets); {fix}")
    try:
        model.load_state_dict(weights, strict=not partial)
        optimizer.load_state_dict(opt_state)
    except Exception as err:
        raise UserError(f"{folder} does not fit this model ({type(err).__name__}); {fix}") from None
    return step, rng


def check_finite(stage: str, step: int, loss: torch.Tensor, grad_norm, ckpt_root: Path) -> None:
    """The NaN guard, called between backward and the optimizer step: a non-finite loss or gradient
    norm stops the run with the step named, before the weights take the bad step, so the newest
    checkpoint stays the last good one. (One device sync per step.)"""
    if bool(torch.isfinite(loss.detach()).all() & torch.isfinite(torch.as_tensor(grad_norm)).all()):
        return
    last = latest_checkpoint(ckpt_root) if Path(ckpt_root).exists() else None
    raise UserError(f"{stage} stopped at step {step}: loss {float(loss.detach()):.4g}, gradient norm {float(grad_norm):.4g} "
                    f"(not finite); nothing was written past the last good checkpoint ({last or 'none yet'}); "
                    "lower --lr (and --resume) or check the inputs")


# --- speed on CUDA: no-grad calls replayed from CUDA graphs, a bf16 frozen copy ----------------------

def frozen_bf16(model):
    """A frozen copy of `model` whose convolution and linear weights are bf16, what autocast casts them
    to at every call anyway (so under autocast it gives the float32 model's outputs without the
    casts); norms and embeddings stay float32."""
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    for module in frozen.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.to(torch.bfloat16)
    return frozen


class GraphedCall:
    """`fn(model, *inputs)` without grad, replayed from a CUDA graph: a network call's hundreds of kernel
    launches become one. Called like `fn(module, *inputs)`; the first call per input shapes, non-tensor
    inputs and autocast state captures a graph (after two warm-up calls) of `fn(self.model, ...)`; a call
    with any tensor input off the GPU runs `fn(module, *inputs)` eagerly. Weights are read at replay, so
    in-place optimizer steps are seen; `model` is the unwrapped network that `module` runs. Tensor inputs
    that change between calls (a timestep) must be tensors, never Python numbers, or each value captures
    its own graph."""

    def __init__(self, fn: Callable, model, pool=None):
        self.fn, self.model, self.graphs, self.pool = fn, model, {}, pool or torch.cuda.graph_pool_handle()

    def __call__(self, module, *inputs):
        tensors = [x for x in inputs if torch.is_tensor(x)]
        if not tensors or not all(x.is_cuda for x in tensors):
            return self.fn(module, *inputs)
        key = tuple((x.shape, x.dtype) if torch.is_tensor(x) else x for x in inputs) + (
            torch.is_autocast_enabled("cuda"),)
        if key not in self.graphs:
            self.graphs[key] = self.capture(inputs)
        graph, static, out = self.graphs[key]
        for buffer, value in zip(static, tensors):
            buffer.copy_(value)
        graph.replay()
        return out.clone()

    def capture(self, inputs: tuple):
        static = [x.detach().clone() for x in inputs if torch.is_tensor(x)]
        buffers = iter(static)
        call_inputs = [next(buffers) if torch.is_tensor(x) else x for x in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(2):  # lazy initialisation (cuDNN/cuBLAS handles, cached constants) stays out
                self.fn(self.model, *call_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # autocast caches its bf16 casts of trainable weights: clear it, so that the graph holds the
        # casts (redone at each replay, from the current weights) rather than a cached tensor.
        torch.clear_autocast_cache()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(self.model, *call_inputs)
        torch.clear_autocast_cache()
        return graph, static, out
