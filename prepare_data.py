"""Stage 1 of DrPose: the body model, poses, the renderer and the three datasets.

    python prepare_data.py --preset demo            # embedded world, CPU, under a minute
    python prepare_data.py --preset full            # paper-sized sets (15K pairs, 60 bench subjects)
    python prepare_data.py --body-model ~/smplx     # a real SMPL-X folder through the same code
    python prepare_data.py --pose-source motionx --pose-files ~/motionx/   # real motion for drpose/

Writes, under the run folder (default runs/demo/):
    body/SMPLX_NEUTRAL.npz      the embedded mannequin as an SMPL-X model file (stock `smplx` loads it)
    data/scans/                 scan-like poses rendered in six views (the base model's training set)
    data/drpose/                DrPose15K-style (pose, single front image) pairs; no multi-view images
    data/bench/                 MixamoRP-style hard poses with GT meshes and six-view GT renders

This file owns the conventions every later stage uses: joint order and bones, cameras, image
encoding, the renderer, file checks and atomic writes. Later stages import them from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
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
    """a real SMPL-X folder (holding SMPLX_NEUTRAL.npz or .pkl); default: export the mannequin"""
    pose_source: Literal["generated", "motionx", "amass"] = "generated"
    """where drpose/ poses come from: our motion generator, or Motion-X / AMASS files"""
    pose_files: Path | None = None
    """a Motion-X .npy / AMASS .npz file or a folder of them (with --pose-source motionx|amass)"""
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
    num_bench: int | None = None
    """hard-pose benchmark subjects (demo 12, full 60)"""
    pose_pool_clips: int | None = None
    """broad-motion clips in the pool FPS selects from (demo 64, full 1200)"""
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
        for name in ("num_scans", "num_val_scans", "num_anchors", "num_bench", "pose_pool_clips"):
            check_number(self, name, 1)
        check_number(self, "neighbours", 0)
        check_number(self, "seed", 0)
        check_resolution(self.resolution)
        if self.pose_source == "generated" and self.num_anchors > self.pose_pool_clips * CLIP_FRAMES:
            raise UserError(f"--num-anchors {self.num_anchors} exceeds the pose pool's {self.pose_pool_clips} clips x "
                            f"{CLIP_FRAMES} frames; raise --pose-pool-clips or lower --num-anchors")
        if self.pose_source != "generated" and (self.pose_files is None or not self.pose_files.exists()):
            raise UserError(f"--pose-source {self.pose_source} needs --pose-files ({self.pose_files} does not exist); "
                            f"pass a {self.pose_source} file or a folder of them")
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
    "demo": dict(resolution=32, num_scans=240, num_val_scans=24, num_anchors=48, num_bench=12,
                 pose_pool_clips=64),
    "full": dict(resolution=64, num_scans=3000, num_val_scans=200, num_anchors=1500, num_bench=60,
                 pose_pool_clips=1200),
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


def load_body_model(folder: Path, device="cpu"):
    """Stock smplx SMPL-X from a folder holding SMPLX_NEUTRAL.npz (ours) or .npz/.pkl (a real one)."""
    import smplx

    folder = Path(folder)
    candidates = [folder / "SMPLX_NEUTRAL.npz", folder / "SMPLX_NEUTRAL.pkl",
                  folder / "smplx" / "SMPLX_NEUTRAL.npz", folder / "smplx" / "SMPLX_NEUTRAL.pkl"]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise UserError(f"{folder} holds no SMPLX_NEUTRAL.npz or .pkl; run `python prepare_data.py` "
                        "to export the mannequin, or pass --body-model pointing at a real SMPL-X folder")
    try:
        body = smplx.create(str(found), model_type="smplx", gender="neutral", ext=found.suffix[1:],
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
    "scan": {  # standing, walking, mild arm and leg motion: what a few thousand scans cover
        0: [(-0.6, 0.25), (-0.15, 0.15), (-0.05, 0.3)], 3: [(0.0, 0.7), (0, 0), (0, 0)],
        6: [(-0.25, 0.25), (-0.1, 0.1), (-0.1, 0.1)], 9: [(-0.1, 0.1)] * 3,
        2: [(-0.1, 0.2), (-0.15, 0.15), (-0.1, 0.1)], 5: [(-0.1, 0.2), (-0.15, 0.15), (-0.1, 0.1)],
        8: [(-0.1, 0.2), (-0.15, 0.15), (-0.1, 0.1)], 11: [(-0.2, 0.3), (-0.3, 0.3), (-0.15, 0.15)],
        14: [(-0.2, 0.3), (-0.3, 0.3), (-0.15, 0.15)], 12: [(-0.1, 0.1)] * 3,
        15: [(-0.3, 0.3), (-0.6, 0.4), (-1.35, -0.5)], 17: [(-0.1, 0.1), (-1.2, 0.0), (-0.1, 0.1)],
        19: [(-0.3, 0.3)] * 3,
        "global": [(-0.1, 0.1), (-0.5, 0.5), (-0.05, 0.05)],  # pitch, yaw, roll
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
    betas = np.zeros((count, 10))
    # Held-out shapes: every bench subject has at least one coefficient beyond the training range.
    betas[:, :4] = rng.uniform(-1.2, 1.2, (count, 4))
    betas[np.arange(count), rng.integers(0, 4, count)] = rng.choice([-1, 1], count) * rng.uniform(1.3, 1.8, count)
    hands = rng.normal(0, 0.3, (count, 30, 3)).clip(-1, 1)
    return dict(global_orient=_axis_angle_from_euler(euler[:, 0], euler[:, 1], euler[:, 2]).astype(np.float32),
                body_pose=body_pose.astype(np.float32), left_hand_pose=hands[:, :15].astype(np.float32),
                right_hand_pose=hands[:, 15:].astype(np.float32), betas=betas.astype(np.float32),
                transl=np.zeros((count, 3), np.float32), category=category)


def _checked(path: Path, array: np.ndarray, width: int, what: str) -> np.ndarray:
    if array.ndim != 2 or array.shape[1] != width:
        raise UserError(f"{path}: {what} has shape {array.shape}, expected (frames, {width}); "
                        "is this the right format for --pose-source?")
    if not np.isfinite(array).all():
        raise UserError(f"{path}: {what} contains NaN or Inf; fix or drop this file")
    return array.astype(np.float64)


def _up_to_y(global_orient: np.ndarray, up: str) -> np.ndarray:
    """Re-express root orientations recorded in a z-up world in our y-up world."""
    if up == "y":
        return global_orient
    from scipy.spatial.transform import Rotation

    return (Rotation.from_euler("x", -90, degrees=True) * Rotation.from_rotvec(global_orient)).as_rotvec()


def load_motionx(path: Path, up: str = "y") -> dict:
    """One Motion-X .npy clip: (frames, 322) = root_orient 3, pose_body 63, pose_hand 90, pose_jaw 3,
    face_expr 50, face_shape 100, trans 3, betas 10. Returns POSE_KEYS arrays (frames, ...)."""
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as err:
        raise UserError(f"{path} is not a readable .npy ({type(err).__name__}); expected a Motion-X clip") from None
    data = _checked(path, data, 322, "the Motion-X array")
    frames = len(data)
    return dict(global_orient=_up_to_y(data[:, :3], up), body_pose=data[:, 3:66].reshape(frames, 21, 3),
                left_hand_pose=data[:, 66:111].reshape(frames, 15, 3),
                right_hand_pose=data[:, 111:156].reshape(frames, 15, 3),
                betas=data[:, 312:322], transl=data[:, 309:312])


def load_amass(path: Path, up: str = "z") -> dict:
    """One AMASS .npz clip: SMPL-H `poses` (frames, 156) = root 3, body 63, hands 90; `trans`
    (frames, 3); `betas` (16,) or (10,). SMPL-H's 21 body joints are SMPL-X's first 21."""
    try:
        npz = np.load(path, allow_pickle=False)
        missing = [k for k in ("poses", "trans", "betas") if k not in npz.files]
        if missing:
            raise UserError(f"{path} lacks AMASS keys {missing}; expected an AMASS SMPL-H .npz")
        poses, trans, betas = npz["poses"], npz["trans"], npz["betas"]
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{path} is not a readable AMASS .npz ({type(err).__name__})") from None
    poses = _checked(path, poses, 156, "poses")
    trans = _checked(path, trans, 3, "trans")
    betas = _checked(path, np.atleast_2d(betas), np.atleast_2d(betas).shape[1], "betas")[0]
    frames = len(poses)
    return dict(global_orient=_up_to_y(poses[:, :3], up), body_pose=poses[:, 3:66].reshape(frames, 21, 3),
                left_hand_pose=poses[:, 66:111].reshape(frames, 15, 3),
                right_hand_pose=poses[:, 111:156].reshape(frames, 15, 3),
                betas=np.repeat(betas[None, :10], frames, 0), transl=trans)


def load_pose_files(source: str, path: Path) -> list[dict]:
    """All clips of a Motion-X (.npy) or AMASS (.npz) file or folder, sorted by file name."""
    if path is None or not Path(path).exists():
        raise UserError(f"--pose-files {path} does not exist; pass a {source} file or folder")
    suffix = ".npy" if source == "motionx" else ".npz"
    files = [Path(path)] if Path(path).is_file() else sorted(Path(path).rglob(f"*{suffix}"))
    if not files:
        raise UserError(f"{path} holds no {suffix} files for --pose-source {source}")
    loader = load_motionx if source == "motionx" else load_amass
    return [loader(f) for f in files]


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


CLIP_FRAMES = 48  # frames per generated clip of the DrPose pose pool


def build_drpose(body, args: Args, folder: Path, rng: np.random.Generator, scan_features: torch.Tensor) -> dict:
    """DrPose15K-style pairs: FPS anchors from a broad motion pool, each with its 9 temporal
    neighbours, imaged from the front only. No multi-view image is written, by design."""
    if args.pose_source == "generated":
        pool = generate_clips("broad", args.pose_pool_clips, CLIP_FRAMES, rng)
        clips = [{k: v[c] for k, v in pool.items()} for c in range(args.pose_pool_clips)]
    else:
        clips = load_pose_files(args.pose_source, args.pose_files)
    frames = np.concatenate([np.stack([np.full(len(c["body_pose"]), i), np.arange(len(c["body_pose"]))], 1)
                             for i, c in enumerate(clips)])  # (P, 2): clip, frame
    features = pose_features(body, {k: np.concatenate([c[k] for c in clips]) for k in POSE_KEYS})
    if len(frames) < args.num_anchors:
        raise UserError(f"the pose pool has {len(frames)} frames, fewer than --num-anchors {args.num_anchors}")
    anchors = farthest_point_sampling(features, args.num_anchors, rng)
    picked, anchor_of = [], []
    for a, (clip, frame) in enumerate(frames[anchors]):
        length = len(clips[clip]["body_pose"])
        # The anchor and its `neighbours` nearest frames in time (stride 2) from the same clip.
        order = sorted(range(length), key=lambda f: (abs(f - frame) + (abs(f - frame) % 2) * length, f))
        picked += [(clip, f) for f in order[:args.neighbours + 1]]
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
            joint_spread_vs_scans=spread, multi_view_images=False))
    return dict(pairs=len(picked), joint_spread_vs_scans=spread)


def pose_features_heading(global_orient: np.ndarray) -> np.ndarray:
    """Heading (yaw, radians) of root orientations: the angle of the body's +z axis about y."""
    from scipy.spatial.transform import Rotation

    forward = Rotation.from_rotvec(global_orient).as_matrix()[:, :, 2]
    return np.arctan2(forward[:, 0], forward[:, 2])


def build_bench(body, args: Args, folder: Path, rng: np.random.Generator) -> dict:
    """MixamoRP-style hard-pose benchmark on held-out outfits and shapes, with GT meshes and views."""
    poses = generate_poses("hard", args.num_bench, rng)
    outfits = sample_outfits(args.num_bench, rng, held_out=True)
    rendered = _render_in_batches(body, poses, outfits, args, "bench")
    albedo = paint_vertices(vertex_regions(body), outfits["colors"], outfits["style"]).numpy()
    with atomic_dir(folder) as tmp:
        save_npz(tmp / "bench.npz", image=rendered["color"][:, 0], color=rendered["color"],
                 normal=rendered["normal"], mask=rendered["mask"], depth=rendered["depth"],
                 category=poses["category"], **_pose_arrays(poses, rendered, outfits))
        _write_meshes(tmp / "meshes", rendered["vertices"], body.faces_tensor.cpu().numpy(), albedo)
        contact_sheet(tmp / "contact_sheet.png",
                      [np.concatenate([rendered["color"][i], rendered["normal"][i]]) for i in range(min(6, args.num_bench))])
        write_json(tmp / "manifest.json", manifest(args, "hard-pose templates (held-out poses, outfits, shapes)",
                                                   {"bench.npz": args.num_bench},
                                                   categories=sorted(HARD_TEMPLATES)))
    return {"bench": args.num_bench}


# --- main -----------------------------------------------------------------------------------------

def prepare_body(args: Args) -> Path:
    """The body folder every stage loads: the exported mannequin, or the user's SMPL-X folder."""
    if args.body_model is not None:
        load_body_model(args.body_model)  # refuse a bad folder before any work
        return args.body_model
    folder = args.run_dir / "body"
    if not (folder / "manifest.json").exists():  # the export is deterministic; do it once
        with atomic_dir(folder) as tmp:
            facts = export_mannequin_smplx(tmp / "SMPLX_NEUTRAL.npz")
            write_json(tmp / "manifest.json", dict(facts, file="SMPLX_NEUTRAL.npz", loader="smplx.create"))
    return folder


def main(args: Args) -> None:
    args = args.resolved()
    start = time.time()
    if args.pose_source != "generated":  # read (and refuse) the motion files before any dataset is replaced
        frames = sum(len(clip["body_pose"]) for clip in load_pose_files(args.pose_source, args.pose_files))
        if frames < args.num_anchors:
            raise UserError(f"--pose-files {args.pose_files} hold {frames} frames, fewer than --num-anchors "
                            f"{args.num_anchors}; lower --num-anchors or add motion files")
    body_folder = prepare_body(args)
    body = load_body_model(body_folder, args.device)
    data = args.run_dir / "data"
    # One generator per dataset, derived from the seed, so each set is reproducible on its own.
    rngs = [np.random.default_rng([args.seed, i]) for i in range(3)]
    print(f"body: {body_folder} ({body.v_template.shape[0]} vertices)")
    print(f"scans: {build_scans(body, args, data / 'scans', rngs[0])}")
    scan_features = pose_features(body, load_split(data / "scans" / "train.npz"))
    drpose = build_drpose(body, args, data / "drpose", rngs[1], scan_features)
    print(f"drpose: {drpose['pairs']} pairs; joint spread {drpose['joint_spread_vs_scans']:.2f}x the scans' "
          "(paper: 1.73x THuman2.1)")
    print(f"bench: {build_bench(body, args, data / 'bench', rngs[2])}")
    write_json(args.run_dir / "prepare_data.json", dict(args=dataclasses.asdict(args), seconds=time.time() - start))
    print(f"done in {time.time() - start:.0f} s -> {data}")


if __name__ == "__main__":
    run_cli(main, Args)
