"""Plumbing every stage shares, and no method: one-line user errors, the CLI, presets, flag checks,
output-folder guards and locks, atomic files and folders, json and npz hand-offs. The stages import it;
it imports no stage."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import tyro


class UserError(Exception):
    """A problem the user can fix (bad file, bad flag). Printed as one line, exit status 2."""


SEED_MAX = 2**32 - 1  # every --seed: numpy and torch take it, with room for the stages' per-sample offsets


def run_cli(main_fn, args_type) -> None:
    """Parse `args_type` with tyro, check the flags, claim the output folders (`Args.outputs`, see
    `claim_outputs`), run `main_fn(args)`; a UserError or a parse error is one line + exit 2."""
    args = parse_cli(args_type)
    try:
        checked = args.resolved() if hasattr(args, "resolved") else args.check()
        with claim_outputs(getattr(checked, "outputs", ())):
            main_fn(args)
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
    ("drpose_config.json", "drpose", "finetune", False),
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


def _foreign_entries(folder: Path, own_files: tuple[str, ...]) -> list[str]:
    """What a folder holds besides half-written .tmp folders, lock files and the stage's own `own_files`."""
    return sorted(p.name for p in folder.iterdir()
                  if not p.name.endswith((".tmp", ".lock")) and p.name not in own_files)


def guard_output(path: Path, flag: str, stage: str, own_files: tuple[str, ...] = (),
                 place_flag: str | None = None) -> None:
    """Refuse an output folder another stage owns, before any work: `path` must be new, empty or `stage`'s
    own product (which the stage then replaces atomically, as documented), and lie inside no other stage's
    folder. `own_files`: files the stage itself leaves in the folder (a checkpoint folder's metrics.jsonl);
    `place_flag`: the flag that chose where the folder lies, when not `flag` (reconstruct's --run-dir)."""
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
    foreign = _foreign_entries(path, own_files)
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
