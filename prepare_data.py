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
        """The preset's values for every field left unset (an explicit flag always wins)."""
        table = PRESETS[self.preset]
        return dataclasses.replace(self, **{k: v for k, v in table.items() if getattr(self, k) is None})


PRESETS = {
    "demo": dict(resolution=32, num_scans=240, num_val_scans=24, num_anchors=48, num_bench=12,
                 pose_pool_clips=64),
    "full": dict(resolution=64, num_scans=3000, num_val_scans=200, num_anchors=1500, num_bench=60,
                 pose_pool_clips=1200),
}


# --- errors, atomic files, manifests (every stage uses these) ------------------------------------

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
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise UserError(f"{path} is missing; make it with `{made_by}`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid json ({err}); re-run `{made_by}`") from None


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
    count = manifest.get("files", {}).get(path.name)
    if count is not None and len(next(iter(arrays.values()))) != count:
        raise UserError(f"{path} holds a different count than its manifest.json; re-run `{made_by}`")
    for key, value in arrays.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise UserError(f"{path}: key '{key}' has NaN or Inf; re-run `{made_by}`")
    return arrays


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


def view_rotations(device=None, dtype=torch.float32) -> torch.Tensor:
    """(V, 3, 3) world -> camera rotations. The camera orbits the y axis; azimuth 0 sits on +z
    looking at the person's front, azimuth 90 on +x (the person's left side)."""
    mats = []
    for azimuth in VIEW_AZIMUTHS:
        a = math.radians(azimuth)
        # camera position (sin a, 0, cos a); its x axis (cos a, 0, -sin a), y up, z toward camera.
        mats.append([[math.cos(a), 0.0, -math.sin(a)], [0.0, 1.0, 0.0], [math.sin(a), 0.0, math.cos(a)]])
    return torch.tensor(mats, device=device, dtype=dtype)


def world_to_views(points: torch.Tensor) -> torch.Tensor:
    """(B, P, 3) world points -> (B, V, P, 3) camera coordinates (x right, y up, z toward camera)."""
    rot = view_rotations(points.device, points.dtype)
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
