"""Stage 1 of DrPose: the body model, poses, the renderer and the datasets.

    python prepare_data.py --preset demo            # embedded world, CPU, about two minutes
    python prepare_data.py --preset full            # paper-sized sets (15K pairs, 60 + 30 bench subjects)
    python prepare_data.py --body-model ~/models/smplx --gender female   # a real SMPL-X folder, same code
    python prepare_data.py --pose-source files --pose-files ~/amass/CMU   # real motion for drpose/

The paper's DrPose15K recipe on a folder of real motion files (any mix of the layouts below):
1500 anchors by farthest-point sampling, each with 9 temporal neighbours = 15K pairs. The paper
does not state the neighbours' spacing; ours is --neighbour-spacing 1/15 s (every 2nd frame at a
video rate of 30 fps, as the generated pool has always used), whatever each file's own rate:

    python prepare_data.py --preset full --run-dir runs/drpose15k --pose-source files \
        --pose-files ~/motion --num-anchors 1500 --neighbours 9

Motion files (--pose-layout auto tells them apart; POSE_LAYOUTS writes each down once):
    layout       file  pose array           frame rate                   up  hands
    amass-smplh  .npz  poses (F, 156)       mocap_framerate              z   absolute
    amass-smplx  .npz  poses (F, 165)       mocap_frame_rate             z   absolute
    motionx      .npy  the array (F, 322)   none: pass --fps             y   relative to the mean
    smpl72       .npz  poses (F, 72), or    fps / mocap_framerate        y   none (relaxed)
                 .npy  global_orient + body_pose
    aistpp       .pkl  smpl_poses (F, 72)   60 fps (AIST++'s)            y   none (relaxed)
Every file is read and checked before anything is written: values, frame rate, and the body posed
upright (head above pelvis along +y in most frames; --up auto tries the layout's axis, then y, z,
-y, and prints its choice). A bad file stops the run with one line naming it, exit status 2.

Writes, under the run folder (default runs/demo/):
    body/SMPLX_NEUTRAL.npz      the embedded mannequin as an SMPL-X model file (stock `smplx` loads it);
                                with --body-model, only a manifest.json naming the user's file
    data/scans/                 scan-like poses rendered in six views (the base model's training set);
                                their spread is calibrated so DrPose's is 1.73x theirs, as in the paper
    data/drpose/                DrPose15K-style (pose, single front image) pairs; no multi-view images
    data/drpose_gt/             six-view GT renders of exactly the DrPose pairs: the supervised
                                ceiling's data only (DrPose never reads it; --no-ceiling skips it)
    data/bench/                 the benchmark, with GT meshes and six-view GT renders, in two splits
                                (key `split`): `dynamic`, held-out frames of the motion family DrPose
                                trains on, far from the scans (MixamoRP's role), then `extreme`, hard-pose
                                templates no training set covers; held-out outfits and shapes in both

This file owns the conventions every later stage uses: joint order and bones, cameras, image
encoding, the renderer, file checks and atomic writes. Later stages import them from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    """Build the body model and the three datasets."""

    preset: Literal["demo", "full"] = "demo"
    """demo: CPU-sized sets at 32 px; full: the paper's sizes at 64 px (fields below left at their
    defaults take the preset's value)"""
    run_dir: Path = Path("runs/demo")
    """the run folder every stage reads and writes"""
    body_model: Path | None = None
    """a real SMPL-X folder (models/smplx of the official download: SMPLX_<GENDER>.npz, or .pkl where
    it loads without chumpy); default: export the mannequin"""
    gender: Literal["neutral", "male", "female"] = "neutral"
    """which model of the --body-model folder"""
    pose_source: Literal["generated", "files"] = "generated"
    """where drpose/ poses come from: our motion generator, or motion files (--pose-files)"""
    pose_files: Path | None = None
    """a motion file or a folder tree of them (.npz, .npy, .pkl), with --pose-source files"""
    pose_layout: Literal["auto", "amass-smplh", "amass-smplx", "motionx", "smpl72", "aistpp"] = "auto"
    """the files' layout (POSE_LAYOUTS); auto tells them apart by file type, keys and width"""
    up: Literal["auto", "y", "z", "-y"] = "auto"
    """the files' world up axis; auto: the layout's own, else the first of y, z, -y under which the
    body stands upright in most checked frames (printed); -y is camera coordinates (y down)"""
    fps: float | None = None
    """the files' frame rate, overriding theirs (needed where a file carries none, e.g. Motion-X)"""
    neighbour_spacing: float = 1 / 15
    """seconds between an anchor's temporal neighbours (1/15 s: every 2nd frame at 30 fps)"""
    resolution: int | None = None
    """view resolution in pixels (demo 32, full 64)"""
    num_scans: int | None = None
    """scan-like subjects for the base model and g_skel (demo 240, full 3000)"""
    num_val_scans: int | None = None
    """held-out scan-like subjects (demo 24, full 200)"""
    num_anchors: int | None = None
    """DrPose anchor poses chosen by farthest-point sampling (demo 48, full 1500)"""
    neighbours: int = 9
    """temporal neighbours each anchor brings (paper: 9, so 1.5K x 10 = 15K pairs)"""
    num_bench_dynamic: int | None = None
    """bench split `dynamic`: held-out frames of the broad motion family, far from the scans (demo 24,
    full 60)"""
    num_bench_extreme: int | None = None
    """bench split `extreme`: hard-pose templates no training set covers (demo 12, full 30)"""
    pose_pool_clips: int | None = None
    """broad-motion clips in the pool FPS selects from (demo 64, full 1200)"""
    ceiling: bool = True
    """render six-view GT of the DrPose poses for the supervised ceiling (data/drpose_gt/);
    --no-ceiling skips it"""
    seed: int = 0
    """one seed for every random choice in this stage"""
    device: str = "cpu"
    """torch device for rendering"""

    def resolved(self) -> "Args":
        """The preset's values for every field left unset (an explicit flag always wins), checked."""
        table = PRESETS[self.preset]
        return with_preset(self, table).check()

    def check(self) -> "Args":
        """Every flag, before any work (one line and exit status 2 for the first bad one)."""
        for name in ("num_scans", "num_val_scans", "num_anchors", "num_bench_dynamic", "num_bench_extreme",
                     "pose_pool_clips"):
            check_number(self, name, 1)
        check_number(self, "neighbours", 0)
        check_number(self, "seed", 0)
        check_resolution(self.resolution)
        check_args(self)  # the pose-file flags and how they fit together
        if self.body_model is not None and not self.body_model.is_dir():
            raise UserError(f"--body-model {self.body_model} is not a folder; pass a folder holding "
                            "SMPLX_NEUTRAL.npz or .pkl, or leave it out to export the mannequin")
        check_device(self.device)
        check_output(self.run_dir, "--run-dir")
        return self


def with_preset(args, table: dict):
    """A copy of a dataclass of CLI args with the preset's value for every field left unset (None);
    an explicit flag always wins. Every stage's `Args.resolved` uses it."""
    return dataclasses.replace(args, **{k: v for k, v in table.items() if getattr(args, k) is None})


PRESETS = {
    "demo": dict(resolution=32, num_scans=240, num_val_scans=24, num_anchors=48, num_bench_dynamic=24,
                 num_bench_extreme=12, pose_pool_clips=64),
    "full": dict(resolution=64, num_scans=3000, num_val_scans=200, num_anchors=1500, num_bench_dynamic=60,
                 num_bench_extreme=30, pose_pool_clips=1200),
}


# --- errors, atomic files, manifests (every stage uses these) ------------------------------------

class UserError(Exception):
    """A problem the user can fix (bad file, bad flag). Printed as one line, exit status 2."""


# --- flag checks: each stage's `Args.check` (called by `resolved`, before any work) uses these ----

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


TOKEN_GRID_PX = 8  # views are cut into 8 x 8 patch tokens by the base model (pretrain.TOKEN_GRID)


def check_resolution(resolution: int | None, flag: str = "--resolution") -> None:
    if resolution is not None and (resolution < TOKEN_GRID_PX or resolution % TOKEN_GRID_PX):
        raise UserError(f"{flag} {resolution} must be a positive multiple of {TOKEN_GRID_PX} (the base model's "
                        f"token grid); pass e.g. {flag} 32")


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


def run_cli(main_fn, args_type) -> None:
    """Parse `args_type` with tyro, run `main_fn(args)`, turn UserError into one line + exit 2."""
    args = tyro.cli(args_type)
    try:
        main_fn(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


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


def write_json(path: Path, obj) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (np.ndarray, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj))


def save_npz(path: Path, **arrays) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def read_manifest(folder: Path, made_by: str) -> dict:
    """The manifest of a data folder, or a one-line error saying which command makes it."""
    return read_json(Path(folder) / "manifest.json", made_by)


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


def load_split(path: Path, expect_keys=(), made_by: str = "python prepare_data.py") -> dict:
    """Arrays of one npz hand-off file, checked against its folder's manifest.json."""
    path = Path(path)
    manifest = read_manifest(path.parent, made_by)
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
    count = manifest.get("files", {}).get(path.name)
    if count is not None and len(next(iter(arrays.values()))) != count:
        raise UserError(f"{path} holds a different count than its manifest.json; re-run `{made_by}`")
    check_arrays(path, arrays, manifest, made_by)
    return arrays


def check_arrays(path: Path, arrays: dict, manifest: dict, made_by: str) -> None:
    """Arrays read from `path`: finite floats, and shapes and dtypes that follow the conventions and
    the manifest's views and resolution (e.g. joints (N, 55, 3), colour (N, V, 3, H, W) uint8)."""
    for key, value in arrays.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise UserError(f"{path}: key '{key}' has NaN or Inf; re-run `{made_by}`")
    views, res = manifest.get("views"), manifest.get("resolution")
    if views is not None and list(views) != list(VIEW_AZIMUTHS):
        raise UserError(f"{path.parent / 'manifest.json'} lists views {views}, this code uses "
                        f"{list(VIEW_AZIMUTHS)}; re-run `{made_by}`")
    expect = {k: ("f",) + shape for k, shape in POSE_KEYS.items()} | {"joints": ("f", NUM_JOINTS, 3),
              "image": ("u", 3, res, res), "color": ("u", NUM_VIEWS, 3, res, res),
              "normal": ("u", NUM_VIEWS, 3, res, res)}
    for key, (kind, *shape) in expect.items():
        value = arrays.get(key)
        if value is None:
            continue
        if value.dtype.kind != kind or value.ndim != 1 + len(shape) or \
                any(want is not None and got != want for got, want in zip(value.shape[1:], shape)):
            want = ", ".join("?" if n is None else str(n) for n in shape)
            raise UserError(f"{path}: '{key}' is {value.dtype} {tuple(value.shape)}, expected (N, {want}) "
                            f"{'uint8' if kind == 'u' else 'float'}"
                            f"{' at the manifest resolution' if res and key in ('image', 'color', 'normal') else ''}; "
                            f"re-run `{made_by}`")


# --- conventions: joints, bones, cameras, image encoding ------------------------------------------

NUM_JOINTS = 55  # SMPL-X: 22 body, jaw, 2 eyes, 2 x 15 finger joints (smplx.joint_names order)
NUM_BODY_JOINTS = 22
SMPLX_PARENTS = (
    -1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19,  # body
    15, 15, 15,  # jaw, left eye, right eye
    20, 25, 26, 20, 28, 29, 20, 31, 32, 20, 34, 35, 20, 37, 38,  # left index/middle/pinky/ring/thumb
    21, 40, 41, 21, 43, 44, 21, 46, 47, 21, 49, 50, 21, 52, 53,  # right hand, same order
)
# Skeleton maps have one channel per bone: the edges of the SMPL-X body tree (K = 21).
BONES = tuple((SMPLX_PARENTS[j], j) for j in range(1, NUM_BODY_JOINTS))
BONE_GROUPS = {
    "torso": [k for k, (_, j) in enumerate(BONES) if j in (3, 6, 9, 13, 14)],
    "head": [k for k, (_, j) in enumerate(BONES) if j in (12, 15)],
    "left_leg": [k for k, (_, j) in enumerate(BONES) if j in (1, 4, 7, 10)],
    "right_leg": [k for k, (_, j) in enumerate(BONES) if j in (2, 5, 8, 11)],
    "left_arm": [k for k, (_, j) in enumerate(BONES) if j in (16, 18, 20)],
    "right_arm": [k for k, (_, j) in enumerate(BONES) if j in (17, 19, 21)],
}

VIEW_AZIMUTHS = (0, 45, 90, 180, 270, 315)  # PSHuman's six body views, degrees
NUM_VIEWS = len(VIEW_AZIMUTHS)
ORTHO_HALF_EXTENT = 1.1  # metres: every view spans [-1.1, 1.1] m in x and y around the subject
BACKGROUND = 1.0  # white, for colour and for encoded normals ((1,1,1) is no unit normal)


def view_rotations(device=None, dtype=torch.float32, azimuths=VIEW_AZIMUTHS) -> torch.Tensor:
    """(V, 3, 3) world -> camera rotations. The camera orbits the y axis; azimuth 0 sits on +z
    looking at the person's front, azimuth 90 on +x (the person's left side)."""
    mats = []
    for azimuth in azimuths:
        a = math.radians(azimuth)
        # camera position (sin a, 0, cos a); its x axis (cos a, 0, -sin a), y up, z toward camera.
        mats.append([[math.cos(a), 0.0, -math.sin(a)], [0.0, 1.0, 0.0], [math.sin(a), 0.0, math.cos(a)]])
    return torch.tensor(mats, device=device, dtype=dtype)


def world_to_views(points: torch.Tensor, azimuths=VIEW_AZIMUTHS) -> torch.Tensor:
    """(B, P, 3) world points -> (B, V, P, 3) camera coordinates (x right, y up, z toward camera)."""
    rot = view_rotations(points.device, points.dtype, azimuths)
    return torch.einsum("vij,bpj->bvpi", rot, points)


def views_to_pixels(cam_points: torch.Tensor, resolution: int) -> torch.Tensor:
    """(..., 3) camera coordinates -> (..., 2) continuous pixel coordinates (u right, v down;
    pixel (i, j) covers [j, j+1) x [i, i+1), its centre at j + 0.5)."""
    scale = resolution / (2 * ORTHO_HALF_EXTENT)
    u = (cam_points[..., 0] + ORTHO_HALF_EXTENT) * scale
    v = (ORTHO_HALF_EXTENT - cam_points[..., 1]) * scale
    return torch.stack([u, v], dim=-1)


def views_to_latents(color: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """colour and encoded normal (B, V, 3, H, W) in [0, 1] -> view latents (B, V, 6, H, W) in [-1, 1]."""
    return torch.cat([color, normal], dim=2) * 2 - 1


def latents_to_views(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `views_to_latents`: (colour, encoded normal), each (B, V, 3, H, W) in [0, 1]."""
    images = ((latents + 1) / 2).clamp(0, 1)
    return images[:, :, :3], images[:, :, 3:]


MASK_THRESHOLD = 0.8  # a pixel is foreground when its encoded normal's smallest channel is below this
# (a unit normal has a component <= 1/sqrt(3), so encoded <= 0.79; white background is 1; 0.8 best
# matches the renders' coverage >= 0.5 masks on the demo bench: 99% of pixels agree)


def views_mask(latents: torch.Tensor) -> torch.Tensor:
    """(..., 6, H, W) view latents -> (..., H, W) {0, 1} foreground, read off the normal channels (the
    background's encoded normal is (1, 1, 1), which no unit normal has)."""
    normal = (latents[..., 3:, :, :] + 1) / 2
    return (normal.amin(-3) < MASK_THRESHOLD).float()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def from_uint8(images: np.ndarray, device=None) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).float() / 255


# --- the body model: the mannequin written as an SMPL-X model file --------------------------------
# mannequin-x 0.3.0 is pinned because the export reads its private arrays: the skinned mesh, the
# top-4 skinning weights, the rest joints and the relaxed hand mean (`Mannequin._identity`,
# `_skin_joint_indices`, `_skin_weights`, `_calibration.hand_mean`). Its joint tree is SMPL-X's with
# jaw and eyes left out and two zero-length "hand" joints at the wrists; MANNEQUIN_TO_SMPLX maps it.

MANNEQUIN_TO_SMPLX = tuple(range(22)) + (20, 21) + tuple(range(25, 55))
MANNEQUIN_SHAPE_STEP = 1.0  # shapedirs are central differences over +-1 of each shape coefficient


def _mannequin_rest(shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rest vertices (N, 3) and rest joints (55, 3) of the mannequin for ten shape coefficients."""
    from mannequin import Mannequin

    figure = Mannequin("wooden", shape=shape.astype(np.float32))
    bind = figure._identity["skin_bind_positions"].astype(np.float64)  # (54, 3) mannequin order
    joints = np.zeros((NUM_JOINTS, 3))
    for m, s in enumerate(MANNEQUIN_TO_SMPLX):
        joints[s] = bind[m]
    head = joints[15]
    # The mannequin has no jaw or eyes; put them where a head has them. Nothing is skinned to them.
    joints[22], joints[23], joints[24] = head + (0, -0.03, 0.06), head + (0.03, 0.05, 0.08), head + (-0.03, 0.05, 0.08)
    return figure._identity["skin_vertices"].astype(np.float64), joints


def _joint_regressor(rest_vertices, rest_joints, vertex_dirs, joint_dirs, neighbours=256) -> np.ndarray:
    """(55, N) regressor with rows summing to 1 that returns the rest joints exactly, and follows
    the joints' own motion under each shape direction as closely as the local vertices allow."""
    from scipy.linalg import null_space

    regressor = np.zeros((NUM_JOINTS, len(rest_vertices)))
    for j in range(NUM_JOINTS):
        near = np.argsort(np.linalg.norm(rest_vertices - rest_joints[j], axis=1))[:neighbours]
        # Hard constraints: weights sum to 1 and reproduce the rest joint (exact for shape 0).
        exact = np.concatenate([np.ones((1, neighbours)), rest_vertices[near].T])
        exact_rhs = np.concatenate([[1.0], rest_joints[j]])
        base = np.linalg.pinv(exact) @ exact_rhs
        free = null_space(exact)  # (neighbours, neighbours - 4): moves that keep them exact
        # Soft: under every shape direction the regressed joint moves as the mannequin's does.
        shape_rows = np.concatenate([vertex_dirs[near, :, k].T for k in range(vertex_dirs.shape[-1])])
        shape_rhs = np.concatenate([joint_dirs[j, :, k] for k in range(joint_dirs.shape[-1])])
        lhs = (shape_rows @ free).T @ (shape_rows @ free) + 1e-6 * np.eye(free.shape[1])
        step = np.linalg.solve(lhs, (shape_rows @ free).T @ (shape_rhs - shape_rows @ base))
        regressor[j, near] = base + free @ step
    return regressor


def export_mannequin_smplx(path: Path) -> dict:
    """Write the wooden mannequin as an SMPL-X-format npz that `smplx.create` loads unchanged.

    Shape space: the mannequin's own ten SMPL-X-calibrated shape coefficients, linearised by
    central differences into `shapedirs` (the mannequin resizes bones non-linearly; the
    linearisation error at |beta| = 1 is returned and written into the manifest). Pose-corrective
    blend shapes are zero: the mannequin has none. Returns facts for the manifest.
    """
    from mannequin import Mannequin

    figure = Mannequin("wooden")
    rest_vertices, rest_joints = _mannequin_rest(np.zeros(10))
    num_vertices = len(rest_vertices)
    vertex_dirs = np.zeros((num_vertices, 3, 10))
    joint_dirs = np.zeros((NUM_JOINTS, 3, 10))
    for k in range(10):
        step = np.zeros(10)
        step[k] = MANNEQUIN_SHAPE_STEP
        v_plus, j_plus = _mannequin_rest(step)
        v_minus, j_minus = _mannequin_rest(-step)
        vertex_dirs[:, :, k] = (v_plus - v_minus) / (2 * MANNEQUIN_SHAPE_STEP)
        joint_dirs[:, :, k] = (j_plus - j_minus) / (2 * MANNEQUIN_SHAPE_STEP)

    weights = np.zeros((num_vertices, NUM_JOINTS))
    for slot in range(figure._skin_joint_indices.shape[1]):
        smplx_joint = np.asarray(MANNEQUIN_TO_SMPLX)[figure._skin_joint_indices[:, slot]]
        np.add.at(weights, (np.arange(num_vertices), smplx_joint), figure._skin_weights[:, slot])

    faces = np.asarray(figure.faces, dtype=np.int64)
    head_faces = np.nonzero(weights[faces[:, 0], 15] > 0.99)[0]
    hand_mean = figure._calibration.hand_mean.astype(np.float64)  # (30, 3): left 15 then right 15
    arrays = dict(
        v_template=rest_vertices,
        f=faces,
        J_regressor=_joint_regressor(rest_vertices, rest_joints, vertex_dirs, joint_dirs),
        weights=weights,
        kintree_table=np.stack([np.asarray(SMPLX_PARENTS), np.arange(NUM_JOINTS)]).astype(np.int64),
        # 10 shape directions, then 10 expression directions (zero: the mannequin has no face).
        shapedirs=np.concatenate([vertex_dirs, np.zeros((num_vertices, 3, 10))], axis=2),
        posedirs=np.zeros((num_vertices, 3, (NUM_JOINTS - 1) * 9)),
        hands_componentsl=np.eye(45), hands_componentsr=np.eye(45),
        hands_meanl=hand_mean[:15].reshape(-1), hands_meanr=hand_mean[15:].reshape(-1),
        # Facial landmarks: smplx needs the arrays; we point them all at one head triangle.
        lmk_faces_idx=np.full(51, head_faces[0], dtype=np.int64), lmk_bary_coords=np.full((51, 3), 1 / 3),
        dynamic_lmk_faces_idx=np.full((79, 17), head_faces[0], dtype=np.int64),
        dynamic_lmk_bary_coords=np.full((79, 17, 3), 1 / 3),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **{k: (v.astype(np.float32) if v.dtype == np.float64 else v)
                                       for k, v in arrays.items()})

    # How far the linear shape space is from the mannequin's own reshaping, at |beta| = 1.
    probe = np.random.default_rng(0).uniform(-1, 1, 10)
    true_vertices, true_joints = _mannequin_rest(probe)
    linear_vertices = rest_vertices + vertex_dirs @ probe
    linear_joints = arrays["J_regressor"] @ linear_vertices
    return dict(source="mannequin-x==0.3.0 wooden", vertices=num_vertices, faces=len(faces),
                shape_vertex_error_m=float(np.abs(true_vertices - linear_vertices).max()),
                shape_joint_error_m=float(np.abs(true_joints - linear_joints).max()))


GENDERS = ("neutral", "male", "female")


class RefusedPickle(pickle.UnpicklingError):
    """A pickle naming a global that _PlainUnpickler does not allow."""


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, numpy scalars and plain containers (dict, list, str, numbers) and
    nothing else: a pickle that names any other global (os.system, ...) is refused when that name is
    looked up, before anything can call it. `extra` allows more (module, name) pairs."""

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
_SPARSE_PICKLE = {(m, n) for m in ("scipy.sparse.csc", "scipy.sparse._csc", "scipy.sparse.csr", "scipy.sparse._csr")
                  for n in ("csc_matrix", "csr_matrix")} | {("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
                                                            ("__builtin__", "object"), ("builtins", "object")}


def _check_model_pickles(path: Path) -> None:
    """Refuse a model file whose pickled parts (a .pkl, or an .npz's object arrays, which smplx loads
    with allow_pickle=True) hold anything but arrays, sparse matrices and plain containers."""
    import zipfile

    try:
        if path.suffix == ".pkl":
            with open(path, "rb") as fh:
                _PlainUnpickler(fh, _SPARSE_PICKLE).load()
            return
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                with archive.open(member) as fh:
                    version = np.lib.format.read_magic(fh)
                    _, _, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(fh))
                    if dtype.hasobject:
                        _PlainUnpickler(fh).load()
    except RefusedPickle as err:
        fix = ("use the .npz of the same SMPL-X download (this .pkl needs chumpy)" if "chumpy" in str(err)
               else "use an official SMPL-X file")
        raise UserError(f"{path} was refused: {err}; {fix}") from None
    except Exception as err:
        raise UserError(f"{path} is not a valid SMPL-X model file ({type(err).__name__}: {err}); "
                        "re-export it with `python prepare_data.py` or use an official SMPL-X file") from None


def body_model_file(folder: Path, gender: str | None = None) -> tuple[Path, str]:
    """The SMPL-X model file of a body folder and its gender: what the folder's manifest.json names
    (a run's body/), else SMPLX_<GENDER>.npz or .pkl in the folder or its smplx/ subfolder (the
    layout of the official download; npz first)."""
    folder = Path(folder)
    if gender is not None and gender not in GENDERS:
        raise UserError(f"gender {gender!r} is not one of {', '.join(GENDERS)}; pass --gender neutral|male|female")
    manifest = folder / "manifest.json"
    if manifest.exists():
        named = read_manifest(folder, "python prepare_data.py")
        if "file" in named:
            found = folder / named["file"]  # an absolute path (a user's SMPL-X file) stays as it is
            if not found.exists():
                raise UserError(f"{manifest} names {found}, which is missing; re-run `python prepare_data.py`")
            return found, gender or named.get("gender", "neutral")
    gender = gender or "neutral"
    stem = f"SMPLX_{gender.upper()}"
    candidates = [place / f"{stem}.{ext}" for place in (folder, folder / "smplx") for ext in ("npz", "pkl")]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise UserError(f"{folder} holds no {stem}.npz or .pkl; run `python prepare_data.py` to export the mannequin, "
                        "or pass --body-model pointing at a real SMPL-X folder (models/smplx of the official download)")
    return found, gender


def load_body_model(folder: Path, device="cpu", gender: str | None = None):
    """Stock smplx SMPL-X from a body folder: a run's body/ (the exported mannequin, or the file its
    manifest names) or a real SMPL-X folder (npz; pkl where it unpickles without chumpy). Hands
    are relative to the model's relaxed mean (flat_hand_mean=False): zero hand pose = relaxed hand."""
    import smplx

    found, gender = body_model_file(folder, gender)
    _check_model_pickles(found)
    try:
        body = smplx.create(str(found), model_type="smplx", gender=gender, ext=found.suffix[1:],
                            use_pca=False, flat_hand_mean=False, num_betas=10, num_expression_coeffs=10)
    except Exception as err:
        raise UserError(f"{found} is not a valid SMPL-X model file ({type(err).__name__}: {err}); "
                        "re-export it with `python prepare_data.py` or use an official SMPL-X file") from None
    return body.to(device)


POSE_KEYS = {"global_orient": (3,), "body_pose": (21, 3), "left_hand_pose": (15, 3),
             "right_hand_pose": (15, 3), "betas": (10,), "transl": (3,)}


def body_forward(body, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """SMPL-X params (dict of (B, ...) tensors, POSE_KEYS) -> vertices (B, N, 3), joints (B, 55, 3)."""
    batch = params["body_pose"].shape[0]
    like = params["body_pose"]
    zeros3 = like.new_zeros(batch, 3)
    out = body(
        global_orient=params["global_orient"].reshape(batch, 3),
        body_pose=params["body_pose"].reshape(batch, 63),
        left_hand_pose=params.get("left_hand_pose", like.new_zeros(batch, 45)).reshape(batch, 45),
        right_hand_pose=params.get("right_hand_pose", like.new_zeros(batch, 45)).reshape(batch, 45),
        betas=params.get("betas", like.new_zeros(batch, 10)).reshape(batch, -1),
        transl=params.get("transl", zeros3).reshape(batch, 3),
        expression=like.new_zeros(batch, body.num_expression_coeffs),
        jaw_pose=zeros3, leye_pose=zeros3, reye_pose=zeros3, return_verts=True,
    )
    return out.vertices, out.joints[:, :NUM_JOINTS]


# --- the renderer: an orthographic, vectorised z-buffer over triangles ----------------------------
# Visibility (which triangle owns a pixel) is found without gradients; colour, normal and depth are
# then interpolated with barycentric weights recomputed from the vertex positions, so they are
# differentiable in the vertices (what reconstruct.py's carving needs). Anti-aliasing comes from
# rendering at twice the resolution and area-downsampling (render_subjects).

def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) area-weighted unit vertex normals (outward for counter-clockwise faces)."""
    tri = vertices[:, faces]  # (B, F, 3, 3)
    face_normals = torch.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0], dim=-1)
    normals = torch.zeros_like(vertices)
    for corner in range(3):
        normals = normals.index_add(1, faces[:, corner], face_normals)
    return F.normalize(normals, dim=-1, eps=1e-12)


def _edge_weights(pix: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Barycentric weights (..., 3) of 2D points pix (..., 2) in triangles tri (..., 3, 2)."""
    a, b, c = tri[..., 0, :], tri[..., 1, :], tri[..., 2, :]
    area = (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (c[..., 0] - a[..., 0])
    w_a = (b[..., 0] - pix[..., 0]) * (c[..., 1] - pix[..., 1]) - (b[..., 1] - pix[..., 1]) * (c[..., 0] - pix[..., 0])
    w_b = (c[..., 0] - pix[..., 0]) * (a[..., 1] - pix[..., 1]) - (c[..., 1] - pix[..., 1]) * (a[..., 0] - pix[..., 0])
    safe = torch.where(area.abs() < 1e-12, torch.full_like(area, 1e-12), area)
    w_a, w_b = w_a / safe, w_b / safe
    return torch.stack([w_a, w_b, 1 - w_a - w_b], dim=-1)


@torch.no_grad()
def rasterize(pix: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, resolution: int) -> torch.Tensor:
    """Nearest triangle per pixel. pix (M, N, 2) pixel coords, depth (M, N) (larger = nearer) ->
    face index (M, H, W), -1 where no triangle covers the pixel centre."""
    num_images, device = pix.shape[0], pix.device
    tri_pix = pix[:, faces]  # (M, F, 3, 2)
    # Pixel centres j + 0.5 inside the triangle's box: columns ceil(min - 0.5) .. floor(max - 0.5).
    corner0, corner1, corner2 = tri_pix.unbind(2)
    lower = torch.minimum(torch.minimum(corner0, corner1), corner2)
    upper = torch.maximum(torch.maximum(corner0, corner1), corner2)
    lo = torch.ceil(lower - 0.5).clamp(0, resolution).long()  # (M, F, 2)
    hi = torch.floor(upper - 0.5).clamp(-1, resolution - 1).long()
    side = hi - lo + 1
    span = torch.maximum(side[..., 0], side[..., 1]) * (torch.minimum(side[..., 0], side[..., 1]) > 0)
    # Back faces never own a pixel of a closed mesh (pixel v points down, so front faces are
    # clockwise here); dropping them halves the work.
    edge1, edge2 = tri_pix[:, :, 1] - tri_pix[:, :, 0], tri_pix[:, :, 2] - tri_pix[:, :, 0]
    span = span * ((edge1[..., 0] * edge2[..., 1] - edge1[..., 1] * edge2[..., 0]) < 0)
    tri_depth = depth[:, faces]  # (M, F, 3)
    zbuffer = torch.full((num_images * resolution * resolution,), -torch.inf, device=device)
    cand_keys, cand_depth, cand_face = [], [], []
    size = 1
    # Triangles are bucketed by box size so each bucket is one dense (triangles x size^2) batch.
    while True:
        in_bucket = (span > size // 2) & (span <= size) if size > 1 else span == 1
        image_idx, face_idx = torch.nonzero(in_bucket, as_tuple=True)
        if len(face_idx):
            offsets = torch.stack(torch.meshgrid(torch.arange(size, device=device),
                                                 torch.arange(size, device=device), indexing="xy"), -1).reshape(-1, 2)
            cols_rows = lo[image_idx, face_idx][:, None, :] + offsets[None]  # (T, S*S, 2)
            valid = (cols_rows <= hi[image_idx, face_idx][:, None, :]).all(-1)
            centres = cols_rows.float() + 0.5
            weights = _edge_weights(centres, tri_pix[image_idx, face_idx][:, None])  # (T, S*S, 3)
            valid &= (weights >= -1e-6).all(-1)
            z = (weights * tri_depth[image_idx, face_idx][:, None]).sum(-1)
            key = (image_idx[:, None] * resolution + cols_rows[..., 1]) * resolution + cols_rows[..., 0]
            cand_keys.append(key[valid])
            cand_depth.append(z[valid])
            cand_face.append(face_idx[:, None].expand_as(key)[valid])
        if size >= resolution:
            break
        size *= 2
    face_buffer = torch.full((num_images * resolution * resolution,), -1, device=device, dtype=torch.long)
    if cand_keys:
        keys, z, face = torch.cat(cand_keys), torch.cat(cand_depth), torch.cat(cand_face)
        zbuffer.scatter_reduce_(0, keys, z, reduce="amax")
        front = z >= zbuffer[keys]
        face_buffer.scatter_reduce_(0, keys[front], face[front], reduce="amax")
    return face_buffer.reshape(num_images, resolution, resolution)


def render_views(vertices: torch.Tensor, faces: torch.Tensor, vertex_colors: torch.Tensor,
                 resolution: int, azimuths=VIEW_AZIMUTHS) -> dict[str, torch.Tensor]:
    """Six orthographic views of B meshes. vertices (B, N, 3) world metres, faces (F, 3),
    vertex_colors (B, N, 3) albedo in [0, 1] -> color, normal (B, V, 3, H, W), mask, depth (B, V, H, W).
    Colour is albedo under a head light (ambient 0.35 + diffuse 0.65); normals are camera-space,
    encoded (n + 1) / 2; background BACKGROUND; depth is camera z (0 outside the mask)."""
    batch, res, num_views = vertices.shape[0], resolution, len(azimuths)
    cam = world_to_views(vertices, azimuths)  # (B, V, N, 3)
    pix = views_to_pixels(cam, res)  # (B, V, N, 2)
    face_idx = rasterize(pix.flatten(0, 1), cam[..., 2].flatten(0, 1), faces, res)  # (B*V, H, W)
    face_idx = face_idx.reshape(batch, num_views, res, res)
    mask = face_idx >= 0
    b_idx, v_idx, rows, cols = torch.nonzero(mask, as_tuple=True)
    corners = faces[face_idx[mask]]  # (P, 3) vertex indices of the owning triangle
    centres = torch.stack([cols, rows], -1).to(pix.dtype) + 0.5
    weights = _edge_weights(centres, pix[b_idx[:, None], v_idx[:, None], corners])  # (P, 3), differentiable

    def interpolate(per_vertex):  # per_vertex (B, V, N, C) -> (P, C)
        return (weights[..., None] * per_vertex[b_idx[:, None], v_idx[:, None], corners]).sum(1)

    cam_normals = torch.einsum("vij,bnj->bvni", view_rotations(vertices.device, vertices.dtype, azimuths),
                               vertex_normals(vertices, faces))
    normal_px = F.normalize(interpolate(cam_normals), dim=-1, eps=1e-12)
    light = F.normalize(torch.tensor([0.3, 0.5, 1.0], device=vertices.device, dtype=vertices.dtype), dim=0)
    albedo_px = interpolate(vertex_colors[:, None].expand(-1, num_views, -1, -1))
    shade = 0.35 + 0.65 * (normal_px @ light).clamp(min=0)
    depth_px = interpolate(cam[..., 2:])[:, 0]

    def scatter(values, fill):  # (P, C) -> (B, V, C, H, W) with `fill` in the background
        image = vertices.new_full((batch, num_views, res, res, values.shape[-1]), fill)
        image = image.index_put((b_idx, v_idx, rows, cols), values)
        return image.permute(0, 1, 4, 2, 3)

    return dict(color=scatter(albedo_px * shade[:, None], BACKGROUND),
                normal=scatter((normal_px + 1) / 2, BACKGROUND),
                mask=mask.to(vertices.dtype),
                depth=scatter(depth_px[:, None], 0.0)[:, :, 0])


# --- poses: a motion generator, Motion-X / AMASS loaders, farthest-point sampling -----------------
# Ranges are (low, high) radians per axis-angle component of each body_pose joint, written for the
# left side and the spine; the right side mirrors them (x, y, z) -> (x, -y, -z). Axis conventions of
# SMPL-X: hip flexion (leg forward) is -x, knee bend +x, spine forward bend +x, left shoulder -z
# lowers the arm, left elbow -y folds the forearm forward.
_LEFT_RIGHT = {0: 1, 3: 4, 6: 7, 9: 10, 12: 13, 15: 16, 17: 18, 19: 20}  # body_pose index pairs
POSE_RANGES = {
    # Scan-like: standing, stepping, leaning, arms anywhere from the sides to overhead: what a few
    # thousand scans cover. Calibrated to the paper, where DrPose15K has 1.73x the joint spread of
    # THuman2.1: target 1.73 +- 0.15 for `joint_spread_vs_scans` (data/drpose/manifest.json, the
    # FPS anchors against scans/train). The ranges sit about 0.8 of the way from the old standing set
    # to "broad" for the arms, 0.5 for the spine and head, 0.4 for the legs, 0.2 for the body's tilt;
    # measured at seed 0: demo 1.73x, full 1.70x (was 3.42x); tests/test_prepare_data.py checks it.
    "scan": {
        0: [(-1.2, 0.4), (-0.3, 0.3), (-0.15, 0.6)], 3: [(0.0, 1.3), (0, 0), (0, 0)],
        6: [(-0.35, 0.35), (-0.25, 0.25), (-0.25, 0.25)], 9: [(-0.15, 0.15)] * 3,
        2: [(-0.2, 0.35), (-0.3, 0.3), (-0.2, 0.2)], 5: [(-0.2, 0.35), (-0.3, 0.3), (-0.2, 0.2)],
        8: [(-0.2, 0.35), (-0.3, 0.3), (-0.2, 0.2)], 11: [(-0.35, 0.4), (-0.45, 0.45), (-0.2, 0.2)],
        14: [(-0.35, 0.4), (-0.45, 0.45), (-0.2, 0.2)], 12: [(-0.25, 0.25)] * 3,
        15: [(-0.85, 0.85), (-1.25, 0.9), (-1.4, 0.95)], 17: [(-0.2, 0.2), (-2.1, 0.0), (-0.2, 0.2)],
        19: [(-0.55, 0.55)] * 3,
        "global": [(-0.2, 0.25), (-0.5, 0.5), (-0.1, 0.1)],  # pitch, yaw, roll
        "hands": 0.2, "betas": 1.2,
    },
    "broad": {  # dance, sport, acrobatics: what motion capture covers
        0: [(-1.9, 0.6), (-0.5, 0.5), (-0.3, 1.0)], 3: [(0.0, 2.2), (0, 0), (0, 0)],
        6: [(-0.5, 0.5)] * 3, 9: [(-0.2, 0.2)] * 3,
        2: [(-0.35, 0.5), (-0.45, 0.45), (-0.35, 0.35)], 5: [(-0.35, 0.5), (-0.45, 0.45), (-0.35, 0.35)],
        8: [(-0.35, 0.5), (-0.45, 0.45), (-0.35, 0.35)], 11: [(-0.5, 0.5), (-0.6, 0.6), (-0.3, 0.3)],
        14: [(-0.5, 0.5), (-0.6, 0.6), (-0.3, 0.3)], 12: [(-0.3, 0.3)] * 3,
        15: [(-1.0, 1.0), (-1.4, 1.0), (-1.4, 1.3)], 17: [(-0.2, 0.2), (-2.3, 0.0), (-0.2, 0.2)],
        19: [(-0.6, 0.6)] * 3,
        "global": [(-0.4, 0.6), (-0.8, 0.8), (-0.4, 0.4)],
        "hands": 0.5, "betas": 1.2,
    },
}
# Hard poses for the benchmark: templates (body_pose index -> axis-angle, global pitch/yaw/roll)
# around which each subject is jittered. None of them is drawn from the training generators.
HARD_TEMPLATES = {
    "inverted": ({15: (0, 0, 1.3), 16: (0, 0, -1.3), 0: (0, 0, 0.5), 1: (0, 0, -0.5)}, (math.pi, 0, 0)),
    "high_kick": ({0: (-1.9, 0, 0.2), 3: (0.2, 0, 0), 15: (0, -0.3, 0.2), 16: (0, 0.3, -0.2)}, (-0.3, 0, 0)),
    "deep_lunge": ({0: (-1.4, 0, 0.1), 3: (1.9, 0, 0), 1: (0.6, 0, -0.1), 4: (1.3, 0, 0),
                    15: (0, 0, 1.2), 16: (0, 0, -1.2)}, (0.1, 0, 0)),
    "twist": ({2: (0, 0.5, 0), 5: (0, 0.5, 0), 8: (0, 0.4, 0), 11: (0, 0.4, 0), 15: (0, -1.0, 0),
               16: (0, -1.0, 0), 17: (0, -1.5, 0), 18: (0, 1.5, 0)}, (0, 0, 0)),
    "crouch": ({0: (-2.1, 0, 0.3), 1: (-2.1, 0, -0.3), 3: (2.3, 0, 0), 4: (2.3, 0, 0), 2: (0.4, 0, 0),
                15: (0, -1.2, -0.3), 16: (0, 1.2, 0.3), 17: (0, -1.0, 0), 18: (0, 1.0, 0)}, (0.3, 0, 0)),
    "cartwheel": ({0: (0, 0, 0.9), 1: (0, 0, -0.9), 15: (0, 0, 1.1), 16: (0, 0, -1.1)}, (0, 0, 1.4)),
}


def _mirror(axis_ranges):
    return [axis_ranges[0], (-axis_ranges[1][1], -axis_ranges[1][0]), (-axis_ranges[2][1], -axis_ranges[2][0])]


def _range_table(kind: str) -> np.ndarray:
    """(21, 3, 2) low/high per body_pose component for a generator kind."""
    table = np.zeros((21, 3, 2))
    for joint, axes in POSE_RANGES[kind].items():
        if isinstance(joint, int):
            table[joint] = axes
            if joint in _LEFT_RIGHT:
                table[_LEFT_RIGHT[joint]] = _mirror(axes)
    return table


def _axis_angle_from_euler(pitch, yaw, roll) -> np.ndarray:
    """Global orientation as axis-angle of R = Ry(yaw) Rx(pitch) Rz(roll), batched."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("YXZ", np.stack([yaw, pitch, roll], -1)).as_rotvec()


def generate_clips(kind: str, num_clips: int, frames: int, rng: np.random.Generator) -> dict:
    """Smooth motion clips within joint limits: dict of POSE_KEYS arrays shaped (clips, frames, ...).

    Every degree of freedom follows a sum of three slow sinusoids with a random offset, squashed by
    a sigmoid into its [low, high] range, so motion is smooth and never leaves the limits."""
    table = POSE_RANGES[kind]
    limits = np.concatenate([_range_table(kind).reshape(63, 2), np.array(table["global"])])  # (66, 2)
    t = np.linspace(0, 1, frames)
    freq = rng.uniform(0.3, 2.0, (num_clips, 66, 3))
    phase = rng.uniform(0, 2 * np.pi, (num_clips, 66, 3))
    amp = rng.normal(0, 1, (num_clips, 66, 3)) / np.sqrt(3)
    offset = rng.normal(0, 0.8, (num_clips, 66, 1))
    signal = offset + (amp[..., None] * np.sin(2 * np.pi * freq[..., None] * t + phase[..., None])).sum(2)
    unit = 1 / (1 + np.exp(-1.5 * signal))  # (clips, 66, frames) in (0, 1)
    values = limits[None, :, :1] + (limits[None, :, 1:] - limits[None, :, :1]) * unit
    values = values.transpose(0, 2, 1)  # (clips, frames, 66)
    hands = rng.normal(0, table["hands"] / 2, (num_clips, 1, 30, 3)) + \
        rng.normal(0, table["hands"] / 4, (num_clips, frames, 30, 3))
    betas = np.zeros((num_clips, 10))
    betas[:, :4] = rng.uniform(-table["betas"], table["betas"], (num_clips, 4))
    return dict(
        global_orient=_axis_angle_from_euler(values[..., 63], values[..., 64], values[..., 65]),
        body_pose=values[..., :63].reshape(num_clips, frames, 21, 3),
        left_hand_pose=hands[:, :, :15].clip(-1, 1), right_hand_pose=hands[:, :, 15:].clip(-1, 1),
        betas=np.repeat(betas[:, None], frames, axis=1), transl=np.zeros((num_clips, frames, 3)),
    )


def held_out_betas(count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, 10) bench shapes: every subject has at least one coefficient beyond the training
    range (|beta| <= 1.2), so the bench's shapes are held out."""
    betas = np.zeros((count, 10))
    betas[:, :4] = rng.uniform(-1.2, 1.2, (count, 4))
    betas[np.arange(count), rng.integers(0, 4, count)] = rng.choice([-1, 1], count) * rng.uniform(1.3, 1.8, count)
    return betas


def generate_poses(kind: str, count: int, rng: np.random.Generator) -> dict:
    """`count` independent poses: 'scan' / 'broad' (a random frame of a fresh clip each) or 'hard'
    (benchmark templates, jittered, on held-out extreme body shapes). Arrays (count, ...), float32."""
    if kind in POSE_RANGES:
        clips = generate_clips(kind, count, 16, rng)
        frame = rng.integers(0, 16, count)
        return {k: v[np.arange(count), frame].astype(np.float32) for k, v in clips.items()}
    names = sorted(HARD_TEMPLATES)
    category = np.array([names[i % len(names)] for i in range(count)])
    body_pose = rng.normal(0, 0.12, (count, 21, 3))
    euler = rng.normal(0, 0.1, (count, 3))
    euler[:, 1] = rng.uniform(-0.6, 0.6, count)  # heading
    for i, name in enumerate(category):
        joints, (pitch, yaw, roll) = HARD_TEMPLATES[name]
        for joint, value in joints.items():
            body_pose[i, joint] += value
        euler[i] += (pitch, yaw, roll)
    betas = held_out_betas(count, rng)
    hands = rng.normal(0, 0.3, (count, 30, 3)).clip(-1, 1)
    return dict(global_orient=_axis_angle_from_euler(euler[:, 0], euler[:, 1], euler[:, 2]).astype(np.float32),
                body_pose=body_pose.astype(np.float32), left_hand_pose=hands[:, :15].astype(np.float32),
                right_hand_pose=hands[:, 15:].astype(np.float32), betas=betas.astype(np.float32),
                transl=np.zeros((count, 3), np.float32), category=category)


# Motion files. Each layout in circulation is written down once, in POSE_LAYOUTS: its file types,
# the pose array's key and width, the columns each SMPL-X part occupies, the other keys it needs,
# where its frame rate comes from, the world up axis its dataset records in, and how it stores
# hands. Loading is two steps: `load_motion` reads one file as it is (no body model needed), then
# `check_motion` poses it with the body model, rotates it y-up and converts its hands (README,
# "Bring your own data").

@dataclass(frozen=True)
class PoseLayout:
    family: str  # what its users call it
    suffixes: tuple[str, ...]  # file types
    pose_key: str | None  # the (frames, width) pose array's key; None: the file is that array (.npy)
    width: int
    columns: dict  # SMPL-X part -> (start, stop) columns of the pose array
    required: tuple[str, ...]  # keys a file must hold
    trans_key: str | None  # key of the (frames, 3) translation, if the layout has one
    fps_keys: tuple[str, ...]  # keys that hold the frame rate
    fps: float | None  # the dataset's documented rate, when its files carry none
    up: str  # the world up axis of the dataset (y, z or -y)
    hands: str  # "absolute" (AMASS: flat hand = 0), "relative" (to the relaxed mean, smplx's default), "none"


_ROOT_BODY = dict(global_orient=(0, 3), body_pose=(3, 66))  # the root, then SMPL-X's 21 body joints
_AMASS_FPS = ("mocap_framerate", "mocap_frame_rate")
POSE_LAYOUTS = {
    "amass-smplh": PoseLayout("AMASS", (".npz",), "poses", 156,  # root 3, body 63, hands 90
                              dict(_ROOT_BODY, left_hand_pose=(66, 111), right_hand_pose=(111, 156)),
                              ("poses", "trans", "betas"), "trans", _AMASS_FPS, None, "z", "absolute"),
    "amass-smplx": PoseLayout("AMASS", (".npz",), "poses", 165,  # root 3, body 63, jaw 3, eyes 6, hands 90
                              dict(_ROOT_BODY, left_hand_pose=(75, 120), right_hand_pose=(120, 165)),
                              ("poses", "trans", "betas"), "trans", _AMASS_FPS, None, "z", "absolute"),
    "motionx": PoseLayout("Motion-X", (".npy",), None, 322,  # + jaw 3, face 150, trans 3, betas 10
                          dict(_ROOT_BODY, left_hand_pose=(66, 111), right_hand_pose=(111, 156), transl=(309, 312),
                               betas=(312, 322)), (), None, (), None, "y", "relative"),
    # SMPL: root + 23 joints, the first 21 SMPL-X's body; SMPL's two hand joints (66:72) are dropped.
    # `poses`, or `global_orient` + `body_pose` (23 or 21 joints), as video-based estimators write it.
    "smpl72": PoseLayout("SMPL", (".npz", ".npy"), "poses", 72, dict(_ROOT_BODY), (), "trans",
                         ("fps", "mocap_framerate", "mocap_frame_rate"), None, "y", "none"),
    "aistpp": PoseLayout("AIST++", (".pkl",), "smpl_poses", 72, dict(_ROOT_BODY),  # smpl_trans / smpl_scaling = metres
                         ("smpl_poses", "smpl_trans", "smpl_scaling"), "smpl_trans", (), 60.0, "y", "none"),
}
MOTION_SUFFIXES = (".npz", ".npy", ".pkl")
SKIPPED_MOTION_FILES = ("shape.npz", "*_stagei.npz", ".*")  # AMASS per-subject shape files; hidden files
UP_AXES = ("y", "z", "-y")  # -y: camera coordinates (y down), as video-based estimators write them
UP_TO_Y = {"y": (0.0, "x"), "z": (-90.0, "x"), "-y": (180.0, "x")}  # degrees about x that make it +y
UPRIGHT_COS = 0.5  # a frame is upright when pelvis -> head points within 60 degrees of +y
UPRIGHT_SHARE = 0.5  # a clip is upright when more than this share of its checked frames are
UP_CHECK_FRAMES = 16  # frames per clip posed for the check, evenly spaced
GENERATED_CLIP_FRAMES = 48  # frames per generated pool clip
GENERATED_FPS = 30.0  # their nominal rate (1.6 s of motion): the default spacing picks every 2nd frame


def _width_hint(width: int) -> str:
    """Which layouts have a pose array `width` wide, or the widths there are."""
    names = [n for n, layout in POSE_LAYOUTS.items() if layout.width == width]
    if names:
        return f"a {width}-wide pose array is " + " or ".join(
            f"{n} (a {'/'.join(POSE_LAYOUTS[n].suffixes)} file" +
            (f" with keys {', '.join(POSE_LAYOUTS[n].required)})" if POSE_LAYOUTS[n].required else ")") for n in names)
    known = sorted({layout.width for layout in POSE_LAYOUTS.values()})
    return "known widths: " + ", ".join(f"{w} ({'/'.join(n for n, l in POSE_LAYOUTS.items() if l.width == w)})"
                                        for w in known)


def _checked(path: Path, array, width: int, what: str) -> np.ndarray:
    if array is None:
        raise UserError(f"{path}: {what} holds a pickled object, not an array; save it as a numeric array")
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[1] != width or array.dtype.kind not in "fiu":
        hint = _width_hint(array.shape[1]) if array.ndim == 2 else "expected one row per frame"
        raise UserError(f"{path}: {what} has shape {array.shape}, expected (frames, {width}); {hint}")
    if len(array) == 0:
        raise UserError(f"{path}: {what} has no frames; drop this file")
    if not np.isfinite(array).all():
        raise UserError(f"{path}: {what} contains NaN or Inf; fix or drop this file")
    return array.astype(np.float64)


def _read_motion_file(path: Path) -> dict:
    """A motion file's arrays by key ('' for a bare .npy). Object arrays in an npz are read as None
    (never unpickled); a .pkl goes through the restricted unpickler."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            arrays = {}
            with np.load(path, allow_pickle=False) as npz:
                for key in npz.files:
                    try:
                        arrays[key] = npz[key]
                    except ValueError as err:
                        if "allow_pickle" not in str(err):
                            raise
                        arrays[key] = None  # a pickled object (some AMASS files carry dicts): not ours to run
            return arrays
        if suffix == ".npy":
            return {"": np.load(path, allow_pickle=False)}
        if suffix == ".pkl":
            with open(path, "rb") as fh:
                data = _PlainUnpickler(fh).load()
            if not isinstance(data, dict):
                raise UserError(f"{path} holds a {type(data).__name__}, not a dict of arrays; expected an AIST++ pickle")
            return data
    except UserError:
        raise
    except RefusedPickle as err:
        raise UserError(f"{path} was refused: {err}; only pickles of numpy arrays and plain containers are read") from None
    except Exception as err:  # truncated zip or pickle, bad header, object .npy ...
        raise UserError(f"{path} is not a readable {suffix} file ({type(err).__name__}); "
                        "re-download or re-export it") from None
    raise UserError(f"{path}: motion files are {', '.join(MOTION_SUFFIXES)}")


def _detect_layout(path: Path, arrays: dict) -> str:
    """The layout of a file read by _read_motion_file, from its file type, keys and width."""
    suffix = path.suffix.lower()
    candidates = [n for n, layout in POSE_LAYOUTS.items() if suffix in layout.suffixes]
    if "" not in arrays:
        candidates = [n for n in candidates if POSE_LAYOUTS[n].pose_key in arrays or
                      (n == "smpl72" and {"global_orient", "body_pose"} <= set(arrays))]
        if not candidates:
            raise UserError(f"{path} holds keys {sorted(arrays)}, none of them a known pose array "
                            "(poses, smpl_poses, global_orient + body_pose); see --pose-layout")
    if len(candidates) == 1:
        return candidates[0]
    pose = arrays.get("", arrays.get("poses"))
    width = np.shape(pose)[-1] if pose is not None and np.ndim(pose) == 2 else None
    matching = [n for n in candidates if POSE_LAYOUTS[n].width == width]
    if len(matching) != 1:
        raise UserError(f"{path}: cannot tell its layout (pose array shape {np.shape(pose)}); {_width_hint(width or 0)}")
    return matching[0]


def _scalar(path: Path, arrays: dict, key: str):
    value = arrays[key]
    if value is None or np.size(value) != 1:
        held = "a pickled object" if value is None else f"shape {np.shape(value)}"
        raise UserError(f"{path}: key '{key}' should hold one value, not {held}")
    value = np.asarray(value).reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else value


def _positive(path: Path, arrays: dict, key: str, what: str) -> float:
    value = _scalar(path, arrays, key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not (np.isfinite(value) and value > 0):
        raise UserError(f"{path}: '{key}' is {arrays[key]!r}; expected a positive number ({what})")
    return value


def load_motion(path: Path, layout: str = "auto") -> dict:
    """One motion file as it is: POSE_KEYS arrays (frames, ...) in the file's own world and hand
    convention, plus path, layout, fps (None when unknown), up (the layout's) and hands."""
    path = Path(path)
    arrays = _read_motion_file(path)
    name = _detect_layout(path, arrays) if layout == "auto" else layout
    spec = POSE_LAYOUTS[name]
    missing = [k for k in spec.required if k not in arrays]
    if missing:
        raise UserError(f"{path} lacks {spec.family} keys {missing}; expected a {name} file with keys "
                        f"{list(spec.required)} (or pass the right --pose-layout)")
    if spec.pose_key is None:
        poses = arrays[""]
    elif spec.pose_key in arrays:
        poses = arrays[spec.pose_key]
    elif name == "smpl72" and {"global_orient", "body_pose"} <= set(arrays):
        orient = _checked(path, np.reshape(arrays["global_orient"], (-1, 3)), 3, "'global_orient'")
        body = np.asarray(arrays["body_pose"])
        body = body.reshape(len(body), -1) if body.ndim > 1 else body[None]
        if body.shape[1] == 63:  # already SMPL-X's 21 body joints
            body = np.concatenate([body, np.zeros((len(body), 6))], 1)
        if len(orient) != len(body):
            raise UserError(f"{path}: 'global_orient' has {len(orient)} frames, 'body_pose' {len(body)}")
        poses = np.concatenate([orient, body], 1)
    else:
        raise UserError(f"{path} lacks {spec.family} keys ['{spec.pose_key}'] (or global_orient + body_pose)")
    poses = _checked(path, poses, spec.width, f"'{spec.pose_key or 'the array'}'")
    frames = len(poses)
    part = lambda key, shape: (poses[:, slice(*spec.columns[key])].reshape((frames,) + shape)  # noqa: E731
                               if key in spec.columns else np.zeros((frames,) + shape))
    clip = {key: part(key, shape) for key, shape in POSE_KEYS.items()}
    if spec.trans_key in arrays:
        clip["transl"] = _checked(path, arrays[spec.trans_key], 3, f"'{spec.trans_key}'")
        if len(clip["transl"]) != frames:
            raise UserError(f"{path}: '{spec.trans_key}' has {len(clip['transl'])} frames, the poses {frames}")
        if name == "aistpp":  # AIST++ translations are in the units of its scaled SMPL fit
            clip["transl"] = clip["transl"] / _positive(path, arrays, "smpl_scaling", "AIST++'s scale of smpl_trans")
    if "betas" in arrays and "betas" not in spec.columns:
        betas = arrays["betas"]  # (10,), (16,), or per frame: the first frame's
        betas = _checked(path, betas if betas is None else np.reshape(betas, (1, -1)), np.size(betas), "'betas'")[0, :10]
        clip["betas"] = np.repeat(np.pad(betas, (0, 10 - len(betas)))[None], frames, 0)
    if "gender" in arrays:
        gender = str(_scalar(path, arrays, "gender")).strip().lower()
        if gender not in GENDERS:
            raise UserError(f"{path}: gender is {gender!r}, expected one of {', '.join(GENDERS)}; fix the key or drop it")
    fps = spec.fps
    for key in spec.fps_keys:
        if key in arrays:
            fps = _positive(path, arrays, key, "frames per second; or pass --fps")
            break
    return dict(clip, path=path, layout=name, fps=fps, up=spec.up, hands=spec.hands)


def load_pose_files(layout: str, path: Path) -> list[dict]:
    """Every motion file of a file or folder tree (sorted by path), read by `load_motion`. In a
    folder, AMASS's per-subject shape files and hidden files are skipped."""
    from fnmatch import fnmatch

    from tqdm import tqdm

    if path is None or not Path(path).exists():
        raise UserError(f"--pose-files {path} does not exist; pass a motion file or a folder of them")
    path = Path(path)
    suffixes = MOTION_SUFFIXES if layout == "auto" else POSE_LAYOUTS[layout].suffixes
    if path.is_file():
        files = [path]
    else:
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
                       and not any(fnmatch(f.name, pattern) for pattern in SKIPPED_MOTION_FILES))
    if not files:
        raise UserError(f"{path} holds no {'/'.join(suffixes)} files for --pose-layout {layout}")
    with tqdm(files, desc="read motion files", unit="file", leave=False) as bar:  # closed before an error prints
        return [load_motion(f, layout) for f in bar]


def _up_to_y(global_orient: np.ndarray, up: str) -> np.ndarray:
    """Re-express root orientations recorded in a world whose up axis is `up` in our y-up world."""
    from scipy.spatial.transform import Rotation

    angle, axis = UP_TO_Y[up]
    return (Rotation.from_euler(axis, angle, degrees=True) * Rotation.from_rotvec(global_orient)).as_rotvec()


def load_motionx(path: Path, up: str = "y") -> dict:
    """One Motion-X .npy clip, y-up, hands as stored (relative to the relaxed mean)."""
    clip = load_motion(path, "motionx")
    return dict(clip, global_orient=_up_to_y(clip["global_orient"], up))


def load_amass(path: Path, up: str = "z") -> dict:
    """One AMASS SMPL-H .npz clip, rotated y-up; hands as stored (absolute, AMASS's convention)."""
    clip = load_motion(path, "amass-smplh")
    return dict(clip, global_orient=_up_to_y(clip["global_orient"], up))


def upright_share(body, global_orient: np.ndarray, body_pose: np.ndarray) -> float:
    """Share of frames whose pelvis -> head direction is within acos(UPRIGHT_COS) of +y."""
    with torch.no_grad():
        joints = body_joints(body, {"global_orient": torch.as_tensor(global_orient, dtype=torch.float32),
                                    "body_pose": torch.as_tensor(body_pose, dtype=torch.float32)})
    up = joints[:, 15] - joints[:, 0]
    return float(((up[:, 1] / up.norm(dim=1).clamp(min=1e-9)) > UPRIGHT_COS).float().mean())


def check_motion(body, clip: dict, up: str = "auto") -> dict:
    """A clip from `load_motion` in our conventions: y-up (the layout's axis, or with up='auto' the
    first of the layout's, y, z, -y under which the body stands upright in most checked frames;
    a clip upright under none is refused), hands relative to the relaxed mean."""
    from scipy.spatial.transform import Rotation

    frames = len(clip["body_pose"])
    pick = np.unique(np.linspace(0, frames - 1, min(frames, UP_CHECK_FRAMES)).round().astype(int))
    tried = {}
    for axis in [up] if up != "auto" else [clip["up"]] + [a for a in UP_AXES if a != clip["up"]]:
        tried[axis] = upright_share(body, _up_to_y(clip["global_orient"][pick], axis), clip["body_pose"][pick])
        if tried[axis] > UPRIGHT_SHARE:
            break
    else:
        shares = ", ".join(f"{share:.0%} with --up {axis}" for axis, share in tried.items())
        fix = "fix the file's root orientation or drop the file" + ("" if up == "auto" else ", or pass --up auto")
        raise UserError(f"{clip['path']}: the body lies down or stands on its head in most frames (head above "
                        f"the pelvis, of {len(pick)} checked frames: {shares}); {fix}")
    out = dict(clip, up=axis, global_orient=_up_to_y(clip["global_orient"], axis))
    if axis != "y":  # rotate the whole body about the origin: the root joint (J0) moves, so transl does
        rotation = Rotation.from_euler(UP_TO_Y[axis][1], UP_TO_Y[axis][0], degrees=True)
        with torch.no_grad():
            rest_root = (body.J_regressor[0] @ body.v_template).double().numpy()  # (3,)
            root_dirs = torch.einsum("n,nkl->kl", body.J_regressor[0], body.shapedirs).double().numpy()  # (3, 10)
        root = rest_root + clip["betas"] @ root_dirs.T  # (frames, 3)
        out["transl"] = rotation.apply(root + clip["transl"]) - root
    if clip["hands"] == "absolute":  # to smplx's flat_hand_mean=False: subtract this body's relaxed mean
        out["left_hand_pose"] = clip["left_hand_pose"] - body.left_hand_mean.reshape(15, 3).double().numpy()
        out["right_hand_pose"] = clip["right_hand_pose"] - body.right_hand_mean.reshape(15, 3).double().numpy()
    out["hands"] = "relative"
    return out


def neighbour_offset(k: int, frames_per_step: float) -> int:
    """Frames between an anchor and its k-th neighbour on one side (k steps of frames_per_step)."""
    return math.floor(k * frames_per_step + 0.5)


def temporal_neighbours(length: int, frame: int, count: int, frames_per_step: float) -> list[int]:
    """`frame` and its count - 1 nearest frames in time at whole multiples of one step (fps x
    spacing, need not be a whole number of frames), the earlier first at equal distance; one-sided
    near the clip's ends."""
    picked, k = [frame], 1
    while len(picked) < count and neighbour_offset(k, frames_per_step) < length:
        offset = neighbour_offset(k, frames_per_step)
        picked += [f for f in (frame - offset, frame + offset) if 0 <= f < length][:count - len(picked)]
        k += 1
    return picked


def read_pose_inputs(args: Args, body) -> list[dict]:
    """The motion files of --pose-files, every one read and checked (layout, values, frame rate,
    up axis) before anything is written; clips too short for the neighbours are left out."""
    from collections import Counter

    clips = [check_motion(body, clip, args.up) for clip in load_pose_files(args.pose_layout, args.pose_files)]
    kept, short = [], []
    for clip in clips:
        clip["fps"] = args.fps or clip["fps"]
        if clip["fps"] is None:
            raise UserError(f"{clip['path']}: the {clip['layout']} file carries no frame rate; pass --fps with the rate "
                            "it was recorded at")
        step = clip["fps"] * args.neighbour_spacing
        if neighbour_offset(1, step) < 1:
            raise UserError(f"{clip['path']}: at {clip['fps']:g} fps frames are {1 / clip['fps']:.3f} s apart, more than "
                            f"--neighbour-spacing {args.neighbour_spacing:.3f} s; pass a larger --neighbour-spacing")
        (kept if len(clip["body_pose"]) > neighbour_offset(args.neighbours, step) else short).append(clip)
    if short:
        print(f"poses: left out {len(short)} of {len(clips)} files shorter than "
              f"{args.neighbours * args.neighbour_spacing:.2f} s "
              f"(--neighbours {args.neighbours} x --neighbour-spacing {args.neighbour_spacing:.3f} s): "
              f"{', '.join(str(c['path']) for c in short[:3])}{' ...' if len(short) > 3 else ''}")
    if not kept:
        raise UserError(f"{args.pose_files}: every clip is too short for --neighbours {args.neighbours} at "
                        f"--neighbour-spacing {args.neighbour_spacing:.3f} s; pass smaller values")
    layouts = Counter(c["layout"] for c in kept)
    ups = Counter(c["up"] for c in kept)
    rotated = [str(c["path"]) for c in kept if c["up"] != POSE_LAYOUTS[c["layout"]].up]
    print(f"poses: {len(kept)} files ({dict(layouts)}), {sum(len(c['body_pose']) for c in kept)} frames, "
          f"up axis {dict(ups)}" + (f"; not the layout's own up axis: {', '.join(rotated[:3])}"
                                   f"{' ...' if len(rotated) > 3 else ''}" if rotated else ""))
    return kept


def body_joints(body, params: dict) -> torch.Tensor:
    """(B, 55, 3) joints by forward kinematics alone (no mesh): for pools of many thousand poses."""
    from smplx.lbs import batch_rigid_transform, batch_rodrigues

    batch = params["body_pose"].shape[0]
    betas = params.get("betas", params["body_pose"].new_zeros(batch, 10))
    shaped = body.v_template + torch.einsum("bl,nkl->bnk", betas, body.shapedirs)
    rest_joints = torch.einsum("jn,bnk->bjk", body.J_regressor, shaped)
    full_pose = torch.cat([params["global_orient"].reshape(batch, 1, 3), params["body_pose"].reshape(batch, 21, 3),
                           params["body_pose"].new_zeros(batch, 3, 3),
                           params.get("left_hand_pose", params["body_pose"].new_zeros(batch, 15, 3)).reshape(batch, 15, 3)
                           + body.left_hand_mean.reshape(1, 15, 3),
                           params.get("right_hand_pose", params["body_pose"].new_zeros(batch, 15, 3)).reshape(batch, 15, 3)
                           + body.right_hand_mean.reshape(1, 15, 3)], dim=1)
    rotations = batch_rodrigues(full_pose.reshape(-1, 3)).reshape(batch, -1, 3, 3)
    joints, _ = batch_rigid_transform(rotations, rest_joints, body.parents)
    return joints + params.get("transl", params["body_pose"].new_zeros(batch, 3)).reshape(batch, 1, 3)


def pose_features(body, params: dict) -> torch.Tensor:
    """(B, 66) pelvis-relative, heading-normalised body joints: the space FPS and diversity use."""
    device = body.v_template.device
    flat = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=device) for k, v in params.items()
            if k in POSE_KEYS}
    flat["betas"] = torch.zeros_like(flat["betas"])  # pose only: every subject on the mean shape
    flat["transl"] = torch.zeros_like(flat["transl"])
    with torch.no_grad():
        joints = body_joints(body, flat)[:, :NUM_BODY_JOINTS]
    joints = joints - joints[:, :1]
    from smplx.lbs import batch_rodrigues

    forward = batch_rodrigues(flat["global_orient"].reshape(-1, 3))[:, :, 2]  # body's +z in world
    heading = torch.atan2(forward[:, 0], forward[:, 2])
    cos, sin = torch.cos(-heading), torch.sin(-heading)
    x = cos[:, None] * joints[..., 0] + sin[:, None] * joints[..., 2]
    z = -sin[:, None] * joints[..., 0] + cos[:, None] * joints[..., 2]
    return torch.stack([x, joints[..., 1], z], -1).reshape(len(joints), -1).cpu()


def farthest_point_sampling(features: torch.Tensor, count: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `count` rows of features (P, D), each the farthest from those already chosen."""
    chosen = [int(rng.integers(len(features)))]
    distance = torch.full((len(features),), torch.inf)
    for _ in range(count - 1):
        distance = torch.minimum(distance, (features - features[chosen[-1]]).norm(dim=1))
        chosen.append(int(distance.argmax()))
    return np.array(chosen)


def joint_spread(features: torch.Tensor) -> float:
    """The paper's diversity statistic: std of joint positions over the set, averaged over joints."""
    return float(features.reshape(len(features), -1, 3).std(dim=0).mean())


# --- outfits: per-region colours painted on the body's vertices -----------------------------------
# Regions come from each vertex's dominant skinning joint, so real SMPL-X models get outfits too.
REGIONS = ("skin", "hair", "top", "bottom", "shoes")
TRAIN_HUES, HELD_OUT_HUES = (0.0, 0.75), (0.75, 1.0)  # bench outfits use hues no training set has
SKIN_TONES = np.array([[0.96, 0.80, 0.69], [0.87, 0.67, 0.53], [0.76, 0.57, 0.42], [0.55, 0.38, 0.26],
                       [0.40, 0.27, 0.18], [0.98, 0.87, 0.78], [0.68, 0.47, 0.35], [0.30, 0.20, 0.13]])
TRAIN_SKIN, HELD_OUT_SKIN = 6, 8  # the last two tones appear only in the benchmark


def vertex_regions(body) -> dict[str, np.ndarray]:
    """Boolean masks over vertices for outfit regions, sleeves and trouser legs (rest pose)."""
    weights = body.lbs_weights.detach().cpu().numpy()
    dominant = weights.argmax(1)
    rest = body.v_template.detach().cpu().numpy()
    head_joint = (body.J_regressor @ body.v_template).detach().cpu().numpy()[15]
    isin = lambda joints: np.isin(dominant, joints)  # noqa: E731
    head = isin([15, 22, 23, 24])
    hair = head & ((rest[:, 1] > head_joint[1] + 0.06) | (rest[:, 2] < head_joint[2] - 0.03))
    return dict(head=head, hair=hair, neck=isin([12]), torso=isin([3, 6, 9, 13, 14]), upper_arm=isin([16, 17]),
                forearm=isin([18, 19]), hands=isin([20, 21] + list(range(25, 55))), hips=isin([0]),
                thigh=isin([1, 2]), shin=isin([4, 5]), feet=isin([7, 8, 10, 11]))


def sample_outfits(count: int, rng: np.random.Generator, held_out: bool) -> dict[str, np.ndarray]:
    """colors (count, 5, 3) for REGIONS, and style (count, 2): long sleeves, long trousers."""
    from matplotlib.colors import hsv_to_rgb

    hue_lo, hue_hi = HELD_OUT_HUES if held_out else TRAIN_HUES
    hsv = np.stack([rng.uniform(hue_lo, hue_hi, (count, 2)), rng.uniform(0.35, 0.9, (count, 2)),
                    rng.uniform(0.35, 0.95, (count, 2))], -1)
    skin = SKIN_TONES[rng.integers(TRAIN_SKIN, HELD_OUT_SKIN, count) if held_out else rng.integers(0, TRAIN_SKIN, count)]
    hair = rng.uniform(0.05, 0.35, (count, 1)) * np.array([1.0, 0.8, 0.6])
    shoes = rng.uniform(0.1, 0.9, (count, 1)) * np.ones(3)
    colors = np.stack([skin, hair, hsv_to_rgb(hsv[:, 0]), hsv_to_rgb(hsv[:, 1]), shoes], 1)
    return dict(colors=colors.astype(np.float32), style=rng.integers(0, 2, (count, 2)).astype(np.uint8))


def paint_vertices(regions: dict, colors: np.ndarray, style: np.ndarray) -> torch.Tensor:
    """(B, N, 3) per-vertex albedo for outfits colors (B, 5, 3), style (B, 2)."""
    skin, hair, top, bottom, shoes = range(5)
    label = np.zeros((len(colors), len(regions["head"])), dtype=np.int64)  # skin everywhere first
    label[:, regions["torso"] | regions["upper_arm"]] = top
    label[:, regions["hips"] | regions["thigh"]] = bottom
    label[np.ix_(style[:, 0] == 1, np.nonzero(regions["forearm"])[0])] = top
    label[np.ix_(style[:, 1] == 1, np.nonzero(regions["shin"])[0])] = bottom
    label[:, regions["feet"]] = shoes
    label[:, regions["hair"]] = hair
    return torch.from_numpy(np.take_along_axis(colors, label[..., None], axis=1)).float()


# --- rendering subjects: centre, render at 2x, area-downsample ------------------------------------

def render_subjects(body, params: dict, outfits: dict, resolution: int, device="cpu", azimuths=VIEW_AZIMUTHS,
                    regions=None) -> dict[str, torch.Tensor]:
    """Pose, centre and render B subjects. params: POSE_KEYS tensors; outfits: colors, style.
    Returns color, normal (B, V, 3, H, W), mask, depth (B, V, H, W) and the centred vertices, joints,
    transl (the transl that makes body_forward give the centred mesh)."""
    params = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=device) for k, v in params.items()
              if k in POSE_KEYS}
    params["transl"] = torch.zeros_like(params["transl"])
    with torch.no_grad():
        vertices, joints = body_forward(body, params)
        centre = (vertices.amax(1) + vertices.amin(1)) / 2  # (B, 3): bounding-box centre -> origin
        vertices, joints = vertices - centre[:, None], joints - centre[:, None]
        regions = vertex_regions(body) if regions is None else regions
        albedo = paint_vertices(regions, outfits["colors"], outfits["style"]).to(device)
        big = render_views(vertices, body.faces_tensor.to(device), albedo, 2 * resolution, azimuths)
        out = {k: F.avg_pool2d(v.flatten(0, 1), 2).unflatten(0, v.shape[:2])
               for k, v in big.items() if k in ("color", "normal")}
        coverage = F.avg_pool2d(big["mask"].flatten(0, 1)[:, None], 2)[:, 0].unflatten(0, big["mask"].shape[:2])
        depth_sum = F.avg_pool2d(big["depth"].flatten(0, 1)[:, None], 2)[:, 0].unflatten(0, big["mask"].shape[:2])
        out["mask"] = (coverage >= 0.5).float()
        out["depth"] = torch.where(coverage > 0, depth_sum / coverage.clamp(min=1e-6), 0.0) * out["mask"]
    return dict(out, vertices=vertices, joints=joints, transl=-centre)


# --- the three datasets ---------------------------------------------------------------------------

def _render_in_batches(body, poses: dict, outfits: dict, args: Args, desc: str, azimuths=VIEW_AZIMUTHS,
                       batch_size: int = 32) -> dict[str, np.ndarray]:
    """Render all subjects with a progress bar; returns uint8 images and float32 geometry."""
    from tqdm import tqdm

    regions = vertex_regions(body)
    count = len(poses["body_pose"])
    parts: dict[str, list] = {}
    for start in tqdm(range(0, count, batch_size), desc=desc, unit="batch", leave=False):
        chunk = slice(start, start + batch_size)
        out = render_subjects(body, {k: v[chunk] for k, v in poses.items() if k in POSE_KEYS},
                              {k: v[chunk] for k, v in outfits.items()}, args.resolution, args.device,
                              azimuths, regions)
        arrays = dict(color=to_uint8(out["color"]), normal=to_uint8(out["normal"]),
                      mask=out["mask"].to(torch.uint8).cpu().numpy(), depth=out["depth"].cpu().numpy(),
                      joints=out["joints"].cpu().numpy(), transl=out["transl"].cpu().numpy(),
                      vertices=out["vertices"].cpu().numpy())
        for key, value in arrays.items():
            parts.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _pose_arrays(poses: dict, rendered: dict, outfits: dict) -> dict[str, np.ndarray]:
    arrays = {k: np.asarray(poses[k], np.float32) for k in POSE_KEYS if k != "transl"}
    return dict(arrays, transl=rendered["transl"], joints=rendered["joints"],
                outfit_colors=outfits["colors"], outfit_style=outfits["style"])


def _write_meshes(folder: Path, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray, prefix: str = ""):
    import trimesh

    folder.mkdir(parents=True, exist_ok=True)
    for i, (verts, cols) in enumerate(zip(vertices, colors)):
        mesh = trimesh.Trimesh(verts, faces, vertex_colors=(cols * 255).astype(np.uint8), process=False)
        mesh.export(folder / f"{prefix}{i:05d}.ply")


def contact_sheet(path: Path, rows: list[np.ndarray]) -> None:
    """A png grid: each row is (V, 3, H, W) uint8 views laid side by side."""
    from PIL import Image

    strips = [np.concatenate(list(row.transpose(0, 2, 3, 1)), axis=1) for row in rows]
    width = max(s.shape[1] for s in strips)
    strips = [np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)), constant_values=255) for s in strips]
    with atomic_write(path) as tmp:
        Image.fromarray(np.concatenate(strips, axis=0)).save(tmp, format="png")


def manifest(args: Args, source: str, files: dict, **extra) -> dict:
    return dict(files=files, count=sum(files.values()), views=list(VIEW_AZIMUTHS), resolution=args.resolution,
                seed=args.seed, preset=args.preset, source=source,
                conventions=dict(joints="SMPL-X (smplx.joint_names), 55", bones=[list(b) for b in BONES],
                                 cameras=f"orthographic, elevation 0, half-extent {ORTHO_HALF_EXTENT} m, y up",
                                 normals="camera space, stored as (n + 1) / 2", background=BACKGROUND,
                                 units="metres", frame="each subject centred on its mesh bounding box"),
                **extra)


def build_scans(body, args: Args, folder: Path, rng: np.random.Generator) -> dict:
    """Scan-like poses, training outfits and shapes, six views + GT meshes: the base model's data."""
    faces = body.faces_tensor.cpu().numpy()
    regions = vertex_regions(body)
    counts = {}
    with atomic_dir(folder) as tmp:
        sheets = []
        for split, count in (("train", args.num_scans), ("val", args.num_val_scans)):
            poses = generate_poses("scan", count, rng)
            outfits = sample_outfits(count, rng, held_out=False)
            rendered = _render_in_batches(body, poses, outfits, args, f"scans/{split}")
            save_npz(tmp / f"{split}.npz", color=rendered["color"], normal=rendered["normal"],
                     mask=rendered["mask"], depth=rendered["depth"], **_pose_arrays(poses, rendered, outfits))
            albedo = paint_vertices(regions, outfits["colors"], outfits["style"]).numpy()
            _write_meshes(tmp / "meshes", rendered["vertices"], faces, albedo, prefix=f"{split}_")
            counts[f"{split}.npz"] = count
            sheets += [np.concatenate([rendered["color"][i], rendered["normal"][i]]) for i in range(min(4, count))]
        contact_sheet(tmp / "contact_sheet.png", sheets)
        write_json(tmp / "manifest.json", manifest(args, "generated scan-like poses", counts))
    return counts


def build_drpose(body, args: Args, folder: Path, rng: np.random.Generator, scan_features: torch.Tensor,
                 clips: list[dict] | None = None) -> dict:
    """DrPose15K-style pairs: FPS anchors from a broad motion pool, each with its 9 temporal
    neighbours (--neighbour-spacing seconds apart), imaged from the front only. No multi-view
    image is written, by design. `clips`: the checked motion files (read_pose_inputs)."""
    if args.pose_source == "generated":
        pool = generate_clips("broad", args.pose_pool_clips, GENERATED_CLIP_FRAMES, rng)
        clips = [dict({k: v[c] for k, v in pool.items()}, fps=GENERATED_FPS) for c in range(args.pose_pool_clips)]
    elif clips is None:
        clips = read_pose_inputs(args, body)
    frames = np.concatenate([np.stack([np.full(len(c["body_pose"]), i), np.arange(len(c["body_pose"]))], 1)
                             for i, c in enumerate(clips)])  # (P, 2): clip, frame
    features = pose_features(body, {k: np.concatenate([c[k] for c in clips]) for k in POSE_KEYS})
    if len(frames) < args.num_anchors:
        raise UserError(f"the pose pool has {len(frames)} frames, fewer than --num-anchors {args.num_anchors}")
    anchors = farthest_point_sampling(features, args.num_anchors, rng)
    picked, anchor_of = [], []
    for a, (clip, frame) in enumerate(frames[anchors]):
        length = len(clips[clip]["body_pose"])
        # The anchor and its `neighbours` nearest frames in time, --neighbour-spacing apart, same clip.
        order = temporal_neighbours(length, frame, args.neighbours + 1, clips[clip]["fps"] * args.neighbour_spacing)
        if len(order) <= args.neighbours:
            raise UserError(f"clip {clip} has {length} frames, too few for --neighbours {args.neighbours} at "
                            f"--neighbour-spacing {args.neighbour_spacing:.3f} s")
        picked += [(clip, f) for f in order]
        anchor_of += [a] * (args.neighbours + 1)
    poses = {k: np.stack([clips[c][k][f] for c, f in picked]).astype(np.float32) for k in POSE_KEYS}
    # Files bring their own heading and shape: re-draw both so the front view sees the person's front
    # and every body is in our shape range (shape is not what DrPose learns).
    heading = rng.uniform(-0.8, 0.8, len(picked))
    from scipy.spatial.transform import Rotation

    heading_free = pose_features_heading(poses["global_orient"])
    poses["global_orient"] = (Rotation.from_euler("y", (heading - heading_free)[:, None]) *
                              Rotation.from_rotvec(poses["global_orient"])).as_rotvec().astype(np.float32)
    poses["betas"][:] = 0
    poses["betas"][:, :4] = np.repeat(rng.uniform(-1.2, 1.2, (args.num_anchors, 4)), args.neighbours + 1, 0)
    outfits = sample_outfits(len(picked), rng, held_out=False)
    rendered = _render_in_batches(body, poses, outfits, args, "drpose", azimuths=VIEW_AZIMUTHS[:1])
    spread = joint_spread(features[anchors]) / joint_spread(scan_features)
    with atomic_dir(folder) as tmp:
        save_npz(tmp / "pairs.npz", image=rendered["color"][:, 0], mask=rendered["mask"][:, 0],
                 anchor=np.array(anchor_of), **_pose_arrays(poses, rendered, outfits))
        contact_sheet(tmp / "contact_sheet.png", [rendered["color"][i::len(picked) // 8 or 1][:10, 0]
                                                  for i in range(0, args.neighbours + 1, 3)])
        write_json(tmp / "manifest.json", manifest(
            args, f"{args.pose_source} poses, FPS anchors + {args.neighbours} temporal neighbours",
            {"pairs.npz": len(picked)}, anchors=args.num_anchors, pool_frames=len(frames),
            neighbour_spacing_s=args.neighbour_spacing, pool_fps=sorted({float(c["fps"]) for c in clips}),
            pose_files=None if args.pose_source == "generated" else dict(
                path=args.pose_files, files=len(clips), layouts=sorted({c["layout"] for c in clips}),
                up_axes=sorted({c["up"] for c in clips})),
            joint_spread_vs_scans=spread, multi_view_images=False))
    return dict(pairs=len(picked), joint_spread_vs_scans=spread)


def pose_features_heading(global_orient: np.ndarray) -> np.ndarray:
    """Heading (yaw, radians) of root orientations: the angle of the body's +z axis about y."""
    from scipy.spatial.transform import Rotation

    forward = Rotation.from_rotvec(global_orient).as_matrix()[:, :, 2]
    return np.arctan2(forward[:, 0], forward[:, 2])


def build_ceiling(body, args: Args, folder: Path, pairs_folder: Path) -> dict:
    """Six-view GT renders of exactly the DrPose pairs (their poses, outfits and shapes, read back from
    pairs.npz): the 3D data DrPose does without, for the supervised ceiling only. Same keys as
    scans/train.npz (plus `anchor`); its front view is pixel for pixel pairs.npz's `image`."""
    pairs = load_split(pairs_folder / "pairs.npz", [*POSE_KEYS, "outfit_colors", "outfit_style", "anchor"])
    poses = {k: pairs[k] for k in POSE_KEYS}
    outfits = dict(colors=pairs["outfit_colors"], style=pairs["outfit_style"])
    count = len(pairs["body_pose"])
    rendered = _render_in_batches(body, poses, outfits, args, "drpose_gt")
    with atomic_dir(folder) as tmp:
        save_npz(tmp / "train.npz", color=rendered["color"], normal=rendered["normal"], mask=rendered["mask"],
                 depth=rendered["depth"], anchor=pairs["anchor"], **_pose_arrays(poses, rendered, outfits))
        contact_sheet(tmp / "contact_sheet.png",
                      [np.concatenate([rendered["color"][i], rendered["normal"][i]]) for i in range(min(4, count))])
        write_json(tmp / "manifest.json", manifest(
            args, f"six-view GT renders of {pairs_folder.name}/pairs.npz (same poses, outfits, shapes, order)",
            {"train.npz": count}, reader="supervised ceiling only; DrPose never reads this folder",
            multi_view_images=True))
    return {"train.npz": count}


def dynamic_bench_poses(body, count: int, scan_features: torch.Tensor, rng: np.random.Generator) -> dict:
    """`count` frames of held-out clips of the broad motion family (the one DrPose trains on), far from
    the scans: the bench's `dynamic` split (MixamoRP's role). POSE_KEYS arrays (count, ...), float32.

    The pool is 4 x count fresh clips of 48 frames (DrPose's clip length) drawn from `rng`, a stream
    no other set draws from, so no clip is shared with DrPose's pool. The quarter of its frames
    farthest from their nearest scan pose are the candidates; farthest-point sampling picks `count`
    of them, so the split covers the hard part of the family instead of piling up in one clip."""
    clips = generate_clips("broad", 4 * count, 48, rng)
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in clips.items() if k in POSE_KEYS}
    features = _features_in_chunks(body, flat)  # (P, 66)
    distance = torch.cdist(features, scan_features).amin(1).numpy()  # (P,) to the nearest scan
    candidates = np.argsort(-distance, kind="stable")[:max(count, len(distance) // 4)]
    chosen = candidates[farthest_point_sampling(features[candidates], count, rng)]
    poses = {k: v[chosen].astype(np.float32) for k, v in flat.items()}
    # As build_drpose: re-draw the heading so the front view sees the person's front.
    from scipy.spatial.transform import Rotation

    heading = rng.uniform(-0.8, 0.8, count)
    heading_free = pose_features_heading(poses["global_orient"])
    poses["global_orient"] = (Rotation.from_euler("y", (heading - heading_free)[:, None]) *
                              Rotation.from_rotvec(poses["global_orient"])).as_rotvec().astype(np.float32)
    poses["betas"] = held_out_betas(count, rng).astype(np.float32)  # held-out shapes, as the extreme split
    return poses


def _features_in_chunks(body, poses: dict, chunk: int = 1024) -> torch.Tensor:
    """pose_features of a large pool, a chunk at a time (each pose's mesh is built on the way)."""
    count = len(poses["body_pose"])
    return torch.cat([pose_features(body, {k: v[i:i + chunk] for k, v in poses.items()})
                      for i in range(0, count, chunk)])


BENCH_SPLITS = {
    "dynamic": "held-out frames of the broad motion family DrPose trains on (own clips, none in DrPose's "
               "pool), the quarter farthest from the scans, spread by FPS; held-out outfits and shapes "
               "(MixamoRP's role)",
    "extreme": "hard-pose templates (inverted, cartwheel, ...) that no training set covers, jittered; "
               "held-out outfits and shapes",
}


def build_bench(body, args: Args, folder: Path, rng_extreme: np.random.Generator, rng_dynamic: np.random.Generator,
                scan_features: torch.Tensor) -> dict:
    """The benchmark in two splits (BENCH_SPLITS) in one file, `dynamic` subjects first, then `extreme`;
    per-subject keys `split` and `category` (the template name, or "dynamic"), GT meshes and views.
    `scan_distance` is each pose's distance to its nearest scans/train pose in pose_features space
    (metres, Euclidean over the 22 body joints' pelvis-relative, heading-free coordinates)."""
    num_dynamic, num_extreme = args.num_bench_dynamic, args.num_bench_extreme
    extreme = generate_poses("hard", num_extreme, rng_extreme)
    extreme_outfits = sample_outfits(num_extreme, rng_extreme, held_out=True)
    dynamic = dict(dynamic_bench_poses(body, num_dynamic, scan_features, rng_dynamic),
                   category=np.array(["dynamic"] * num_dynamic))
    dynamic_outfits = sample_outfits(num_dynamic, rng_dynamic, held_out=True)
    poses = {k: np.concatenate([dynamic[k], extreme[k]]) for k in (*POSE_KEYS, "category")}
    outfits = {k: np.concatenate([dynamic_outfits[k], extreme_outfits[k]]) for k in ("colors", "style")}
    split = np.array(["dynamic"] * num_dynamic + ["extreme"] * num_extreme)
    scan_distance = torch.cdist(pose_features(body, poses), scan_features).amin(1).numpy()
    rendered = _render_in_batches(body, poses, outfits, args, "bench")
    albedo = paint_vertices(vertex_regions(body), outfits["colors"], outfits["style"]).numpy()
    count = num_dynamic + num_extreme
    with atomic_dir(folder) as tmp:
        save_npz(tmp / "bench.npz", image=rendered["color"][:, 0], color=rendered["color"],
                 normal=rendered["normal"], mask=rendered["mask"], depth=rendered["depth"],
                 split=split, category=poses["category"], scan_distance=scan_distance.astype(np.float32),
                 **_pose_arrays(poses, rendered, outfits))
        _write_meshes(tmp / "meshes", rendered["vertices"], body.faces_tensor.cpu().numpy(), albedo)
        shown = list(range(min(3, num_dynamic))) + list(range(num_dynamic, num_dynamic + min(3, num_extreme)))
        contact_sheet(tmp / "contact_sheet.png",
                      [np.concatenate([rendered["color"][i], rendered["normal"][i]]) for i in shown])
        distances = {name: float(scan_distance[split == name].mean()) for name in BENCH_SPLITS}
        write_json(tmp / "manifest.json", manifest(
            args, "bench: split dynamic (held-out broad motion) then split extreme (hard-pose templates); "
            "held-out outfits and shapes", {"bench.npz": count},
            splits={"dynamic": num_dynamic, "extreme": num_extreme}, split_notes=BENCH_SPLITS,
            order="all dynamic subjects first, then all extreme ones (key `split`)",
            categories=["dynamic", *sorted(HARD_TEMPLATES)], scan_distance_mean=distances))
    return dict(dynamic=num_dynamic, extreme=num_extreme,
                scan_distance_mean={name: round(d, 2) for name, d in distances.items()})


# --- main -----------------------------------------------------------------------------------------

def check_args(args: Args) -> None:
    """Flags that contradict each other, refused before anything is read or written."""
    if args.pose_source == "files" and args.pose_files is None:
        raise UserError("--pose-source files needs --pose-files PATH (a motion file or a folder of them)")
    file_flags = [flag for flag, unset in (("--pose-files", args.pose_files is None), ("--fps", args.fps is None),
                                           ("--pose-layout", args.pose_layout == "auto"), ("--up", args.up == "auto"))
                  if not unset]
    if args.pose_source == "generated" and file_flags:
        raise UserError(f"{', '.join(file_flags)} apply to motion files only; add --pose-source files --pose-files PATH, "
                        "or drop them")
    if args.fps is not None and not args.fps > 0:
        raise UserError(f"--fps {args.fps} is not a frame rate; pass a positive number")
    if not args.neighbour_spacing > 0:
        raise UserError(f"--neighbour-spacing {args.neighbour_spacing} is not a time step; pass seconds > 0")
    if args.gender != "neutral" and args.body_model is None:
        raise UserError("--gender picks a model of a real SMPL-X folder; pass --body-model DIR with it")
    if args.pose_source == "generated" and args.pose_pool_clips * GENERATED_CLIP_FRAMES < args.num_anchors:
        raise UserError(f"--pose-pool-clips {args.pose_pool_clips} x {GENERATED_CLIP_FRAMES} frames is fewer than "
                        f"--num-anchors {args.num_anchors}")


def _is_mannequin_export(folder: Path) -> bool:
    try:
        source = json.loads((folder / "manifest.json").read_text()).get("source", "")
    except (OSError, ValueError, AttributeError):
        return False
    return str(source).startswith("mannequin-x") and (folder / "SMPLX_NEUTRAL.npz").exists()


def stage_body(args: Args, scratch: Path) -> Path:
    """The body folder to check the inputs with, before the run is written to: the user's SMPL-X
    folder, this run's exported mannequin, or a fresh export into `scratch` (prepare_body moves it)."""
    if args.body_model is not None:
        return args.body_model
    if _is_mannequin_export(args.run_dir / "body"):  # the export is deterministic; do it once
        return args.run_dir / "body"
    facts = export_mannequin_smplx(scratch / "SMPLX_NEUTRAL.npz")
    write_json(scratch / "manifest.json", dict(facts, file="SMPLX_NEUTRAL.npz", loader="smplx.create"))
    return scratch


def prepare_body(args: Args, staged: Path) -> Path:
    """The run's body/ that every stage loads: the exported mannequin, or a manifest.json naming the
    user's SMPL-X file and gender (the file itself stays where the user keeps it: its licence)."""
    folder = args.run_dir / "body"
    if args.body_model is not None:
        found, gender = body_model_file(args.body_model, args.gender)
        with atomic_dir(folder) as tmp:
            write_json(tmp / "manifest.json", dict(file=str(found.resolve()), gender=gender, source="SMPL-X folder",
                                                   loader="smplx.create"))
    elif staged != folder:
        with atomic_dir(folder) as tmp:
            for item in staged.iterdir():
                shutil.copy2(item, tmp / item.name)
    return folder


def main(args: Args) -> None:
    import tempfile

    args = args.resolved()  # every flag checked
    start = time.time()
    # --- inputs first: the body model and every pose file are read and checked; nothing is written ---
    with tempfile.TemporaryDirectory() as scratch:
        staged = stage_body(args, Path(scratch))
        body = load_body_model(staged, args.device, args.gender if args.body_model is not None else None)
        clips = read_pose_inputs(args, body) if args.pose_source == "files" else None
        if clips is not None and sum(len(c["body_pose"]) for c in clips) < args.num_anchors:
            raise UserError(f"{args.pose_files}: the pose pool has {sum(len(c['body_pose']) for c in clips)} frames, "
                            f"fewer than --num-anchors {args.num_anchors}")
        body_folder = prepare_body(args, staged)
    data = args.run_dir / "data"
    # One generator per dataset, derived from the seed, so each set is reproducible on its own:
    # scans, drpose, bench extreme, bench dynamic (its own stream: none of its clips is in DrPose's pool).
    rngs = [np.random.default_rng([args.seed, i]) for i in range(4)]
    print(f"body: {body_folder} ({body.v_template.shape[0]} vertices)")
    print(f"scans: {build_scans(body, args, data / 'scans', rngs[0])}")
    scan_features = pose_features(body, load_split(data / "scans" / "train.npz"))
    drpose = build_drpose(body, args, data / "drpose", rngs[1], scan_features, clips)
    print(f"drpose: {drpose['pairs']} pairs; joint spread {drpose['joint_spread_vs_scans']:.2f}x the scans' "
          "(paper: 1.73x THuman2.1)")
    if args.ceiling:
        print(f"drpose_gt: {build_ceiling(body, args, data / 'drpose_gt', data / 'drpose')} (ceiling only)")
    elif (data / "drpose_gt").exists():  # renders of an older drpose/ would no longer match its pairs
        shutil.rmtree(data / "drpose_gt")
        print("drpose_gt: skipped (--no-ceiling); removed the old folder, which no longer matches drpose/")
    print(f"bench: {build_bench(body, args, data / 'bench', rngs[2], rngs[3], scan_features)}")
    write_json(args.run_dir / "prepare_data.json", dict(args=dataclasses.asdict(args), seconds=time.time() - start))
    print(f"done in {time.time() - start:.0f} s -> {data}")


if __name__ == "__main__":
    run_cli(main, Args)
