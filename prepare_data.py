"""Stage 1 of DrPose: the body model, poses, the renderer and the datasets.

    python prepare_data.py --preset demo            # embedded world, CPU, about two minutes
    python prepare_data.py --preset full            # paper-sized sets (15K pairs, 60 + 30 bench subjects)
    python prepare_data.py --body-model ~/models/smplx --gender female   # a real SMPL-X folder, same code
    python prepare_data.py --preset full --pose-source files --pose-files ~/motion --num-anchors 1500
        # the paper's DrPose15K recipe on real motion files (any mix of the POSE_LAYOUTS): 1500 FPS anchors,
        # each with 9 temporal neighbours --neighbour-spacing 1/15 s apart (a spacing the paper leaves open)

Writes body/ (the mannequin as an SMPL-X model file, or a manifest naming the user's) and, under data/,
scans/ (six-view scan-like subjects: the base model's set, their spread calibrated so DrPose's is 1.73x
theirs, as in the paper), drpose/ (pose + front image pairs, no multi-view images), drpose_gt/ (six-view
GT of those pairs, for the supervised ceiling only) and bench/ (splits `dynamic` and `extreme`, with GT
meshes, held-out outfits and shapes). Every input file is checked before anything is written: a bad one
stops the run with one line naming it, exit status 2. Later stages import the conventions (the first
section) and the checked data hand-offs (the last) from here; plumbing.py holds what is not method.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

import numpy as np
import smplx
import torch
import torch.nn.functional as F
import trimesh
from mannequin import Mannequin
from matplotlib.colors import hsv_to_rgb
from scipy.linalg import null_space
from scipy.spatial.transform import Rotation
from smplx.lbs import batch_rigid_transform, batch_rodrigues
from tqdm import tqdm

from plumbing import (SEED_MAX, SPARSE_PICKLE, RefusedPickle, UserError, atomic_dir, atomic_write, check_device,
                      check_number, check_pickles, contact_sheet, guard_output, key_path, read_arrays, read_manifest,
                      read_npz, read_scalar, run_cli, save_npz, some, with_preset, write_json)


@dataclass
class Args:
    """Build the body model and the three datasets."""

    preset: Literal["demo", "full"] = "demo"
    """demo: CPU-sized sets at 32 px; full: the paper's sizes at 64 px (for the fields below left unset)"""
    run_dir: Path = Path("runs/demo")
    """the run folder every stage reads and writes"""
    body_model: Path | None = None
    """a real SMPL-X folder (SMPLX_<GENDER>.npz, or a .pkl without chumpy); default: export the mannequin"""
    gender: Literal["neutral", "male", "female"] = "neutral"
    """which model of the --body-model folder"""
    pose_source: Literal["generated", "files"] = "generated"
    """where drpose/ poses come from: our motion generator, or motion files (--pose-files)"""
    pose_files: Path | None = None
    """a motion file or a folder tree of them (.npz, .npy, .pkl), with --pose-source files"""
    pose_layout: Literal["auto", "amass-smplh", "amass-smplx", "motionx", "smpl72", "aistpp"] = "auto"
    """the files' layout (POSE_LAYOUTS); auto tells them apart by file type, keys and width"""
    pose_columns: str | None = None
    """any other packed array: its columns per SMPL-X part, e.g. global_orient=0:3,body_pose=3:66, and the hands'
    convention (hands=relative, the default; absolute; auto: read off each file's data)"""
    pose_keys: str | None = None
    """nested files: key paths per part, e.g. body_pose=person_data.0.smpl_pose (poses=KEY: the packed array)"""
    up: Literal["auto", "y", "z", "-y"] = "auto"
    """the files' world up axis; auto: the layout's, else the first of y, z, -y the body stands upright in"""
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
    """bench split `dynamic`: held-out broad-motion frames far from the scans (demo 24, full 60)"""
    num_bench_extreme: int | None = None
    """bench split `extreme`: hard-pose templates no training set covers (demo 12, full 30)"""
    pose_pool_clips: int | None = None
    """broad-motion clips in the pool FPS selects from (demo 64, full 1200)"""
    ceiling: bool = True
    """render six-view GT of the DrPose poses for the supervised ceiling (data/drpose_gt/)"""
    seed: int = 0
    """one seed for every random choice in this stage"""
    device: str = "cpu"
    """torch device for rendering"""

    def resolved(self) -> "Args":
        """The preset's values for every field left unset (an explicit flag always wins), checked."""
        table = PRESETS[self.preset]
        return with_preset(self, table).check()

    @property
    def pose_map(self) -> tuple[dict, dict]:
        """--pose-columns and --pose-keys, parsed: ({part: (start, stop)}, {part: key path})."""
        return parse_pose_map(self.pose_columns, "--pose-columns"), parse_pose_map(self.pose_keys, "--pose-keys")

    @property
    def outputs(self) -> tuple[Path, ...]:
        """The folders this stage writes (and replaces when re-run)."""
        return self.run_dir / "data", self.run_dir / "body"

    @property
    def render_gb(self) -> float:
        """Rendered views this run holds (colour, normal, mask, depth: 11 bytes a pixel), in GB."""
        six_view = self.num_scans + self.num_val_scans + self.num_bench_dynamic + self.num_bench_extreme + \
            (self.num_anchors * (self.neighbours + 1) if self.ceiling else 0)
        front_only = self.num_anchors * (self.neighbours + 1)
        return (six_view * NUM_VIEWS + front_only) * self.resolution ** 2 * 11 / 1e9

    def check(self) -> "Args":
        """Every flag, before any work (one line and exit status 2 for the first bad one)."""
        for name in ("num_scans", "num_val_scans", "num_anchors", "pose_pool_clips"):
            check_number(self, name, 1, high=MAX_SUBJECTS)
        for name in ("num_bench_dynamic", "num_bench_extreme"):
            check_number(self, name, 1, high=MAX_BENCH)
        check_number(self, "neighbours", 0, high=MAX_NEIGHBOURS)
        check_number(self, "seed", 0, high=SEED_MAX)
        if self.resolution is not None and (self.resolution < TOKEN_GRID_PX or self.resolution % TOKEN_GRID_PX
                                            or self.resolution > MAX_RESOLUTION):
            raise UserError(f"--resolution {self.resolution} must be a positive multiple of {TOKEN_GRID_PX} (the base "
                            f"model's token grid) and <= {MAX_RESOLUTION}; pass e.g. --resolution 32")
        check_args(self)  # the pose-file flags and how they fit together
        if None not in (self.resolution, self.num_scans, self.num_val_scans, self.num_anchors,
                        self.num_bench_dynamic, self.num_bench_extreme) and self.render_gb > MAX_RENDER_GB:
            raise UserError(f"--resolution {self.resolution} with these counts renders about {self.render_gb:.0f} GB "
                            f"of views, more than {MAX_RENDER_GB} GB; lower --resolution, --num-scans or --num-anchors")
        if self.body_model is not None and not self.body_model.is_dir():
            raise UserError(f"--body-model {self.body_model} is not a folder; pass a folder holding "
                            "SMPLX_NEUTRAL.npz or .pkl, or leave it out to export the mannequin")
        check_device(self.device)
        for folder in self.outputs:
            guard_output(folder, "--run-dir", "prepare_data")
        return self


# Upper bounds that keep a run within one machine's memory (the full preset is far below each).
MAX_SUBJECTS = 100_000  # scans, anchors, pool clips
MAX_BENCH = 10_000
MAX_NEIGHBOURS = 100
MAX_RESOLUTION = 256  # px; the renderer draws at twice this, 32 subjects at a time
MAX_RENDER_GB = 32
MAX_FPS = 1000.0
MAX_SPACING_S = 10.0
MAX_POSE_ANGLE = 4 * math.pi  # rad: a motion file's axis-angle beyond two full turns is not a pose

PRESETS = {
    "demo": dict(resolution=32, num_scans=240, num_val_scans=24, num_anchors=48, num_bench_dynamic=24,
                 num_bench_extreme=12, pose_pool_clips=64),
    "full": dict(resolution=64, num_scans=3000, num_val_scans=200, num_anchors=1500, num_bench_dynamic=60,
                 num_bench_extreme=30, pose_pool_clips=1200),
}


# --- conventions: joints, bones, cameras, the latent layout --------------------------------------

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
BONE_GROUPS = {name: [k for k, (_, j) in enumerate(BONES) if j in joints] for name, joints in dict(
    torso=(3, 6, 9, 13, 14), head=(12, 15), left_leg=(1, 4, 7, 10), right_leg=(2, 5, 8, 11), left_arm=(16, 18, 20),
    right_arm=(17, 19, 21)).items()}  # bone indices per body part

VIEW_AZIMUTHS = (0, 45, 90, 180, 270, 315)  # PSHuman's six body views, degrees
NUM_VIEWS = len(VIEW_AZIMUTHS)
ORTHO_HALF_EXTENT = 1.1  # metres: every view spans [-1.1, 1.1] m in x and y around the subject
BACKGROUND = 1.0  # white, for colour and for encoded normals ((1,1,1) is no unit normal)
TOKEN_GRID_PX = 8  # resolutions are multiples of 8: the base model cuts views into 8 x 8 patch tokens


def view_rotations(device=None, dtype=torch.float32, azimuths=VIEW_AZIMUTHS) -> torch.Tensor:
    """(V, 3, 3) world -> camera rotations. The camera orbits the y axis; azimuth 0 sits on +z
    looking at the person's front, azimuth 90 on +x (the person's left side)."""
    # camera position (sin a, 0, cos a); its x axis (cos a, 0, -sin a), y up, z toward camera.
    mats = [[[math.cos(a), 0.0, -math.sin(a)], [0.0, 1.0, 0.0], [math.sin(a), 0.0, math.cos(a)]]
            for a in map(math.radians, azimuths)]
    return torch.tensor(mats, device=device, dtype=dtype)


def world_to_views(points: torch.Tensor, azimuths=VIEW_AZIMUTHS) -> torch.Tensor:
    """(B, P, 3) world points -> (B, V, P, 3) camera coordinates (x right, y up, z toward camera)."""
    rot = view_rotations(points.device, points.dtype, azimuths)
    return torch.einsum("vij,bpj->bvpi", rot, points)


def views_to_pixels(cam_points: torch.Tensor, resolution: int) -> torch.Tensor:
    """(..., 3) camera coordinates -> (..., 2) pixel coordinates: u right, v down, pixel (i, j)'s centre at j + 0.5."""
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


# A pixel is foreground when its encoded normal's smallest channel is below this: a unit normal has a
# component <= 1/sqrt(3) (encoded <= 0.79), the background 1; 0.8 matches 99% of the renders' mask pixels.
MASK_THRESHOLD = 0.8


def encoded_normal_min(latents: torch.Tensor) -> torch.Tensor:
    """(..., 6, H, W) view latents -> (..., H, W) the smallest channel of the encoded normal (n + 1) / 2:
    1 on the background, <= 0.79 on any surface. What the foreground mask and the judge's ink read."""
    return ((latents[..., 3:, :, :] + 1) / 2).amin(-3)


def views_mask(latents: torch.Tensor) -> torch.Tensor:
    """(..., 6, H, W) view latents -> (..., H, W) {0, 1} foreground, read off the normal channels (a hard
    threshold, no gradient; posescore.soft_views_mask is its differentiable twin)."""
    return (encoded_normal_min(latents) < MASK_THRESHOLD).float()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def from_uint8(images: np.ndarray, device=None) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).float() / 255


# --- the body model: the mannequin written as an SMPL-X model file --------------------------------
# mannequin-x 0.3.0 is pinned: the export reads its private arrays (skinned mesh, top-4 skinning weights,
# rest joints, relaxed hand mean). Its joint tree is SMPL-X's without jaw and eyes, plus two zero-length
# "hand" joints at the wrists; MANNEQUIN_TO_SMPLX maps it.


MANNEQUIN_TO_SMPLX = tuple(range(22)) + (20, 21) + tuple(range(25, 55))
MANNEQUIN_SHAPE_STEP = 1.0  # shapedirs are central differences over +-1 of each shape coefficient
GENDERS = ("neutral", "male", "female")


def _mannequin_rest(shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rest vertices (N, 3) and rest joints (55, 3) of the mannequin for ten shape coefficients."""
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
    """(55, N) rows summing to 1 that give the rest joints exactly and follow the shape directions' joints."""
    regressor = np.zeros((NUM_JOINTS, len(rest_vertices)))
    for j in range(NUM_JOINTS):
        near = np.argsort(np.linalg.norm(rest_vertices - rest_joints[j], axis=1))[:neighbours]
        # Hard constraints: weights sum to 1 and reproduce the rest joint (exact for shape 0).
        exact = np.concatenate([np.ones((1, neighbours)), rest_vertices[near].T])
        base = np.linalg.pinv(exact) @ np.concatenate([[1.0], rest_joints[j]])
        free = null_space(exact)  # (neighbours, neighbours - 4): moves that keep them exact
        # Soft: under every shape direction the regressed joint moves as the mannequin's does.
        shape_rows = np.concatenate([vertex_dirs[near, :, k].T for k in range(vertex_dirs.shape[-1])])
        shape_rhs = np.concatenate([joint_dirs[j, :, k] for k in range(joint_dirs.shape[-1])])
        lhs = (shape_rows @ free).T @ (shape_rows @ free) + 1e-6 * np.eye(free.shape[1])
        step = np.linalg.solve(lhs, (shape_rows @ free).T @ (shape_rhs - shape_rows @ base))
        regressor[j, near] = base + free @ step
    return regressor


def export_mannequin_smplx(path: Path) -> dict:
    """Write the wooden mannequin as an SMPL-X npz that `smplx.create` loads unchanged; returns facts for
    the manifest. Its ten shape coefficients are linearised by central differences into `shapedirs` (the
    error at |beta| = 1 is returned); pose-corrective blend shapes are zero: the mannequin has none."""
    figure = Mannequin("wooden")
    rest_vertices, rest_joints = _mannequin_rest(np.zeros(10))
    num_vertices = len(rest_vertices)
    vertex_dirs, joint_dirs = np.zeros((num_vertices, 3, 10)), np.zeros((NUM_JOINTS, 3, 10))
    for k in range(10):
        step = MANNEQUIN_SHAPE_STEP * np.eye(10)[k]
        (v_plus, j_plus), (v_minus, j_minus) = _mannequin_rest(step), _mannequin_rest(-step)
        vertex_dirs[:, :, k] = (v_plus - v_minus) / (2 * MANNEQUIN_SHAPE_STEP)
        joint_dirs[:, :, k] = (j_plus - j_minus) / (2 * MANNEQUIN_SHAPE_STEP)
    weights = np.zeros((num_vertices, NUM_JOINTS))
    for slot in range(figure._skin_joint_indices.shape[1]):
        smplx_joint = np.asarray(MANNEQUIN_TO_SMPLX)[figure._skin_joint_indices[:, slot]]
        np.add.at(weights, (np.arange(num_vertices), smplx_joint), figure._skin_weights[:, slot])
    faces = np.asarray(figure.faces, dtype=np.int64)
    head_face = np.nonzero(weights[faces[:, 0], 15] > 0.99)[0][0]
    hand_mean = figure._calibration.hand_mean.astype(np.float64)  # (30, 3): left 15 then right 15
    arrays = dict(
        v_template=rest_vertices, f=faces,
        J_regressor=_joint_regressor(rest_vertices, rest_joints, vertex_dirs, joint_dirs), weights=weights,
        kintree_table=np.stack([np.asarray(SMPLX_PARENTS), np.arange(NUM_JOINTS)]).astype(np.int64),
        # 10 shape directions, then 10 expression directions (zero: the mannequin has no face).
        shapedirs=np.concatenate([vertex_dirs, np.zeros((num_vertices, 3, 10))], axis=2),
        posedirs=np.zeros((num_vertices, 3, (NUM_JOINTS - 1) * 9)),
        hands_componentsl=np.eye(45), hands_componentsr=np.eye(45),
        hands_meanl=hand_mean[:15].reshape(-1), hands_meanr=hand_mean[15:].reshape(-1),
        # Facial landmarks: smplx needs the arrays; we point them all at one head triangle.
        lmk_faces_idx=np.full(51, head_face, dtype=np.int64), lmk_bary_coords=np.full((51, 3), 1 / 3),
        dynamic_lmk_faces_idx=np.full((79, 17), head_face, dtype=np.int64),
        dynamic_lmk_bary_coords=np.full((79, 17, 3), 1 / 3),
    )
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **{k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in arrays.items()})
    # How far the linear shape space is from the mannequin's own reshaping, at |beta| = 1.
    probe = np.random.default_rng(0).uniform(-1, 1, 10)
    true_vertices, true_joints = _mannequin_rest(probe)
    linear_vertices = rest_vertices + vertex_dirs @ probe
    return dict(source="mannequin-x==0.3.0 wooden", vertices=num_vertices, faces=len(faces),
                shape_vertex_error_m=float(np.abs(true_vertices - linear_vertices).max()),
                shape_joint_error_m=float(np.abs(true_joints - arrays["J_regressor"] @ linear_vertices).max()))


def body_model_file(folder: Path, gender: str | None = None) -> tuple[Path, str]:
    """The SMPL-X file of a body folder and its gender: what its manifest.json names (a run's body/), else
    SMPLX_<GENDER>.npz or .pkl in the folder or its smplx/ subfolder (the official download; npz first)."""
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
    """Stock smplx SMPL-X from a body folder; hands relative to its relaxed mean (zero hand pose = relaxed)."""
    found, gender = body_model_file(folder, gender)
    try:
        check_pickles(found, SPARSE_PICKLE)
        body = smplx.create(str(found), model_type="smplx", gender=gender, ext=found.suffix[1:],
                            use_pca=False, flat_hand_mean=False, num_betas=10, num_expression_coeffs=10)
    except RefusedPickle as err:
        fix = ("use the .npz of the same SMPL-X download (this .pkl needs chumpy)" if "chumpy" in str(err)
               else "use an official SMPL-X file")
        raise UserError(f"{found} was refused: {err}; {fix}") from None
    except Exception as err:
        raise UserError(f"{found} is not a valid SMPL-X model file ({type(err).__name__}: {err}); "
                        "re-export it with `python prepare_data.py` or use an official SMPL-X file") from None
    return body.to(device)


POSE_KEYS = {"global_orient": (3,), "body_pose": (21, 3), "left_hand_pose": (15, 3),
             "right_hand_pose": (15, 3), "betas": (10,), "transl": (3,)}
ROTATION_KEYS = ("global_orient", "body_pose", "left_hand_pose", "right_hand_pose")  # axis-angle, radians
_FACE_POSES = ("jaw_pose", "leye_pose", "reye_pose")  # always zero: the datasets carry no face


def body_forward(body, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """SMPL-X params (dict of (B, ...) tensors, POSE_KEYS) -> vertices (B, N, 3), joints (B, 55, 3)."""
    batch, zeros = params["body_pose"].shape[0], params["body_pose"].new_zeros
    given = {k: params[k].reshape(batch, -1) for k in ("global_orient", "body_pose")}  # required
    given |= {k: params.get(k, zeros(batch, n)).reshape(batch, n)
              for k, n in (("left_hand_pose", 45), ("right_hand_pose", 45), ("transl", 3))}
    out = body(**given, betas=params.get("betas", zeros(batch, 10)).reshape(batch, -1), return_verts=True,
               expression=zeros(batch, body.num_expression_coeffs), **{k: zeros(batch, 3) for k in _FACE_POSES})
    return out.vertices, out.joints[:, :NUM_JOINTS]


def body_joints(body, params: dict) -> torch.Tensor:
    """(B, 55, 3) joints by forward kinematics alone (no mesh): for pools of many thousand poses."""
    batch, zeros = params["body_pose"].shape[0], params["body_pose"].new_zeros
    betas = params.get("betas", zeros(batch, 10))
    # The rest joints are linear in the shape: regress the template and the shape directions once, not
    # a shaped mesh per pose (a pool of thousands of poses would hold thousands of meshes).
    rest_joints = body.J_regressor @ body.v_template + torch.einsum(
        "bl,jkl->bjk", betas, torch.einsum("jn,nkl->jkl", body.J_regressor, body.shapedirs))
    hands = [params.get(key, zeros(batch, 15, 3)).reshape(batch, 15, 3) + mean.reshape(1, 15, 3)
             for key, mean in (("left_hand_pose", body.left_hand_mean), ("right_hand_pose", body.right_hand_mean))]
    full_pose = torch.cat([params["global_orient"].reshape(batch, 1, 3), params["body_pose"].reshape(batch, 21, 3),
                           zeros(batch, 3, 3), *hands], dim=1)
    rotations = batch_rodrigues(full_pose.reshape(-1, 3)).reshape(batch, -1, 3, 3)
    joints, _ = batch_rigid_transform(rotations, rest_joints, body.parents)
    return joints + params.get("transl", zeros(batch, 3)).reshape(batch, 1, 3)


# --- the renderer: an orthographic, vectorised z-buffer over triangles ----------------------------
# Which triangle owns a pixel is found without gradients; colour, normal and depth are then interpolated
# with barycentric weights recomputed from the vertices, so they are differentiable in the vertices (what
# reconstruct.py's carving needs). render_subjects anti-aliases: twice the resolution, area-downsampled.


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


RASTER_CHUNK = 16  # images rasterized at a time: their (images x faces) arrays stay a few MB, in cache


@torch.no_grad()
def rasterize(pix: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, resolution: int) -> torch.Tensor:
    """pix (M, N, 2) pixel coords, depth (M, N) (larger = nearer) -> (M, H, W) nearest face, -1 for none."""
    return torch.cat([_rasterize_images(pix[i:i + RASTER_CHUNK], depth[i:i + RASTER_CHUNK], faces, resolution)
                      for i in range(0, pix.shape[0], RASTER_CHUNK)])


def _rasterize_images(pix: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, resolution: int) -> torch.Tensor:
    num_images, device = pix.shape[0], pix.device
    # Each corner's u and v as its own (M, F) array: every test below is one pass over contiguous memory.
    u = [pix[..., 0].index_select(1, faces[:, k]) for k in range(3)]
    v = [pix[..., 1].index_select(1, faces[:, k]) for k in range(3)]
    # Pixel centres j + 0.5 inside the triangle's box: columns ceil(min - 0.5) .. floor(max - 0.5) (whole
    # numbers, exact in float).
    u_lo = torch.ceil(torch.minimum(torch.minimum(u[0], u[1]), u[2]) - 0.5).clamp_(0, resolution)
    v_lo = torch.ceil(torch.minimum(torch.minimum(v[0], v[1]), v[2]) - 0.5).clamp_(0, resolution)
    u_hi = torch.floor(torch.maximum(torch.maximum(u[0], u[1]), u[2]) - 0.5).clamp_(-1, resolution - 1)
    v_hi = torch.floor(torch.maximum(torch.maximum(v[0], v[1]), v[2]) - 0.5).clamp_(-1, resolution - 1)
    u_side, v_side = u_hi - u_lo + 1, v_hi - v_lo + 1
    # Most triangles of a body mesh hold no pixel centre at these sizes; back faces never own a pixel of a
    # closed mesh (v points down: front faces are clockwise). Only the rest go on.
    keep = (u_side > 0) & (v_side > 0)
    keep &= (u[1] - u[0]) * (v[2] - v[0]) - (v[1] - v[0]) * (u[2] - u[0]) < 0
    image_idx, face_idx = torch.nonzero(keep, as_tuple=True)  # (T,) each
    span = torch.maximum(u_side, v_side)[image_idx, face_idx].long()
    lo = torch.stack([u_lo[image_idx, face_idx], v_lo[image_idx, face_idx]], -1).long()  # (T, 2)
    hi = torch.stack([u_hi[image_idx, face_idx], v_hi[image_idx, face_idx]], -1).long()
    tri_pix = torch.stack([torch.stack([c[image_idx, face_idx] for c in u], -1),
                           torch.stack([c[image_idx, face_idx] for c in v], -1)], -1)  # (T, 3, 2)
    tri_depth = depth[image_idx[:, None], faces[face_idx]]  # (T, 3)
    zbuffer = torch.full((num_images * resolution * resolution,), -torch.inf, device=device)
    cand_keys, cand_depth, cand_face = [], [], []
    size = 1
    # Triangles are bucketed by box size so each bucket is one dense (triangles x size^2) batch.
    while True:
        in_bucket = torch.nonzero((span > size // 2) & (span <= size) if size > 1 else span == 1, as_tuple=True)[0]
        if len(in_bucket):
            offsets = torch.stack(torch.meshgrid(torch.arange(size, device=device),
                                                 torch.arange(size, device=device), indexing="xy"), -1).reshape(-1, 2)
            cols_rows = lo[in_bucket][:, None, :] + offsets[None]  # (t, S*S, 2)
            valid = (cols_rows <= hi[in_bucket][:, None, :]).all(-1)
            centres = cols_rows.float() + 0.5
            weights = _edge_weights(centres, tri_pix[in_bucket][:, None])  # (t, S*S, 3)
            valid &= (weights >= -1e-6).all(-1)
            z = (weights * tri_depth[in_bucket][:, None]).sum(-1)
            key = (image_idx[in_bucket][:, None] * resolution + cols_rows[..., 1]) * resolution + cols_rows[..., 0]
            cand_keys.append(key[valid])
            cand_depth.append(z[valid])
            cand_face.append(face_idx[in_bucket][:, None].expand_as(key)[valid])
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
    """vertices (B, N, 3) world metres, faces (F, 3), albedo (B, N, 3) -> color, normal (B, V, 3, H, W), mask,
    depth (B, V, H, W). Colour: albedo under a head light; normals camera-space, encoded (n + 1) / 2;
    depth camera z (0 outside the mask)."""
    batch, res, num_views = vertices.shape[0], resolution, len(azimuths)
    cam = world_to_views(vertices, azimuths)  # (B, V, N, 3)
    pix = views_to_pixels(cam, res)  # (B, V, N, 2)
    face_idx = rasterize(pix.flatten(0, 1), cam[..., 2].flatten(0, 1), faces, res).unflatten(0, (batch, num_views))
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

    return dict(color=scatter(albedo_px * shade[:, None], BACKGROUND), normal=scatter((normal_px + 1) / 2, BACKGROUND),
                mask=mask.to(vertices.dtype), depth=scatter(depth_px[:, None], 0.0)[:, :, 0])


# --- poses: a motion generator, motion files, farthest-point sampling -----------------------------
# Ranges are (low, high) radians per axis-angle component of each body_pose joint, written for the
# left side and the spine; the right side mirrors them (x, y, z) -> (x, -y, -z). Axis conventions of
# SMPL-X: hip flexion (leg forward) is -x, knee bend +x, spine forward bend +x, left shoulder -z
# lowers the arm, left elbow -y folds the forearm forward.
_LEFT_RIGHT = {0: 1, 3: 4, 6: 7, 9: 10, 12: 13, 15: 16, 17: 18, 19: 20}  # body_pose index pairs
POSE_RANGES = {
    # Scan-like: standing, stepping, leaning, arms anywhere from the sides to overhead: what a few
    # thousand scans cover. Calibrated so `joint_spread_vs_scans` (data/drpose/manifest.json) is the
    # paper's 1.73x (DrPose15K vs THuman2.1) +- 0.15: at seed 0, demo 1.73x, full 1.70x (tested).
    "scan": {
        0: [(-1.2, 0.4), (-0.3, 0.3), (-0.15, 0.6)], 3: [(0.0, 1.3), (0, 0), (0, 0)],
        6: [(-0.35, 0.35), (-0.25, 0.25), (-0.25, 0.25)], 9: [(-0.15, 0.15)] * 3, 12: [(-0.25, 0.25)] * 3,
        **dict.fromkeys((2, 5, 8), [(-0.2, 0.35), (-0.3, 0.3), (-0.2, 0.2)]),  # spine
        **dict.fromkeys((11, 14), [(-0.35, 0.4), (-0.45, 0.45), (-0.2, 0.2)]),  # neck, head
        15: [(-0.85, 0.85), (-1.25, 0.9), (-1.4, 0.95)], 17: [(-0.2, 0.2), (-2.1, 0.0), (-0.2, 0.2)],
        19: [(-0.55, 0.55)] * 3,
        "global": [(-0.2, 0.25), (-0.5, 0.5), (-0.1, 0.1)],  # pitch, yaw, roll
        "hands": 0.2, "betas": 1.2,
    },
    "broad": {  # dance, sport, acrobatics: what motion capture covers
        0: [(-1.9, 0.6), (-0.5, 0.5), (-0.3, 1.0)], 3: [(0.0, 2.2), (0, 0), (0, 0)],
        6: [(-0.5, 0.5)] * 3, 9: [(-0.2, 0.2)] * 3, 12: [(-0.3, 0.3)] * 3,
        **dict.fromkeys((2, 5, 8), [(-0.35, 0.5), (-0.45, 0.45), (-0.35, 0.35)]),  # spine
        **dict.fromkeys((11, 14), [(-0.5, 0.5), (-0.6, 0.6), (-0.3, 0.3)]),  # neck, head
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


def _range_table(kind: str) -> np.ndarray:
    """(21, 3, 2) low/high per body_pose component for a generator kind."""
    table = np.zeros((21, 3, 2))
    for joint, axes in POSE_RANGES[kind].items():
        if isinstance(joint, int):
            table[joint] = axes
            if joint in _LEFT_RIGHT:
                table[_LEFT_RIGHT[joint]] = [axes[0], (-axes[1][1], -axes[1][0]), (-axes[2][1], -axes[2][0])]
    return table


def _axis_angle_from_euler(pitch, yaw, roll) -> np.ndarray:
    """Global orientation as axis-angle of R = Ry(yaw) Rx(pitch) Rz(roll), batched."""
    return Rotation.from_euler("YXZ", np.stack([yaw, pitch, roll], -1)).as_rotvec()


def generate_clips(kind: str, num_clips: int, frames: int, rng: np.random.Generator) -> dict:
    """Smooth clips within joint limits: POSE_KEYS arrays (clips, frames, ...). Each degree of freedom is
    three slow sinusoids plus an offset, squashed by a sigmoid into its [low, high] range."""
    table = POSE_RANGES[kind]
    limits = np.concatenate([_range_table(kind).reshape(63, 2), np.array(table["global"])])  # (66, 2)
    t = np.linspace(0, 1, frames)
    freq = rng.uniform(0.3, 2.0, (num_clips, 66, 3))
    phase = rng.uniform(0, 2 * np.pi, (num_clips, 66, 3))
    amp = rng.normal(0, 1, (num_clips, 66, 3)) / np.sqrt(3)
    offset = rng.normal(0, 0.8, (num_clips, 66, 1))
    signal = offset + (amp[..., None] * np.sin(2 * np.pi * freq[..., None] * t + phase[..., None])).sum(2)
    unit = 1 / (1 + np.exp(-1.5 * signal))  # (clips, 66, frames) in (0, 1)
    values = (limits[None, :, :1] + (limits[None, :, 1:] - limits[None, :, :1]) * unit).transpose(0, 2, 1)
    hands = rng.normal(0, table["hands"] / 2, (num_clips, 1, 30, 3)) + \
        rng.normal(0, table["hands"] / 4, (num_clips, frames, 30, 3))
    betas = np.zeros((num_clips, 10))
    betas[:, :4] = rng.uniform(-table["betas"], table["betas"], (num_clips, 4))
    return dict(global_orient=_axis_angle_from_euler(values[..., 63], values[..., 64], values[..., 65]),
                body_pose=values[..., :63].reshape(num_clips, frames, 21, 3),
                left_hand_pose=hands[:, :, :15].clip(-1, 1), right_hand_pose=hands[:, :, 15:].clip(-1, 1),
                betas=np.repeat(betas[:, None], frames, axis=1), transl=np.zeros((num_clips, frames, 3)))


def held_out_betas(count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, 10) bench shapes, each with a coefficient beyond the training range |beta| <= 1.2."""
    betas = np.zeros((count, 10))
    betas[:, :4] = rng.uniform(-1.2, 1.2, (count, 4))
    betas[np.arange(count), rng.integers(0, 4, count)] = rng.choice([-1, 1], count) * rng.uniform(1.3, 1.8, count)
    return betas


def generate_poses(kind: str, count: int, rng: np.random.Generator) -> dict:
    """`count` poses (float32): a random frame of a fresh 'scan' / 'broad' clip each, or 'hard' templates,
    jittered, on held-out body shapes."""
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
        joints, euler_offset = HARD_TEMPLATES[name]
        for joint, value in joints.items():
            body_pose[i, joint] += value
        euler[i] += euler_offset
    betas = held_out_betas(count, rng)
    hands = rng.normal(0, 0.3, (count, 30, 3)).clip(-1, 1)
    poses = dict(global_orient=_axis_angle_from_euler(euler[:, 0], euler[:, 1], euler[:, 2]), body_pose=body_pose,
                 left_hand_pose=hands[:, :15], right_hand_pose=hands[:, 15:], betas=betas, transl=np.zeros((count, 3)))
    return dict({k: v.astype(np.float32) for k, v in poses.items()}, category=category)


# Motion files. Each layout in circulation is written down once, in POSE_LAYOUTS. Loading is two steps:
# `load_motion` reads one file as it is (no body model needed), then `check_motion` poses it with the
# body model, rotates it y-up and converts its hands.

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
    hands: str  # "absolute" (AMASS: flat hand = 0), "relative" (to the relaxed mean, smplx's default), "auto"
    #             (decided per file from the data: `hand_convention`), "none"


_ROOT_BODY = dict(global_orient=(0, 3), body_pose=(3, 66))  # the root, then SMPL-X's 21 body joints
_AMASS_FPS = ("mocap_framerate", "mocap_frame_rate")
POSE_LAYOUTS = {
    "amass-smplh": PoseLayout("AMASS", (".npz",), "poses", 156,  # root 3, body 63, hands 90
                              dict(_ROOT_BODY, left_hand_pose=(66, 111), right_hand_pose=(111, 156)),
                              ("poses", "trans", "betas"), "trans", _AMASS_FPS, None, "z", "absolute"),
    # AMASS-style SMPL-X files come in both hand conventions (AMASS: absolute; BEAT2 builds smplx with
    # flat_hand_mean=False: relative), so each file's is read off its data.
    "amass-smplx": PoseLayout("AMASS", (".npz",), "poses", 165,  # root 3, body 63, jaw 3, eyes 6, hands 90
                              dict(_ROOT_BODY, left_hand_pose=(75, 120), right_hand_pose=(120, 165)),
                              ("poses", "trans", "betas"), "trans", _AMASS_FPS, None, "z", "auto"),
    "motionx": PoseLayout("Motion-X", (".npy",), None, 322,  # + jaw 3, face 150, trans 3, betas 10
                          dict(_ROOT_BODY, left_hand_pose=(66, 111), right_hand_pose=(111, 156), transl=(309, 312),
                               betas=(312, 322)), (), None, (), None, "y", "relative"),
    # SMPL: root + 23 joints, the first 21 SMPL-X's body; SMPL's two hand joints (66:72) are dropped.
    # `poses`, or `global_orient` + `body_pose` (23 or 21 joints), as video-based estimators write it.
    "smpl72": PoseLayout("SMPL", (".npz", ".npy"), "poses", 72, dict(_ROOT_BODY), (), "trans",
                         ("fps", "mocap_framerate", "mocap_frame_rate"), None, "y", "none"),
    "aistpp": PoseLayout("AIST++", (".pkl",), "smpl_poses", 72, dict(_ROOT_BODY),  # smpl_trans / smpl_scaling: metres
                         ("smpl_poses", "smpl_trans"), "smpl_trans", (), 60.0, "y", "none"),  # no scaling: metres
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


def _width_hint(width: int, suffix: str) -> str:
    """Which layouts have a pose array `width` wide, or the widths there are in files of this type (`suffix`)."""
    names = [n for n, layout in POSE_LAYOUTS.items() if layout.width == width]
    other = "; any other layout: name its columns with --pose-columns"
    if names:
        return f"a {width}-wide pose array is " + " or ".join(
            f"{n} (a {'/'.join(POSE_LAYOUTS[n].suffixes)} file" +
            (f" with keys {', '.join(POSE_LAYOUTS[n].required)})" if POSE_LAYOUTS[n].required else ")")
            for n in names) + other
    of_type = {n: layout.width for n, layout in POSE_LAYOUTS.items() if suffix.lower() in layout.suffixes}
    return f"known widths of {suffix} files: " + ", ".join(
        f"{w} ({'/'.join(n for n, nw in of_type.items() if nw == w)})" for w in sorted(set(of_type.values()))) + other


def _checked(path: Path, array, width: int, what: str) -> np.ndarray:
    """A file's (frames, width) numeric array as float64, or a one-line error naming the file."""
    if array is None:
        raise UserError(f"{path}: {what} holds a pickled object, not an array; save it as a numeric array")
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[1] != width or array.dtype.kind not in "fiu":
        hint = _width_hint(array.shape[1], path.suffix) if array.ndim == 2 else "expected one row per frame"
        raise UserError(f"{path}: {what} has shape {array.shape}, expected (frames, {width}); {hint}")
    if len(array) == 0:
        raise UserError(f"{path}: {what} has no frames; drop this file")
    if not np.isfinite(array).all():
        raise UserError(f"{path}: {what} contains NaN or Inf; fix or drop this file")
    return array.astype(np.float64)


def _read_motion_file(path: Path) -> dict:
    """A motion file's arrays by key ('' for a bare .npy), through plumbing.read_arrays (pickles of
    numpy arrays and plain containers only; an npz's object arrays read as None, some AMASS files carry dicts)."""
    if path.suffix.lower() not in MOTION_SUFFIXES:
        raise UserError(f"{path}: motion files are {', '.join(MOTION_SUFFIXES)}")
    data = read_arrays(path, "re-export it, or drop it from --pose-files")
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a dict; name its arrays with --pose-keys")
    return data


def _detect_layout(path: Path, arrays: dict) -> str:
    """The layout of a file read by _read_motion_file, from its file type, keys and width."""
    candidates = [n for n, layout in POSE_LAYOUTS.items() if path.suffix.lower() in layout.suffixes]
    if "" not in arrays:
        candidates = [n for n in candidates if POSE_LAYOUTS[n].pose_key in arrays or
                      (n == "smpl72" and {"global_orient", "body_pose"} <= set(arrays))]
        if not candidates:
            raise UserError(f"{path} holds keys {some(sorted(map(str, arrays)))}, none of them a known pose array "
                            "(poses, smpl_poses, global_orient + body_pose); see --pose-layout, or name the arrays "
                            "with --pose-keys (e.g. global_orient=KEY,body_pose=KEY; packed: poses=KEY --pose-columns)")
    if len(candidates) == 1:
        return candidates[0]
    pose = arrays.get("", arrays.get("poses"))
    width = np.shape(pose)[-1] if pose is not None and np.ndim(pose) == 2 else None
    matching = [n for n in candidates if POSE_LAYOUTS[n].width == width]
    if len(matching) != 1:
        raise UserError(f"{path}: cannot tell its layout (pose array shape {np.shape(pose)}); "
                        f"{_width_hint(width or 0, path.suffix)}")
    return matching[0]


def load_motion(path: Path, layout: str = "auto", columns: dict | None = None, keys: dict | None = None) -> dict:
    """One motion file as it is: POSE_KEYS arrays (frames, ...) in the file's own world and hand convention, plus
    path, layout, fps (None when unknown) and fps_from (where it came from), up (the layout's) and hands;
    `columns`, `keys`: see _load_mapped."""
    path = Path(path)
    arrays = _read_motion_file(path)
    if columns or keys:
        return _checked_angles(_load_mapped(path, arrays, columns or {}, keys or {}))
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
        orient, body = (_part(path, arrays[key], key, repr(key)) for key in ("global_orient", "body_pose"))
        if len(orient) != len(body):
            raise UserError(f"{path}: 'global_orient' has {len(orient)} frames, 'body_pose' {len(body)}")
        poses = np.concatenate([orient, body, np.zeros((len(body), 6))], 1)
    else:
        raise UserError(f"{path} lacks {spec.family} keys ['{spec.pose_key}'] (or global_orient + body_pose)")
    poses = _checked(path, poses, spec.width, f"'{spec.pose_key or 'the array'}'")
    frames = len(poses)
    clip = {key: poses[:, slice(*spec.columns[key])].reshape((frames,) + shape) if key in spec.columns
            else np.zeros((frames,) + shape) for key, shape in POSE_KEYS.items()}
    if spec.trans_key in arrays:
        clip["transl"] = _checked(path, arrays[spec.trans_key], 3, f"'{spec.trans_key}'")
        if len(clip["transl"]) != frames:
            raise UserError(f"{path}: '{spec.trans_key}' has {len(clip['transl'])} frames, the poses {frames}")
        if name == "aistpp" and "smpl_scaling" in arrays:  # AIST++ translations are in its scaled SMPL fit's units
            clip["transl"] = clip["transl"] / read_scalar(path, arrays, "smpl_scaling", "AIST++'s scale of smpl_trans")
    if "betas" in arrays and "betas" not in spec.columns:
        betas = arrays["betas"]  # (10,), (16,), or per frame: the first frame's
        betas = _checked(path, None if betas is None else np.reshape(betas, (1, -1)), np.size(betas), "'betas'")[0, :10]
        clip["betas"] = np.repeat(np.pad(betas, (0, 10 - len(betas)))[None], frames, 0)
    if "gender" in arrays:
        gender = str(read_scalar(path, arrays, "gender")).strip().lower()
        if gender not in GENDERS:
            raise UserError(f"{path}: gender is {gender!r}, expected one of {', '.join(GENDERS)}; fix the key or "
                            "drop it")
    fps_key = next((key for key in spec.fps_keys if key in arrays), None)
    fps = spec.fps if fps_key is None else read_scalar(path, arrays, fps_key, "frames per second; or pass --fps")
    fps_from = f"key {fps_key}" if fps_key is not None else f"the {name} layout's default" if fps else None
    return _checked_angles(dict(clip, path=path, layout=name, fps=fps, fps_from=fps_from, up=spec.up, hands=spec.hands,
                                unscaled=name == "aistpp" and "smpl_scaling" not in arrays))


def _checked_angles(clip: dict) -> dict:
    """A loaded clip, refused when an axis-angle exceeds MAX_POSE_ANGLE (a file in degrees, or garbage)."""
    for key in ROTATION_KEYS:
        angle = np.linalg.norm(np.reshape(clip[key], (len(clip[key]), -1, 3)), axis=-1).max()
        if angle > MAX_POSE_ANGLE:
            raise UserError(f"{clip['path']}: '{key}' holds an axis-angle of {angle:.4g} rad, beyond "
                            f"{MAX_POSE_ANGLE:.4g} (4 pi): not radians of a pose (degrees?); fix or drop the file")
    return clip


# Layouts POSE_LAYOUTS does not know, described by flags: --pose-columns names the columns of one packed
# (frames, width) array per SMPL-X part, --pose-keys the key path of each part in a nested dict or pickle.
MAPPED_WIDTHS = dict(global_orient=(3,), body_pose=(63, 69), left_hand_pose=(45,), right_hand_pose=(45,),
                     transl=(3,), betas=tuple(range(1, 17)))  # body_pose 69: SMPL's 23 joints (_part)


def parse_pose_map(text: str | None, flag: str) -> dict:
    """--pose-columns 'part=start:stop,...' (and hands=absolute|relative|auto) -> {part: (start, stop)};
    --pose-keys 'part=key.path,...' (and poses=, the array the columns index) -> {part: key path}."""
    extra = ("hands",) if flag == "--pose-columns" else ("poses",)
    out = {}
    for item in filter(None, (text or "").split(",")):
        part, _, value = (s.strip() for s in item.partition("="))
        if flag == "--pose-columns" and part in MAPPED_WIDTHS:
            start, _, stop = value.partition(":")
            fits = start.isdigit() and stop.isdigit() and int(stop) - int(start) in MAPPED_WIDTHS[part]
            value = (int(start), int(stop)) if fits else None
        elif part == "hands":
            value = value if value in ("absolute", "relative", "auto") else None
        if part not in (*MAPPED_WIDTHS, *extra) or not value or part in out:
            raise UserError(f"{flag}: cannot read {item!r}; give PART=VALUE once per part of "
                            f"{', '.join((*MAPPED_WIDTHS, *extra))} (column spans: 3, body_pose 63 or 69, hands 45)")
        out[part] = value
    return out


def _part(path: Path, value, part: str, what: str) -> np.ndarray:
    """One SMPL-X part of a file as (frames, width), from (frames, ...); body_pose from 63 columns or from SMPL's 69
    (23 joints: SMPL-X's 21 body joints, then SMPL's two hand joints, which are dropped)."""
    value = np.reshape(value, (len(value), -1)) if np.ndim(value) > 1 else value
    wide = 69 if part == "body_pose" and np.shape(value)[-1:] == (69,) else MAPPED_WIDTHS[part][0]
    return _checked(path, value, wide, what)[:, :MAPPED_WIDTHS[part][0]]


def _load_mapped(path: Path, arrays: dict, columns: dict, keys: dict) -> dict:
    """One file through --pose-columns / --pose-keys, as load_motion returns it (up y until checked)."""
    parts = {part: (key_path(path, arrays, key, "--pose-keys"), key) for part, key in keys.items() if part in MAPPED_WIDTHS}
    spans = {part: span for part, span in columns.items() if part in MAPPED_WIDTHS}
    if spans:
        packed = key_path(path, arrays, keys["poses"], "--pose-keys") if "poses" in keys else arrays.get("", arrays.get("poses"))
        reach = max(stop for _, stop in spans.values())
        if np.ndim(packed) != 2 or np.shape(packed)[1] < reach:  # None: no 'poses' key
            raise UserError(f"{path}: --pose-columns reaches column {reach} of a (frames, width) array, the file's is "
                            f"{np.shape(packed)}; fix --pose-columns, or name the array with --pose-keys poses=KEY")
        parts.update({part: (np.asarray(packed)[:, slice(*span)], f"columns {span[0]}:{span[1]}")
                      for part, span in spans.items()})
    clip = {}
    for part in sorted(parts, key=list(MAPPED_WIDTHS).index):  # global_orient first (the frames), betas last
        value, what = parts[part]
        frames = len(clip.get("global_orient", ()))
        if part == "betas":  # per file or per frame: the first frame's, as for the known layouts
            value = _checked(path, np.reshape(value, (1, -1))[:, :10], min(np.size(value), 10), repr(what))[0]
            clip["betas"] = np.repeat(np.pad(value, (0, 10 - len(value)))[None], frames, 0)
            continue
        value = _part(path, value, part, repr(what))
        if frames and len(value) != frames:
            raise UserError(f"{path}: {what!r} has {len(value)} frames, global_orient {frames}; fix --pose-keys")
        clip[part] = value.reshape((len(value),) + POSE_KEYS[part])
    frames = len(clip["global_orient"])
    clip = {key: clip.get(key, np.zeros((frames,) + shape)) for key, shape in POSE_KEYS.items()}
    fps_key = next((k for k in ("fps", *_AMASS_FPS) if k in arrays), None)
    fps = None if fps_key is None else read_scalar(path, arrays, fps_key, "frames per second")
    return dict(clip, path=path, layout="mapped", fps=fps, fps_from=fps_key and f"key {fps_key}", up="y",
                hands=columns.get("hands", "relative"), unscaled=False,
                hands_from="--pose-columns" if "hands" in columns else "the default of --pose-columns / --pose-keys")


def load_y_up(path: Path, layout: str) -> dict:
    """One motion file by `load_motion` with its root orientation turned y-up from the layout's axis; hands
    and translation as stored (no body model needed)."""
    clip = load_motion(path, layout)
    return dict(clip, global_orient=_up_to_y(clip["global_orient"], clip["up"]))


def load_pose_files(layout: str, path: Path, columns: dict | None = None, keys: dict | None = None) -> list[dict]:
    """Every motion file of a file or folder tree (sorted by path), read by `load_motion`; in a folder,
    AMASS's per-subject shape files and hidden files are skipped."""
    if path is None or not Path(path).exists():
        raise UserError(f"--pose-files {path} does not exist; pass a motion file or a folder of them")
    path = Path(path)
    suffixes = MOTION_SUFFIXES if layout == "auto" or columns or keys else POSE_LAYOUTS[layout].suffixes
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in suffixes
        and not any(fnmatch(f.name, pattern) for pattern in SKIPPED_MOTION_FILES))
    if not files:
        raise UserError(f"{path} holds no {'/'.join(suffixes)} files for --pose-layout {layout}")
    # disable=None: a bar on a terminal only, so a refusal stays one line in logs and pipes
    with tqdm(files, desc="read motion files", unit="file", leave=False, disable=None) as bar:  # closed before an error prints
        return [load_motion(f, layout, columns, keys) for f in bar]


def _up_to_y(global_orient: np.ndarray, up: str) -> np.ndarray:
    """Re-express root orientations recorded in a world whose up axis is `up` in our y-up world."""
    angle, axis = UP_TO_Y[up]
    return (Rotation.from_euler(axis, angle, degrees=True) * Rotation.from_rotvec(global_orient)).as_rotvec()


def upright_share(body, global_orient: np.ndarray, body_pose: np.ndarray) -> float:
    """Share of frames whose pelvis -> head direction is within acos(UPRIGHT_COS) of +y."""
    with torch.no_grad():
        joints = body_joints(body, {"global_orient": torch.as_tensor(global_orient, dtype=torch.float32),
                                    "body_pose": torch.as_tensor(body_pose, dtype=torch.float32)})
    up = joints[:, 15] - joints[:, 0]
    return float(((up[:, 1] / up.norm(dim=1).clamp(min=1e-9)) > UPRIGHT_COS).float().mean())


def hand_convention(body, left_hand_pose: np.ndarray, right_hand_pose: np.ndarray) -> tuple[str, float, float]:
    """A clip's hand convention read off its data: hand poses (frames, 15, 3) x2 stored relative to smplx's
    relaxed mean (flat_hand_mean=False, e.g. BEAT2) rest near zero; stored absolute (AMASS: a flat hand is
    zero) they rest near that mean. Returns 'relative' or 'absolute' and the distances (rad, over all 90
    numbers) of the clip's mean hand pose to zero and to the body model's relaxed mean."""
    mean_pose = np.concatenate([left_hand_pose, right_hand_pose], 1).reshape(len(left_hand_pose), -1).mean(0)  # (90,)
    relaxed = torch.cat([body.left_hand_mean, body.right_hand_mean]).double().cpu().numpy()  # (90,)
    to_zero, to_relaxed = float(np.linalg.norm(mean_pose)), float(np.linalg.norm(mean_pose - relaxed))
    return ("relative" if to_zero <= to_relaxed else "absolute"), to_zero, to_relaxed


def check_motion(body, clip: dict, up: str = "auto") -> dict:
    """A clip from `load_motion` in our conventions: y-up (the axis `up`, or with 'auto' the first of the
    layout's, y, z, -y under which the body stands upright; upright under none is refused), hands relative
    to the relaxed mean (hands 'auto': the file's convention read off its data, `hand_convention`).
    `read_as` says how its up axis and hands were read, for the log."""
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
    hands, hands_from = clip["hands"], clip.get("hands_from", "the layout's")
    if hands == "none":
        hands_from = "the layout has none: smplx's relaxed hands"
    if hands == "auto":
        hands, to_zero, to_relaxed = hand_convention(body, clip["left_hand_pose"], clip["right_hand_pose"])
        hands_from = (f"from the data: mean hand pose {to_zero:.2f} rad from zero, {to_relaxed:.2f} from the "
                      "relaxed mean")
    up_from = "--up" if up != "auto" else "the layout's" if axis == clip["up"] and clip["layout"] != "mapped" else \
        f"the first axis the body stands upright in: {tried[axis]:.0%} of {len(pick)} checked frames"
    out = dict(clip, up=axis, global_orient=_up_to_y(clip["global_orient"], axis), hands="relative",
               read_as=f"hands {hands} ({hands_from}), up {axis} ({up_from})")
    if axis != "y":  # rotate the whole body about the origin: the root joint (J0) moves, so transl does
        rotation = Rotation.from_euler(UP_TO_Y[axis][1], UP_TO_Y[axis][0], degrees=True)
        with torch.no_grad():
            rest_root = (body.J_regressor[0] @ body.v_template).double().numpy()  # (3,)
            root_dirs = torch.einsum("n,nkl->kl", body.J_regressor[0], body.shapedirs).double().numpy()  # (3, 10)
        root = rest_root + clip["betas"] @ root_dirs.T  # (frames, 3)
        out["transl"] = rotation.apply(root + clip["transl"]) - root
    if hands == "absolute":  # to smplx's flat_hand_mean=False: subtract this body's relaxed mean
        out["left_hand_pose"] = clip["left_hand_pose"] - body.left_hand_mean.reshape(15, 3).double().numpy()
        out["right_hand_pose"] = clip["right_hand_pose"] - body.right_hand_mean.reshape(15, 3).double().numpy()
    return out


def neighbour_offset(k: int, frames_per_step: float) -> int:
    """Frames between an anchor and its k-th neighbour on one side (k steps of frames_per_step)."""
    return math.floor(k * frames_per_step + 0.5)


def temporal_neighbours(length: int, frame: int, count: int, frames_per_step: float) -> list[int]:
    """`frame` and its count - 1 nearest frames at whole multiples of one step (fps x spacing, not
    necessarily whole frames), the earlier first at equal distance; one-sided near the clip's ends."""
    picked, k = [frame], 1
    while len(picked) < count and neighbour_offset(k, frames_per_step) < length:
        offset = neighbour_offset(k, frames_per_step)
        picked += [f for f in (frame - offset, frame + offset) if 0 <= f < length][:count - len(picked)]
        k += 1
    return picked


def read_pose_inputs(args: Args, body) -> list[dict]:
    """The motion files of --pose-files, every one read and checked (layout, values, frame rate, up axis)
    before anything is written; clips too short for the neighbours are left out."""
    clips = [check_motion(body, clip, args.up) for clip in load_pose_files(args.pose_layout, args.pose_files,
                                                                            *args.pose_map)]
    spacing = f"--neighbour-spacing {args.neighbour_spacing:.3f} s"
    kept, short = [], []
    for clip in clips:
        if args.fps is not None:
            said = clip["fps"] not in (None, args.fps)
            clip["fps_from"] = "--fps" + (f", the file says {clip['fps']:g}" if said else "")
        clip["fps"] = args.fps or clip["fps"]
        if clip["fps"] is None:
            raise UserError(f"{clip['path']}: the {clip['layout']} file carries no frame rate; pass --fps with the "
                            "rate it was recorded at")
        step = clip["fps"] * args.neighbour_spacing
        if neighbour_offset(1, step) < 1:
            raise UserError(f"{clip['path']}: at {clip['fps']:g} fps frames are {1 / clip['fps']:.3f} s apart, more "
                            f"than {spacing}; pass a larger --neighbour-spacing")
        (kept if len(clip["body_pose"]) > neighbour_offset(args.neighbours, step) else short).append(clip)
    if short:
        print(f"poses: left out {len(short)} of {len(clips)} files shorter than "
              f"{args.neighbours * args.neighbour_spacing:.2f} s (--neighbours {args.neighbours} x {spacing}): "
              f"{some([c['path'] for c in short])}")
    if not kept:
        raise UserError(f"{args.pose_files}: every clip is too short for --neighbours {args.neighbours} at {spacing}; "
                        "pass smaller values")
    unscaled = [c["path"] for c in kept if c["unscaled"]]
    if unscaled:
        print(f"poses: {len(unscaled)} AIST++ files carry no smpl_scaling; smpl_trans taken as metres: {some(unscaled)}")
    for clip in kept:  # how each file was read: a wrong frame rate, hand convention or up axis shows here
        print(f"poses: {clip['path']}: {clip['layout']}, {len(clip['body_pose'])} frames at {clip['fps']:g} fps "
              f"({clip['fps_from']}), {clip['read_as']}")
    # Files of a known layout that stand upright only in another axis than the layout's (a mapped file has none).
    rotated = [c["path"] for c in kept if c["layout"] in POSE_LAYOUTS and c["up"] != POSE_LAYOUTS[c["layout"]].up]
    print(f"poses: {len(kept)} files ({dict(Counter(c['layout'] for c in kept))}), "
          f"{sum(len(c['body_pose']) for c in kept)} frames, up axis {dict(Counter(c['up'] for c in kept))}"
          + (f"; not the layout's own up axis: {some(rotated)}" if rotated else ""))
    return kept


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
    hue_lo, hue_hi = HELD_OUT_HUES if held_out else TRAIN_HUES
    hsv = np.stack([rng.uniform(hue_lo, hue_hi, (count, 2)), rng.uniform(0.35, 0.9, (count, 2)),
                    rng.uniform(0.35, 0.95, (count, 2))], -1)
    skin = SKIN_TONES[rng.integers(*((TRAIN_SKIN, HELD_OUT_SKIN) if held_out else (0, TRAIN_SKIN)), count)]
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
    """Pose, centre and render B subjects (POSE_KEYS params; outfits: colors, style) -> render_views' keys and
    the centred vertices, joints and transl (the transl that makes body_forward give the centred mesh)."""
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
        coverage, depth_sum = (F.avg_pool2d(big[k].flatten(0, 1)[:, None], 2)[:, 0].unflatten(0, big[k].shape[:2])
                               for k in ("mask", "depth"))
        out["mask"] = (coverage >= 0.5).float()
        out["depth"] = torch.where(coverage > 0, depth_sum / coverage.clamp(min=1e-6), 0.0) * out["mask"]
    return dict(out, vertices=vertices, joints=joints, transl=-centre)


# --- the datasets ---------------------------------------------------------------------------------

def _render_in_batches(body, poses: dict, outfits: dict, args: Args, desc: str, azimuths=VIEW_AZIMUTHS,
                       batch_size: int = 32) -> dict[str, np.ndarray]:
    """Render all subjects with a progress bar; returns uint8 images and float32 geometry."""
    regions = vertex_regions(body)
    parts: dict[str, list] = {}
    for start in tqdm(range(0, len(poses["body_pose"]), batch_size), desc=desc, unit="batch", leave=False, disable=None):
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


def _views(rendered: dict) -> dict[str, np.ndarray]:
    return {k: rendered[k] for k in ("color", "normal", "mask", "depth")}


def _pose_arrays(poses: dict, rendered: dict, outfits: dict) -> dict[str, np.ndarray]:
    arrays = {k: np.asarray(poses[k], np.float32) for k in POSE_KEYS if k != "transl"}
    return dict(arrays, transl=rendered["transl"], joints=rendered["joints"],
                outfit_colors=outfits["colors"], outfit_style=outfits["style"])


def _write_meshes(folder: Path, body, vertices: np.ndarray, outfits: dict, prefix: str = ""):
    """One coloured .ply per subject: the GT meshes."""
    faces = body.faces_tensor.cpu().numpy()
    colors = paint_vertices(vertex_regions(body), outfits["colors"], outfits["style"]).numpy()
    folder.mkdir(parents=True, exist_ok=True)
    for i, (verts, cols) in enumerate(zip(vertices, colors)):
        mesh = trimesh.Trimesh(verts, faces, vertex_colors=(cols * 255).astype(np.uint8), process=False)
        mesh.export(folder / f"{prefix}{i:05d}.ply")


def _sheet_rows(rendered: dict, subjects) -> list[np.ndarray]:
    """Contact-sheet rows of the given subjects: their colour views, then their normal views."""
    return [np.concatenate([rendered["color"][i], rendered["normal"][i]]) for i in subjects]


def manifest(args: Args, source: str, files: dict, **extra) -> dict:
    return dict(stage="prepare_data", files=files, count=sum(files.values()), views=list(VIEW_AZIMUTHS),
                resolution=args.resolution, seed=args.seed, preset=args.preset, source=source,
                conventions=dict(joints="SMPL-X (smplx.joint_names), 55", bones=[list(b) for b in BONES],
                                 cameras=f"orthographic, elevation 0, half-extent {ORTHO_HALF_EXTENT} m, y up",
                                 normals="camera space, stored as (n + 1) / 2", background=BACKGROUND,
                                 units="metres", frame="each subject centred on its mesh bounding box"), **extra)


def _face_front(global_orient: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Root orientations (P, 3) turned about y to a random heading in [-0.8, 0.8] rad, so the front view
    sees the person's front; float32."""
    heading = rng.uniform(-0.8, 0.8, len(global_orient))
    forward = Rotation.from_rotvec(global_orient).as_matrix()[:, :, 2]  # the body's +z in the world
    turn = Rotation.from_euler("y", (heading - np.arctan2(forward[:, 0], forward[:, 2]))[:, None])
    return (turn * Rotation.from_rotvec(global_orient)).as_rotvec().astype(np.float32)


def build_scans(body, args: Args, folder: Path, rng: np.random.Generator) -> dict:
    """Scan-like poses, training outfits and shapes, six views + GT meshes: the base model's data."""
    counts, sheets = {}, []
    with atomic_dir(folder) as tmp:
        for split, count in (("train", args.num_scans), ("val", args.num_val_scans)):
            poses = generate_poses("scan", count, rng)
            outfits = sample_outfits(count, rng, held_out=False)
            rendered = _render_in_batches(body, poses, outfits, args, f"scans/{split}")
            save_npz(tmp / f"{split}.npz", **_views(rendered), **_pose_arrays(poses, rendered, outfits))
            _write_meshes(tmp / "meshes", body, rendered["vertices"], outfits, prefix=f"{split}_")
            counts[f"{split}.npz"] = count
            sheets += _sheet_rows(rendered, range(min(4, count)))
        contact_sheet(tmp / "contact_sheet.png", sheets)
        write_json(tmp / "manifest.json", manifest(args, "generated scan-like poses", counts))
    return counts


def build_drpose(body, args: Args, folder: Path, rng: np.random.Generator, scan_features: torch.Tensor,
                 clips: list[dict] | None = None) -> dict:
    """DrPose15K-style pairs: FPS anchors from a broad motion pool (generated, or `clips`, the checked motion
    files), each with its temporal neighbours, imaged from the front only: no multi-view image, by design."""
    if args.pose_source == "generated":
        pool = generate_clips("broad", args.pose_pool_clips, GENERATED_CLIP_FRAMES, rng)
        clips = [dict({k: v[c] for k, v in pool.items()}, fps=GENERATED_FPS) for c in range(args.pose_pool_clips)]
    frames = np.concatenate([np.stack([np.full(len(c["body_pose"]), i), np.arange(len(c["body_pose"]))], 1)
                             for i, c in enumerate(clips)])  # (P, 2): clip, frame
    features = pose_features(body, {k: np.concatenate([c[k] for c in clips]) for k in POSE_KEYS})
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
    poses["global_orient"] = _face_front(poses["global_orient"], rng)
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


def build_ceiling(body, args: Args, folder: Path, pairs_folder: Path) -> dict:
    """Six-view GT renders of exactly the DrPose pairs (poses, outfits, shapes read back from pairs.npz): the
    3D data DrPose does without, for the supervised ceiling only; scans/train.npz's keys plus `anchor`."""
    pairs = load_split(pairs_folder / "pairs.npz", [*POSE_KEYS, "outfit_colors", "outfit_style", "anchor"])
    poses = {k: pairs[k] for k in POSE_KEYS}
    outfits = dict(colors=pairs["outfit_colors"], style=pairs["outfit_style"])
    count = len(pairs["body_pose"])
    rendered = _render_in_batches(body, poses, outfits, args, "drpose_gt")
    with atomic_dir(folder) as tmp:
        save_npz(tmp / "train.npz", **_views(rendered), anchor=pairs["anchor"],
                 **_pose_arrays(poses, rendered, outfits))
        contact_sheet(tmp / "contact_sheet.png", _sheet_rows(rendered, range(min(4, count))))
        write_json(tmp / "manifest.json", manifest(
            args, f"six-view GT renders of {pairs_folder.name}/pairs.npz (same poses, outfits, shapes, order)",
            {"train.npz": count}, reader="supervised ceiling only; DrPose never reads this folder",
            multi_view_images=True))
    return {"train.npz": count}


def dynamic_bench_poses(body, count: int, scan_features: torch.Tensor, rng: np.random.Generator) -> dict:
    """The bench's `dynamic` split (MixamoRP's role): `count` poses (POSE_KEYS, float32) from 4 x count fresh
    broad clips of a stream no other set draws from; of their frames, the quarter farthest from the scans,
    spread by farthest-point sampling so the split covers the family's hard part, not one clip."""
    clips = generate_clips("broad", 4 * count, GENERATED_CLIP_FRAMES, rng)
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in clips.items() if k in POSE_KEYS}
    features = torch.cat([pose_features(body, {k: v[i:i + 1024] for k, v in flat.items()})
                          for i in range(0, len(flat["body_pose"]), 1024)])  # (P, 66), a chunk at a time
    distance = torch.cdist(features, scan_features).amin(1).numpy()  # (P,) to the nearest scan
    candidates = np.argsort(-distance, kind="stable")[:max(count, len(distance) // 4)]
    chosen = candidates[farthest_point_sampling(features[candidates], count, rng)]
    poses = {k: v[chosen].astype(np.float32) for k, v in flat.items()}
    poses["global_orient"] = _face_front(poses["global_orient"], rng)  # as build_drpose
    poses["betas"] = held_out_betas(count, rng).astype(np.float32)  # held-out shapes, as the extreme split
    return poses


BENCH_SPLITS = {
    "dynamic": "held-out frames of the broad motion family DrPose trains on (own clips, none in DrPose's "
               "pool), the quarter farthest from the scans, spread by FPS; held-out outfits and shapes "
               "(MixamoRP's role)",
    "extreme": "hard-pose templates (inverted, cartwheel, ...) that no training set covers, jittered; "
               "held-out outfits and shapes",
}


def build_bench(body, args: Args, folder: Path, rng_extreme: np.random.Generator, rng_dynamic: np.random.Generator,
                scan_features: torch.Tensor) -> dict:
    """The benchmark's two splits (BENCH_SPLITS) in one file, `dynamic` subjects first, with GT meshes and views;
    `scan_distance`: each pose's distance to its nearest scans/train pose in pose_features space (metres)."""
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
    with atomic_dir(folder) as tmp:
        save_npz(tmp / "bench.npz", image=rendered["color"][:, 0], **_views(rendered), split=split,
                 category=poses["category"], scan_distance=scan_distance.astype(np.float32),
                 **_pose_arrays(poses, rendered, outfits))
        _write_meshes(tmp / "meshes", body, rendered["vertices"], outfits)
        shown = [*range(min(3, num_dynamic)), *range(num_dynamic, num_dynamic + min(3, num_extreme))]
        contact_sheet(tmp / "contact_sheet.png", _sheet_rows(rendered, shown))
        distances = {name: float(scan_distance[split == name].mean()) for name in BENCH_SPLITS}
        write_json(tmp / "manifest.json", manifest(
            args, "bench: split dynamic (held-out broad motion) then split extreme (hard-pose templates); "
            "held-out outfits and shapes", {"bench.npz": num_dynamic + num_extreme},
            splits={"dynamic": num_dynamic, "extreme": num_extreme}, split_notes=BENCH_SPLITS,
            order="all dynamic subjects first, then all extreme ones (key `split`)",
            categories=["dynamic", *sorted(HARD_TEMPLATES)], scan_distance_mean=distances))
    return dict(dynamic=num_dynamic, extreme=num_extreme,
                scan_distance_mean={name: round(d, 2) for name, d in distances.items()})


# --- main -----------------------------------------------------------------------------------------

def check_args(args: Args) -> None:
    """The motion-file flags and how they fit together, refused in one line before anything is read or written."""
    if args.pose_source == "files" and args.pose_files is None:
        raise UserError("--pose-source files needs --pose-files PATH; pass a motion file or a folder of them")
    given = dict(pose_files=args.pose_files is not None, fps=args.fps is not None,
                 pose_layout=args.pose_layout != "auto", up=args.up != "auto",
                 pose_columns=args.pose_columns is not None, pose_keys=args.pose_keys is not None)
    columns, keys = args.pose_map  # a flag that does not parse is refused here
    if (columns or keys) and args.pose_layout != "auto":
        raise UserError("--pose-columns / --pose-keys describe the layout themselves; drop --pose-layout")
    if (columns or keys) and not {"global_orient", "body_pose"} <= set(columns) | set(keys):
        raise UserError("--pose-columns / --pose-keys must place global_orient and body_pose; add them")

    file_flags = ["--" + name.replace("_", "-") for name, flag in given.items() if flag]
    if args.pose_source == "generated" and file_flags:
        raise UserError(f"{', '.join(file_flags)} apply to motion files only; add --pose-source files --pose-files "
                        "PATH, or drop them")
    check_number(args, "fps", 0, above=True, high=MAX_FPS, fix=f"pass the files' frame rate, > 0 and <= {MAX_FPS:g}")
    check_number(args, "neighbour_spacing", 0, above=True, high=MAX_SPACING_S,
                 fix="pass the seconds between an anchor's neighbours, e.g. 0.0667")
    if args.gender != "neutral" and args.body_model is None:
        raise UserError("--gender picks a model of a real SMPL-X folder; pass --body-model DIR with it")
    if args.pose_source == "generated" and None not in (args.pose_pool_clips, args.num_anchors) and \
            args.pose_pool_clips * GENERATED_CLIP_FRAMES < args.num_anchors:
        raise UserError(f"--pose-pool-clips {args.pose_pool_clips} x {GENERATED_CLIP_FRAMES} frames is fewer than "
                        f"--num-anchors {args.num_anchors}; raise --pose-pool-clips or lower --num-anchors")


def stage_body(args: Args, scratch: Path) -> Path:
    """The body folder to check the inputs with, before the run is written to: the user's SMPL-X folder,
    this run's exported mannequin (the export is deterministic), or a fresh export into `scratch`."""
    if args.body_model is not None:
        return args.body_model
    try:
        source = str(json.loads((args.run_dir / "body" / "manifest.json").read_text()).get("source", ""))
    except (OSError, ValueError, AttributeError):
        source = ""
    if source.startswith("mannequin-x") and (args.run_dir / "body" / "SMPLX_NEUTRAL.npz").exists():
        return args.run_dir / "body"
    facts = export_mannequin_smplx(scratch / "SMPLX_NEUTRAL.npz")
    write_json(scratch / "manifest.json", dict(facts, stage="prepare_data", file="SMPLX_NEUTRAL.npz",
                                               loader="smplx.create"))
    return scratch


def prepare_body(args: Args, staged: Path) -> Path:
    """The run's body/ that every stage loads: the exported mannequin, or a manifest.json naming the user's
    SMPL-X file and gender (the file itself stays where the user keeps it: its licence)."""
    folder = args.run_dir / "body"
    if args.body_model is not None:
        found, gender = body_model_file(args.body_model, args.gender)
        with atomic_dir(folder) as tmp:
            write_json(tmp / "manifest.json", dict(stage="prepare_data", file=str(found.resolve()), gender=gender,
                                                   source="SMPL-X folder", loader="smplx.create"))
    elif staged != folder:
        with atomic_dir(folder) as tmp:
            for item in staged.iterdir():
                shutil.copy2(item, tmp / item.name)
    return folder


def main(args: Args) -> None:
    args = args.resolved()  # every flag checked (Args.check)
    start = time.time()
    # --- inputs first: the body model and every pose file are read and checked; nothing is written ---
    with tempfile.TemporaryDirectory() as scratch:
        staged = stage_body(args, Path(scratch))
        body = load_body_model(staged, args.device, args.gender if args.body_model is not None else None)
        clips = read_pose_inputs(args, body) if args.pose_source == "files" else None
        if clips is not None and sum(len(c["body_pose"]) for c in clips) < args.num_anchors:
            raise UserError(f"{args.pose_files}: the pose pool has {sum(len(c['body_pose']) for c in clips)} frames, "
                            f"fewer than --num-anchors {args.num_anchors}; lower --num-anchors or add motion files")
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


# --- data hand-offs every stage reads: manifests and checked npz splits -----------------------

def load_split(path: Path, expect_keys=(), made_by: str = "python prepare_data.py") -> dict:
    """Arrays of one npz hand-off file, checked against its folder's manifest.json and the conventions."""
    path = Path(path)
    manifest = read_manifest(path.parent, made_by)
    arrays = read_npz(path, expect_keys, made_by)
    check_counts(path, arrays, manifest, made_by)
    check_arrays(path, arrays, manifest, made_by)
    return arrays


def check_counts(path: Path, arrays: dict, manifest: dict, made_by: str) -> None:
    """Every count the manifest states about `path` against the arrays: its `files` entry, `count` (when
    the folder holds this one file), the bench `splits` (against the `split` key) and the `anchors` of the
    pairs (against the `anchor` key). A manifest is believed only when true."""
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    held, where = len(next(iter(arrays.values()))), path.parent / "manifest.json"
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    splits = manifest.get("splits")
    claims = {f"files[{path.name}]": files.get(path.name),
              "count": manifest.get("count") if set(files) <= {path.name} else None,
              "splits": (sum(splits.values()) if all(map(whole, splits.values())) else splits)
              if isinstance(splits, dict) else splits}
    for name, claim in claims.items():
        if claim is not None and (not whole(claim) or claim != held):
            raise UserError(f"{where}: the count {name} = {claim!r} does not match the {held} subjects of {path.name}; "
                            f"re-run `{made_by}`")
    if isinstance(splits, dict) and "split" in arrays:
        found = {name: int((arrays["split"] == name).sum()) for name in splits}
        if found != splits:
            raise UserError(f"{where}: the counts splits = {splits} do not match {path.name}'s {found}; "
                            f"re-run `{made_by}`")
    anchors = manifest.get("anchors")
    if anchors is not None and "anchor" in arrays and anchors != len(np.unique(arrays["anchor"])):
        raise UserError(f"{where}: the count anchors = {anchors!r} does not match the "
                        f"{len(np.unique(arrays['anchor']))} anchors of {path.name}; re-run `{made_by}`")


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


if __name__ == "__main__":
    run_cli(main, Args)
