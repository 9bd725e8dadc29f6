"""Stage 5 of DrPose: from one image to a mesh (generate the six views, fit the body, carve).

    python reconstruct.py --run-dir runs/demo --model base            # every bench subject, base model
    python reconstruct.py --run-dir runs/demo --model drpose          # the same noise, DrPose model
    python reconstruct.py --input photo.png --model runs/demo/base    # one image (alpha or plain background)
    python reconstruct.py --oracle --skeleton ideal                   # GT six views: carving alone
    python reconstruct.py --views-from runs/demo/recon/base --tag refit   # re-fit given views

PSHuman's reconstruction, which DrPose reuses, made CPU-sized:
  1. views   pretrain.sample_views turns the (cropped, centred) image into six colour + normal
             views; the noise comes from a torch.Generator seeded per sample, so base and drpose
             see identical noise for subject i.
  2. body    SMPL-X global_orient, body_pose, betas, a scale and a translation are fitted so that
             the body's own skeleton maps (posescore.skeleton_maps) agree with the pose reader's
             maps of the views, plus a soft silhouette term. The pose reader is a g_skel network
             trained apart from the reward's (pose_reader/: broad poses in any orientation,
             another seed), so the reconstruction does not read poses with the very network DrPose
             was pushed against (a reward optimised is a poor judge of itself). Start: 2D joints read off the maps
             (posescore.joints_from_maps), triangulated (orthographic views make it linear), then
             turned into joint rotations bone by bone (analytic IK).
  3. carve   per-vertex offsets with Laplacian smoothness move the fitted surface until the
             differentiable renders (prepare_data.render_views) match the views' normal maps and
             silhouettes, with PSHuman's per-view weights; then vertices are coloured from the
             colour views they are seen in.

Writes runs/<name>/recon/<tag>/ (tag: the model folder's name, `oracle` or --tag):
    manifest.json        count, model folder, seed, resolution, source dataset, settings; written last
                         (manifest.partial.json holds the recipe while a run is under way)
    {i:05d}/views.npz    key `latents` (V, 6, H, W) float32 in [-1, 1] (colour then normal)
    {i:05d}/views.png    input | colour views | normal views
    {i:05d}/body.json    fitted SMPL-X params; world = scale * smplx(params, transl=0) + transl
    {i:05d}/joints.npz   key `joints` (55, 3) metres, the centred world frame of the GT
    {i:05d}/mesh.ply     carved mesh, metres, same frame, vertex colours
    judge_<set>.npz      the model's views of a judge set (--judge-sets: held-out scans, the DrPose poses), key
                         `latents` (N, V, 6, H, W), and what made them (`model_sha256`, `images_sha256`, `seed`):
                         evaluate.py's judge reads them instead of generating the same views again (`judge_views`)
Each sample folder is written atomically; a re-run skips complete ones (resume after a kill), so a
folder without manifest.json is unfinished whatever it holds.

Input images in the dataset are already in the model's frame and are used as they are. A single
image file is framed like the training renders: the foreground (a --mask file's white pixels,
alpha > 0.5, or without alpha the one blob that differs from a plain background; anything else is
refused in one line asking for an RGBA cut-out) is cropped to its bounding box, its longer side
scaled to FOREGROUND_FRACTION of the output side (the renders' 2.2 m extent holds a standing
~1.75 m person at about 0.8), centred, composited on white and area-resampled to the model
resolution.
"""

from __future__ import annotations

import hashlib
import math
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation
from smplx.lbs import batch_rigid_transform, batch_rodrigues
from tqdm import tqdm

from prepare_data import (BACKGROUND, NUM_BODY_JOINTS, NUM_VIEWS, ORTHO_HALF_EXTENT, SMPLX_PARENTS, VIEW_AZIMUTHS,
                          body_forward, body_joints, from_uint8, latents_to_views, load_body_model, load_split,
                          render_views, to_uint8, vertex_normals, view_rotations, views_to_latents, views_mask,
                          views_to_pixels, world_to_views)
from plumbing import (SEED_MAX, UserError, atomic_dir, atomic_write, check_device, check_name, check_number,
                      check_output, contact_sheet, guard_output, provenance, read_json, read_manifest, read_npz_key,
                      run_cli, run_relative, with_preset, write_json)
import posescore
from posescore import draw_bones, gskel_logits, joints_from_maps, project_joints, skeleton_maps
from pretrain import MAX_GUIDANCE, SCHEDULER, load_model, sample_views, weights_sha256


@dataclass
class Args:
    """Reconstruct meshes from images: generate six views, fit SMPL-X, carve, colour."""

    preset: Literal["demo", "full"] = "demo"
    """demo: few optimiser steps, CPU seconds per subject; full: more steps (fields left unset take
    the preset's value)"""
    run_dir: Path = Path("runs/demo")
    """the run folder: reads body/, pose_reader/, the model and data/bench/; writes recon/<tag>/"""
    model: str = "base"
    """a model folder, or a name under --run-dir (base, drpose); loaded by pretrain.load_model"""
    input: Path | None = None
    """an image file (an RGBA cut-out, or a person on a plain background) or a dataset folder such as
    data/bench/ (default: <run-dir>/data/bench)"""
    mask: Path | None = None
    """a mask image for --input (same size; white = person), instead of its alpha or background"""
    views_from: Path | None = None
    """skip generation: take views from a folder of {i:05d}/views.npz (another recon/<tag>/)"""
    oracle: bool = False
    """skip generation: take the dataset's own GT six views (isolates carving from generation)"""
    skeleton: Literal["reader", "ideal"] = "reader"
    """skeleton maps to fit the body to: the pose reader's maps of the views, or `ideal`, the maps of
    the dataset's GT joints (no reader error; needs a dataset with joints)"""
    tag: str | None = None
    """output folder name under recon/ (default: the model folder's name; `oracle` with --oracle;
    `views` with --views-from)"""
    reader_dir: Path | None = None
    """the pose reader: a g_skel folder whose maps the body is fitted to (default: <run-dir>/pose_reader,
    made by `posescore.py train --train-on any --out <run-dir>/pose_reader`; a different network from the
    reward's posescore/, so that what DrPose optimised is not also what measures it)"""
    count: int | None = None
    """reconstruct only the first N samples (default: all)"""
    judge_sets: tuple[str, ...] = ("val", "drpose_gt")
    """with the run's bench as input, also generate the model's views of these datasets (JUDGE_SETS; a missing one
    is skipped), which evaluate.py's judge reads beside the bench; () skips them"""
    judge_count: int = 48
    """subjects of each judge set (the first N; evaluate.py --judge-count)"""
    fit_every: int | None = None
    """fit the body and carve a mesh for every N-th sample only; the others get their generated views
    alone, which is all the pose metrics need (the pose reader reads views). Demo 3 (the 3D fit is
    most of the time), full 1"""
    ddim_steps: int | None = None
    """DDIM steps (default: the model's model_config.json sampling.num_steps)"""
    guidance: float | None = None
    """classifier-free guidance (default: the model's model_config.json sampling.guidance)"""
    fit_steps: int | None = None
    """Adam steps of the body fit before L-BFGS_ITERS L-BFGS iterations (demo 60, full 150)"""
    carve_steps: int | None = None
    """Adam steps of the carving; 0 keeps the fitted body (demo 20, full 80)"""
    view_weights: tuple[float, ...] = (1.0, 0.4, 0.8, 1.0, 0.8, 0.4)
    """per-view loss weights for azimuths 0, 45, 90, 180, 270, 315 (PSHuman's)"""
    seed: int = 0
    """sample i's noise comes from torch.Generator().manual_seed(seed * 100003 + i)"""
    device: str = "cpu"
    """torch device for generation and g_skel (fitting and carving run on the CPU)"""
    threads: int = 1
    """torch CPU threads; the fit's tensors are small, and on a shared 2-core CPU more threads
    spin-wait (measured: 1 thread is 10-50x faster than 2 under load)"""

    def resolved(self) -> "Args":
        """The preset's values for every field left unset (an explicit flag always wins), checked."""
        table = PRESETS[self.preset]
        return with_preset(self, table).check()

    @property
    def outputs(self) -> tuple[Path, ...]:
        """The folder this stage writes into (samples it finds complete are kept)."""
        return (self.run_dir / "recon" / output_tag(self),)

    def check(self) -> "Args":
        """Every flag, before any work (one line and exit status 2 for the first bad one)."""
        check_number(self, "count", 1)
        check_number(self, "judge_count", 1, high=100_000)
        unknown = [name for name in self.judge_sets if name not in JUDGE_SETS]
        if unknown:
            raise UserError(f"--judge-sets {' '.join(unknown)}: not a judge set; pass any of {' '.join(JUDGE_SETS)}")
        check_number(self, "fit_every", 1)
        check_number(self, "ddim_steps", 1, high=SCHEDULER["num_train_timesteps"])
        check_number(self, "threads", 1, high=1024)
        for name in ("fit_steps", "carve_steps"):
            check_number(self, name, 0, high=MAX_OPTIMISER_STEPS)
        check_number(self, "guidance", 0, high=MAX_GUIDANCE)
        check_number(self, "seed", 0, high=SEED_MAX)
        if len(self.view_weights) != NUM_VIEWS or not all(math.isfinite(w) and w >= 0 for w in self.view_weights) \
                or sum(self.view_weights) <= 0:
            raise UserError(f"--view-weights {' '.join(map(str, self.view_weights))}: pass {NUM_VIEWS} numbers >= 0, "
                            f"not all zero, one per azimuth {list(VIEW_AZIMUTHS)} (default 1 0.4 0.8 1 0.8 0.4)")
        if self.oracle and self.views_from is not None:
            raise UserError("--oracle and --views-from both choose the views; pass one of them")
        for flag, folder in (("--views-from", self.views_from), ("--reader-dir", self.reader_dir)):
            if folder is not None and not folder.is_dir():
                raise UserError(f"{flag} {folder} is not a folder; pass an existing one")
        if self.input is not None and not self.input.exists():
            raise UserError(f"--input {self.input} does not exist; pass an image file (png/jpg) or a dataset folder")
        check_device(self.device)
        check_output(self.run_dir / "recon", "--run-dir")
        if self.tag is not None:
            check_name(self.tag, "--tag")
        else:  # the tag is the model folder's name
            check_name(output_tag(self), f"--model {self.model}: its folder name", fix="pass --tag NAME")
        guard_output(self.outputs[0], "--tag", "reconstruct", place_flag="--run-dir")
        return self


PRESETS = {
    "demo": dict(fit_steps=60, carve_steps=20, fit_every=3),
    "full": dict(fit_steps=150, carve_steps=80, fit_every=1),
}

MAX_OPTIMISER_STEPS = 100_000  # --fit-steps, --carve-steps
PARTIAL_MANIFEST = "manifest.partial.json"  # the recipe of a run under way; manifest.json is written last
FOREGROUND_FRACTION = 0.8  # the longer side of the person's box, as a fraction of the image side
MIN_IMAGE_SIDE = 16  # pixels: anything smaller holds no pose
MAX_IMAGE_PIXELS = 4096 * 4096  # larger images are refused before they are decoded
# An image without alpha is accepted only on a plain background: PLAIN_BORDER_SHARE of its border
# pixels within PLAIN_TOLERANCE (per RGB channel, in [0, 1]) of the border's median colour; the
# person is every pixel further than that, and must be one blob (the largest connected region
# holding SINGLE_BLOB_SHARE of them; the rest are specks, dropped) covering FOREGROUND_AREA of the frame.
PLAIN_TOLERANCE = 0.1
PLAIN_BORDER_SHARE = 0.95
SINGLE_BLOB_SHARE = 0.95
FOREGROUND_AREA = (0.01, 0.8)
SKELETON_WIDTH = 1.0  # line width (px) of the ideal maps when no g_skel config says otherwise
PROXY_VOXEL = 0.04  # metres: rest-pose cluster size of the carving proxy (a few thousand faces)
SIL_W = 0.05  # silhouette weight in the body fit (the skeleton decides the pose, the silhouette the girth)
CARVE_SIL_W = 0.01
LBFGS_ITERS = 50  # L-BFGS iterations after Adam in the body fit
TORSO = (0, 1, 2, 3, 6, 9, 12, 13, 14, 16, 17)  # joints that fix the root orientation at the start


# --- inputs: one image, or a dataset folder -----------------------------------------------------------

def _open_image(path: Path, mode: str, what: str) -> tuple[np.ndarray, bool]:
    """An image file as (H, W, C) float32 in [0, 1] and whether it has alpha, turned upright by its EXIF
    orientation (a phone photo stores the sensor's rows and says how to turn them); 16-bit and integer
    images are scaled to 8 bits, float images refused. Refused in one line when unreadable or larger
    than MAX_IMAGE_PIXELS (checked on the header, before decoding)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass {what}")
    too_big = f"more than {MAX_IMAGE_PIXELS} pixels (4096 x 4096); scale it down first"
    try:
        with Image.open(path) as handle:
            width, height = handle.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UserError(f"{path} is {width}x{height} px, {too_big}")
            handle.load()
            has_alpha = "A" in handle.getbands() or "transparency" in handle.info
            image = _to_8bit(ImageOps.exif_transpose(handle), path).convert(mode)
    except UserError:
        raise
    except Image.DecompressionBombError:  # PIL's own, larger limit, hit while reading the header
        raise UserError(f"{path} has {too_big}") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable image ({type(err).__name__}); pass {what}") from None
    return np.asarray(image).astype(np.float32) / 255, has_alpha


def _to_8bit(image, path: Path):
    """A PIL image in a mode `convert` maps faithfully: 16- and 32-bit integer grey (which `convert` would
    clip at 255, turning a 16-bit photo white) scaled to 8 bits; a float image, of unknown range, refused."""
    if image.mode == "F":
        raise UserError(f"{path} is a 32-bit float image, whose value range is unknown; save it as an 8- or 16-bit "
                        "PNG or a JPEG")
    if image.mode.startswith("I"):  # I;16, I;16B, ... (16-bit PNG) or I (32-bit integer)
        values = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        return Image.fromarray((values / top * 255).round().clip(0, 255).astype(np.uint8))  # mode L
    return image


def _plain_background_foreground(path: Path, rgb: np.ndarray) -> np.ndarray:
    """The person's pixels of an image without alpha, or a one-line refusal (see PLAIN_TOLERANCE)."""
    fix = "pass an RGBA cut-out (png with the background transparent) or --mask"
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    colour = np.median(border, axis=0)
    plain = (np.abs(border - colour).max(-1) <= PLAIN_TOLERANCE).mean()
    if plain < PLAIN_BORDER_SHARE:
        raise UserError(f"{path}: the background is not plain ({plain:.0%} of the border within {PLAIN_TOLERANCE} of "
                        f"one colour, {PLAIN_BORDER_SHARE:.0%} needed); {fix}")
    foreground = np.abs(rgb - colour).max(-1) > PLAIN_TOLERANCE
    if foreground.sum() < max(4, 0.002 * foreground.size):
        raise UserError(f"{path}: no foreground found (the image is one plain colour); pass an image of a "
                        "person on a plain background or an RGBA cut-out")
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    if sizes.max() < SINGLE_BLOB_SHARE * sizes.sum():
        raise UserError(f"{path}: the foreground is {count} separate regions (the largest holds "
                        f"{sizes.max() / sizes.sum():.0%}), not one person; {fix}")
    foreground = labels == 1 + sizes.argmax()
    area = foreground.mean()
    if not FOREGROUND_AREA[0] <= area <= FOREGROUND_AREA[1]:
        raise UserError(f"{path}: the foreground covers {area:.0%} of the frame, outside the plausible "
                        f"{FOREGROUND_AREA[0]:.0%}-{FOREGROUND_AREA[1]:.0%} for one person; {fix}")
    return foreground


def load_image(path: Path, resolution: int, mask: Path | None = None) -> torch.Tensor:
    """An image file -> (3, H, W) in [0, 1] framed like the training renders (see module docstring).
    The person is the mask file's white pixels, else the alpha channel's opaque ones, else the one
    blob that differs from a plain background (_plain_background_foreground)."""
    pixels, has_alpha = _open_image(path, "RGBA", "an image file (png/jpg) or a dataset folder")
    if min(pixels.shape[:2]) < MIN_IMAGE_SIDE:
        raise UserError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]} px, too small; pass an image at least "
                        f"{MIN_IMAGE_SIDE} px on each side")
    rgb, alpha = pixels[..., :3], pixels[..., 3]
    if mask is not None:
        alpha = _open_image(mask, "L", "a mask image (white = person) the size of the input")[0]
        if alpha.shape != rgb.shape[:2]:
            raise UserError(f"{mask} is {alpha.shape[1]}x{alpha.shape[0]} px, the image {path} "
                            f"{rgb.shape[1]}x{rgb.shape[0]}; pass a mask of the same size")
        if alpha.max() < 0.5:
            raise UserError(f"{mask} has no white pixels; paint the person white on black")
        foreground = alpha >= 0.5
    elif has_alpha and alpha.max() < 0.5:
        raise UserError(f"{path} has an empty alpha channel (nothing opaque); save it with the person opaque "
                        "or without alpha on a plain background")
    elif has_alpha and alpha.min() < 0.5:
        foreground = alpha >= 0.5
    else:  # no usable alpha: a plain background, checked
        foreground = _plain_background_foreground(Path(path), rgb)
        alpha = foreground.astype(np.float32)
    rows, cols = np.nonzero(foreground)
    if len(rows) < 0.002 * foreground.size or len(rows) < 4:
        raise UserError(f"{path}: no foreground found (the image is one plain colour); pass an image of a "
                        "person on a plain background or an RGBA cut-out")
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = rgb[top:bottom, left:right] * alpha[top:bottom, left:right, None] + \
        BACKGROUND * (1 - alpha[top:bottom, left:right, None])  # composite on white
    side = math.ceil(max(bottom - top, right - left) / FOREGROUND_FRACTION)
    canvas = np.full((side, side, 3), BACKGROUND, np.float32)
    y0, x0 = (side - (bottom - top)) // 2, (side - (right - left)) // 2
    canvas[y0:y0 + bottom - top, x0:x0 + right - left] = crop
    small = Image.fromarray((canvas * 255).round().astype(np.uint8)).resize((resolution, resolution), Image.BOX)
    return torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1).float() / 255


def load_inputs(args: Args, resolution: int | None) -> dict:
    """The samples to reconstruct: image (N, 3, H, W) in [0, 1], and when the input is a dataset,
    its arrays (color, normal, joints...) for --oracle and --skeleton ideal. `resolution` is the
    model's (None when no model is used)."""
    source = args.input or args.run_dir / "data" / "bench"
    made_by = f"python prepare_data.py --run-dir {args.run_dir}"
    if source.is_file() and source.suffix != ".npz":
        if args.oracle or args.skeleton == "ideal":
            raise UserError(f"--oracle and --skeleton ideal need a dataset folder with GT views and joints, "
                            f"not the image {source}; pass a dataset as --input or drop those flags")
        if resolution is None:
            raise UserError(f"{source}: an image input needs a model to generate views (drop --views-from)")
        return dict(image=load_image(source, resolution, args.mask)[None], source=str(source), dataset=None)
    if args.mask is not None:
        raise UserError(f"--mask goes with an image --input, not the dataset {source}")
    path = source if source.suffix == ".npz" else _dataset_file(source, made_by)
    keys = ("image",) + (("color", "normal") if args.oracle else ()) + (("joints",) if args.skeleton == "ideal" else ())
    arrays = load_split(path, expect_keys=keys, made_by=made_by)
    manifest = read_manifest(path.parent, made_by)
    if tuple(manifest.get("views", VIEW_AZIMUTHS)) != VIEW_AZIMUTHS:
        raise UserError(f"{path.parent / 'manifest.json'} has views {manifest['views']}, this code uses "
                        f"{list(VIEW_AZIMUTHS)}; re-run `{made_by}`")
    if resolution is not None and arrays["image"].shape[-1] != resolution:
        raise UserError(f"{path}: images are {arrays['image'].shape[-1]} px but the model is {resolution} px; "
                        "use the model trained on this run's data")
    return dict(image=from_uint8(arrays["image"]), source=str(path), dataset=arrays)


def _dataset_file(folder: Path, made_by: str) -> Path:
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist; pass an image file or a dataset folder (make the bench "
                        f"with `{made_by}`)")
    named = folder / "bench.npz"
    found = [named] if named.exists() else sorted(folder.glob("*.npz"))
    if len(found) != 1:
        raise UserError(f"{folder} holds {len(found)} npz files and no bench.npz; pass the npz itself as --input")
    return found[0]


# --- body fit: skeleton maps, triangulation, analytic IK, Adam ----------------------------------------

def triangulate(joints2d: torch.Tensor, resolution: int, weights=None) -> torch.Tensor:
    """(V, 22, 2) pixel joints in the six views -> (22, 3) world joints, least squares.

    Orthographic views make this linear: view v sees x_cam = cos(a) x - sin(a) z and y directly."""
    scale = resolution / (2 * ORTHO_HALF_EXTENT)
    x_cam = joints2d[..., 0] / scale - ORTHO_HALF_EXTENT  # (V, 22)
    y = ORTHO_HALF_EXTENT - joints2d[..., 1] / scale
    rot = view_rotations(dtype=joints2d.dtype)[:, 0, [0, 2]]  # (V, 2): x_cam = rot . (x, z)
    w = torch.ones(len(rot), dtype=joints2d.dtype) if weights is None else torch.as_tensor(weights, dtype=joints2d.dtype)
    lhs = (rot * w[:, None]).T @ rot  # (2, 2) normal equations, shared by every joint
    xz = torch.linalg.solve(lhs, (rot * w[:, None]).T @ x_cam)  # (2, 22)
    height = (w[:, None] * y).sum(0) / w.sum()
    return torch.stack([xz[0], height, xz[1]], -1)


def _kabsch(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(3, 3) rotation R minimising sum |R src_i - dst_i|^2 over rows of src, dst (P, 3)."""
    u, _, vt = np.linalg.svd(dst.T @ src)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def _swing(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The smallest rotation taking direction src (3,) to direction dst (3,)."""
    axis = np.cross(src, dst)
    angle = math.atan2(np.linalg.norm(axis), float(src @ dst))
    if np.linalg.norm(axis) < 1e-9:
        return np.eye(3)
    return Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix()


def rest_joints(body) -> tuple[torch.Tensor, torch.Tensor]:
    """The rest-pose joints as a linear function of the shape: J(betas) = base + dirs @ betas,
    base (55, 3), dirs (55, 3, 10) (SMPL-X regresses joints from the shaped rest vertices)."""
    base = body.J_regressor @ body.v_template
    dirs = torch.einsum("jn,nkl->jkl", body.J_regressor, body.shapedirs[:, :, :10])
    return base.detach().double(), dirs.detach().double()


def fit_bone_lengths(body, target: np.ndarray, steps: int = 150) -> tuple[np.ndarray, float]:
    """Betas (10,) and scale whose rest skeleton has the bone lengths of target (22, 3) joints.
    Bone lengths do not depend on the pose, so this settles body size before any rotation is
    sought (without it, bones of the wrong length make the IK start tens of mm off)."""
    base, dirs = rest_joints(body)
    parent, child = (torch.tensor(side) for side in zip(*[(SMPLX_PARENTS[j], j) for j in range(1, NUM_BODY_JOINTS)]))
    goal = torch.from_numpy(target[child.numpy()] - target[parent.numpy()]).norm(dim=-1)  # (21,)
    betas = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    log_scale = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([betas, log_scale], lr=0.05)
    for _ in range(steps):
        joints = base + dirs @ betas  # (55, 3)
        length = (joints[child] - joints[parent]).norm(dim=-1) * log_scale.exp()
        loss = (length - goal).pow(2).sum() + 1e-4 * betas.pow(2).sum() + 1e-2 * log_scale.pow(2).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return betas.detach().numpy(), float(log_scale.detach().exp())


def initial_params(body, target: np.ndarray) -> dict[str, np.ndarray]:
    """Analytic IK: a body whose bones have target's lengths and point along target (22, 3) joints.

    Size first (`fit_bone_lengths`). The root is the rotation that best maps the rest torso onto
    the target torso (Kabsch); then, down the tree, each joint gets the smallest rotation that aims
    its bone at its child (Kabsch over children where there are several). Twist about a bone and
    the end joints (head, wrists, feet) stay at rest: no joint position says anything about them."""
    betas, scale = fit_bone_lengths(body, target)
    base, dirs = rest_joints(body)
    rest = (base + dirs @ torch.from_numpy(betas)).numpy()[:NUM_BODY_JOINTS] * scale  # (22, 3)
    parents = SMPLX_PARENTS[:NUM_BODY_JOINTS]
    children = {j: [c for c in range(1, NUM_BODY_JOINTS) if parents[c] == j] for j in range(NUM_BODY_JOINTS)}
    torso = list(TORSO)
    glob = [np.eye(3)] * NUM_BODY_JOINTS
    glob[0] = _kabsch(rest[torso] - rest[0], target[torso] - target[0])
    local = np.zeros((NUM_BODY_JOINTS, 3))
    local[0] = Rotation.from_matrix(glob[0]).as_rotvec()
    for j in range(1, NUM_BODY_JOINTS):  # SMPL-X lists every parent before its children
        parent, kids = glob[parents[j]], children[j]
        if not kids:
            glob[j] = parent
            continue
        src = (rest[kids] - rest[j]) @ parent.T  # bones as they point before joint j turns
        dst = target[kids] - target[j]
        turn = _swing(src[0], dst[0]) if len(kids) == 1 else _kabsch(src, dst)
        glob[j] = turn @ parent
        local[j] = Rotation.from_matrix(parent.T @ glob[j]).as_rotvec()
    # world = scale * X + transl and X's root joint sits at its rest place: put it on the target's.
    return dict(global_orient=local[0].astype(np.float32), body_pose=local[1:].astype(np.float32),
                betas=betas.astype(np.float32), scale=np.array([scale], np.float32),
                transl=(target[0] - rest[0]).astype(np.float32))


class SubsetSkinner:
    """Joints (B, 55, 3) and a fixed subset of vertices (B, P, 3) by linear blend skinning, the same
    maths as smplx's lbs but on P vertices, so a silhouette term costs little inside the fit.
    Pose-corrective blend shapes are left out (the mannequin has none; a real SMPL-X's are small at
    silhouette scale)."""

    def __init__(self, body, count: int = 1500, seed: int = 0):
        rng = np.random.default_rng(seed)
        n = body.v_template.shape[0]
        self.index = torch.from_numpy(np.sort(rng.choice(n, min(count, n), replace=False)))
        self.body = body
        self.template = body.v_template[self.index].detach()  # (P, 3)
        self.shapedirs = body.shapedirs[self.index, :, :10].detach()  # (P, 3, 10)
        self.weights = body.lbs_weights[self.index].detach()  # (P, 55)
        # The rest joints are linear in the shape (prepare_data.body_joints): regressed once, not per call.
        self.rest_joints = (body.J_regressor @ body.v_template).detach()  # (55, 3)
        self.joint_dirs = torch.einsum("jn,nkl->jkl", body.J_regressor,
                                       body.shapedirs[:, :, :10]).detach()  # (55, 3, 10)

    def __call__(self, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
        body, batch = self.body, params["body_pose"].shape[0]
        betas = params["betas"].reshape(batch, -1)[:, :10]
        rest_joints = self.rest_joints + torch.einsum("bl,jkl->bjk", betas, self.joint_dirs)  # (B, 55, 3)
        zeros = params["body_pose"].new_zeros(batch, 3, 3)
        full = torch.cat([params["global_orient"].reshape(batch, 1, 3), params["body_pose"].reshape(batch, 21, 3),
                          zeros, body.left_hand_mean.reshape(1, 15, 3).expand(batch, -1, -1),
                          body.right_hand_mean.reshape(1, 15, 3).expand(batch, -1, -1)], 1)
        rotations = batch_rodrigues(full.reshape(-1, 3)).reshape(batch, -1, 3, 3)
        joints, transforms = batch_rigid_transform(rotations, rest_joints, body.parents)  # (B, 55, 3), (B, 55, 4, 4)
        verts = self.template + torch.einsum("bl,nkl->bnk", betas, self.shapedirs)  # (B, P, 3)
        per_vertex = torch.einsum("pj,bjxy->bpxy", self.weights, transforms)  # (B, P, 4, 4)
        verts = torch.einsum("bpxy,bpy->bpx", per_vertex[..., :3, :3], verts) + per_vertex[..., :3, 3]
        return joints, verts


def to_world(points: torch.Tensor, params: dict) -> torch.Tensor:
    """SMPL-X output with transl = 0 -> the fitted world frame: scale * points + transl."""
    return params["scale"].reshape(-1, 1, 1) * points + params["transl"].reshape(-1, 1, 3)


def silhouette_loss(pix: torch.Tensor, mask: torch.Tensor, outside: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Soft silhouette agreement of projected vertices pix (V, P, 2) with target masks (V, H, W).

    render_views' mask is a hard z-buffer without gradient, so the silhouette enters through the
    vertices instead, as two one-sided 2D Chamfer terms in pixels: (a) a vertex that lands outside
    the target mask pays the squared distance to it (`outside`, the distance transform of the
    background, read bilinearly); (b) a target pixel with no projected vertex within half a pixel
    pays the squared distance to the nearest one, which pulls the body into parts of the silhouette
    it misses. Vertices are dense (a few cm apart against 3.4-6.9 cm pixels), so (b) is a coverage
    test. Both are exact where they vanish: zero when the projection fills the mask and stays in it."""
    res = mask.shape[-1]
    # (V, P, 2) in grid_sample's [-1, 1] (align_corners=False). NaN coordinates are replaced: grid_sample
    # returns 0 for them, and its backward crashes the process (segfault, torch 2.11-2.13 on CPU), which a
    # line search that strays into NaN would otherwise trigger; the NaN still reaches the loss elsewhere.
    grid = torch.nan_to_num(pix / res * 2 - 1, nan=0.0, posinf=2.0, neginf=-2.0)
    dist = F.grid_sample(outside[:, None], grid[:, None], mode="bilinear", padding_mode="border",
                         align_corners=False)[:, 0, 0]  # (V, P)
    inside_term = (dist - 0.5).clamp(min=0).pow(2).mean(1)
    cover = []
    for v in range(len(mask)):
        rows, cols = torch.nonzero(mask[v] > 0.5, as_tuple=True)
        if len(rows) == 0:
            cover.append(pix.new_zeros(()))
            continue
        centres = torch.stack([cols, rows], -1).to(pix.dtype) + 0.5  # (Q, 2)
        with torch.no_grad():  # which vertex is nearest needs no gradient; its distance does
            index = torch.cdist(centres, pix[v]).argmin(1)  # (Q,)
        nearest = (centres - pix[v][index]).norm(dim=-1)  # (Q,)
        cover.append((nearest - 0.5).clamp(min=0).pow(2).mean())
    return (weights * (inside_term + torch.stack(cover))).sum() / weights.sum()


def outside_distance(mask: torch.Tensor) -> torch.Tensor:
    """(V, H, W) masks -> (V, H, W) distance in pixels from each pixel to the nearest foreground pixel."""
    out = [ndimage.distance_transform_edt(m < 0.5) if m.max() > 0.5 else np.zeros(m.shape) for m in mask.numpy()]
    return torch.from_numpy(np.stack(out)).float()


def fit_body(body, maps: torch.Tensor, mask: torch.Tensor, args: Args, width: float,
             skinner: SubsetSkinner | None = None) -> tuple[dict, torch.Tensor]:
    """Fit SMPL-X to skeleton maps (V, K, H, W) in [0, 1] and masks (V, H, W) of one sample.

    Loss: BCE with the target maps as targets and the body's maps S(theta) as predictions, so each
    target pixel pulls the nearest bone line with a force that grows with distance (-log S is the
    squared distance over 2 width^2) and the loss is least at S = target; plus the silhouette term
    (weight SIL_W = 0.05: the skeleton decides the pose, the silhouette the girth); plus weak priors on
    pose, shape and scale. Returns params {name: tensor (1, ...)} and world joints (55, 3)."""
    res = maps.shape[-1]
    weights = torch.tensor(args.view_weights, dtype=torch.float32)
    joints2d = joints_from_maps(maps[None])[0]  # (V, 22, 2)
    start = initial_params(body, triangulate(joints2d, res, weights).double().numpy())
    params = {k: torch.tensor(v)[None].requires_grad_(True) for k, v in start.items()}
    skinner = skinner or SubsetSkinner(body)
    outside = outside_distance(mask)
    target = maps.clamp(0, 1)

    def objective():
        joints, verts = skinner(dict(params, transl=torch.zeros(1, 3)))
        joints, verts = to_world(joints, params), to_world(verts, params)
        own = draw_bones(project_joints(joints, res), res, width)[0]  # (V, K, H, W): S(theta), unchecked so
        # that a line search that strays to NaN returns NaN (and is undone below) instead of raising
        # BCE(S, target) = -[t log S + (1 - t) log(1 - S)], clamped so a far bone still has a gradient.
        bce = -(target * own.clamp(min=1e-30).log() + (1 - target) * (1 - own).clamp(min=1e-6).log())
        skel = (weights * bce.mean((1, 2, 3))).sum() / weights.sum()
        pix = views_to_pixels(world_to_views(verts), res)[0]  # (V, P, 2)
        sil = silhouette_loss(pix, mask, outside, weights)
        prior = 1e-3 * params["body_pose"].pow(2).mean() + 1e-3 * params["betas"].pow(2).mean() \
            + params["scale"].log().pow(2).sum()
        return skel + SIL_W * sil + prior

    # --- Adam from the IK start: robust while the lines are still far apart ---
    rates = dict(global_orient=0.02, body_pose=0.03, betas=0.05, scale=0.005, transl=0.005)
    optimiser = torch.optim.Adam([{"params": [params[k]], "lr": lr} for k, lr in rates.items()])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(1, args.fit_steps))
    for _ in range(args.fit_steps):
        loss = objective()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    # --- L-BFGS near the optimum: the loss is smooth there and Adam's noise floor is ~1 cm ---
    if LBFGS_ITERS:
        with torch.no_grad():
            before, before_loss = {k: v.detach().clone() for k, v in params.items()}, objective()
        lbfgs = torch.optim.LBFGS(list(params.values()), lr=1, max_iter=LBFGS_ITERS, line_search_fn="strong_wolfe")

        def closure():
            lbfgs.zero_grad(set_to_none=True)
            loss = objective()
            loss.backward()
            return loss

        lbfgs.step(closure)
        with torch.no_grad():  # on maps of a garbled view L-BFGS can leave the valid range: keep Adam's result then
            after_loss = objective() if all(torch.isfinite(v).all() for v in params.values()) else None
            if after_loss is None or not torch.isfinite(after_loss) or after_loss > before_loss:
                for k, v in params.items():
                    v.copy_(before[k])
    params = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        joints = to_world(body_joints(body, dict(params, transl=torch.zeros(1, 3))), params)[0]
    return params, joints


# --- carve: a coarse proxy of the body, offsets, normal + silhouette losses ---------------------------

class Proxy:
    """A coarse stand-in for the body mesh on which carving runs (a few thousand faces instead of
    ~50K renders ~10x faster, and at 32-64 px nothing finer is visible).

    Rest-pose vertices are clustered by voxel *and* by dominant skinning joint (so two body parts
    that touch in the rest pose, e.g. the inner thighs, never share a cluster); each cluster is
    represented by its member nearest the cluster mean (a real surface point, so the proxy does not
    shrink); faces are the body's faces between three distinct clusters. Offsets found on the proxy
    go back to every vertex of its cluster, then are smoothed over the full mesh."""

    def __init__(self, body, voxel: float = PROXY_VOXEL):
        rest = body.v_template.detach().double().numpy()
        part = body.lbs_weights.detach().numpy().argmax(1)
        keys = np.concatenate([np.floor(rest / voxel).astype(np.int64), part[:, None]], 1)
        _, cluster = np.unique(keys, axis=0, return_inverse=True)
        cluster = cluster.reshape(-1)
        count = cluster.max() + 1
        means = np.zeros((count, 3))
        np.add.at(means, cluster, rest)
        means /= np.bincount(cluster, minlength=count)[:, None]
        gap = np.linalg.norm(rest - means[cluster], axis=1)
        order = np.lexsort((gap, cluster))  # per cluster, its member nearest the mean first
        first = order[np.r_[True, cluster[order][1:] != cluster[order][:-1]]]
        self.representative = torch.from_numpy(first[np.argsort(cluster[first])])  # (C,) full-mesh vertex ids
        self.cluster = torch.from_numpy(cluster)  # (N,) cluster of each full-mesh vertex
        faces = cluster[body.faces_tensor.cpu().numpy()]
        faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
        _, unique = np.unique(np.sort(faces, 1), axis=0, return_index=True)
        self.faces = torch.from_numpy(faces[np.sort(unique)])  # (Fc, 3), orientation kept
        self.laplacian = UniformLaplacian(self.faces, count)
        self.full_laplacian = UniformLaplacian(body.faces_tensor.cpu(), len(rest))


class UniformLaplacian:
    """L x = x - (mean of each vertex's mesh neighbours), for (N, 3) x, differentiable: a gather and
    an index_add over the edge list (L = I - D^-1 A without building a sparse matrix)."""

    def __init__(self, faces: torch.Tensor, count: int):
        edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        edges = torch.unique(torch.cat([edges, edges.flip(1)]), dim=0)  # (E, 2) both directions, once
        self.source, self.target = edges[:, 0], edges[:, 1]
        self.degree = torch.bincount(self.source, minlength=count).clamp(min=1).float()[:, None]  # (N, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        neighbours = torch.zeros_like(x).index_add(0, self.source, x[self.target])  # (N, 3) sums
        return x - neighbours / self.degree


def render_normals(vertices: torch.Tensor, faces: torch.Tensor, colours, res: int) -> torch.Tensor:
    """(N, 3) vertices -> (1, V, 3, H, W) encoded normals, rendered at 2x and area-downsampled as the
    data was (so edge pixels blend with the background the same way)."""
    colours = torch.ones(1, vertices.shape[0], 3) if colours is None else colours
    big = render_views(vertices[None], faces, colours, 2 * res)["normal"]
    return F.avg_pool2d(big.flatten(0, 1), 2).unflatten(0, big.shape[:2])


def carve(vertices: torch.Tensor, body_faces: torch.Tensor, proxy: Proxy, latents: torch.Tensor,
          args: Args) -> torch.Tensor:
    """Move the fitted surface (N, 3) toward the views' normal maps and silhouettes (V, 6, H, W).

    Free 3D offsets on the proxy's vertices, optimised with Adam against: L1 between rendered and
    target encoded normals (the render is made at 2x and area-downsampled, as the data was), the
    soft silhouette term of `silhouette_loss`, a Laplacian smoothness term and a small magnitude
    term; each view weighted by --view-weights. Returns the carved full mesh (N, 3)."""
    res = latents.shape[-1]
    weights = torch.tensor(args.view_weights, dtype=torch.float32)
    _, target_normal = latents_to_views(latents[None])  # (1, V, 3, H, W) in [0, 1]
    mask = views_mask(latents)
    outside = outside_distance(mask)
    base = vertices[proxy.representative]
    white_full = torch.ones(1, vertices.shape[0], 3)
    with torch.no_grad():  # what the proxy gets wrong about the fitted mesh's normals, subtracted below
        bias = render_normals(vertices, body_faces, white_full, res) - render_normals(base, proxy.faces, None, res)  # (C, 3)
    offsets = torch.zeros_like(base, requires_grad=True)
    optimiser = torch.optim.Adam([offsets], lr=0.004)
    white = torch.ones(1, base.shape[0], 3)
    for _ in range(args.carve_steps):
        moved = base + offsets
        normal = render_normals(moved, proxy.faces, white, res)
        normal_term = (weights * (normal + bias - target_normal).abs().mean((0, 2, 3, 4))).sum() / weights.sum()
        pix = views_to_pixels(world_to_views(moved[None]), res)[0]  # (V, C, 2)
        sil = silhouette_loss(pix, mask, outside, weights)
        smooth = proxy.laplacian(offsets).pow(2).sum(1).mean()
        loss = normal_term + CARVE_SIL_W * sil + 100 * smooth + 1.0 * offsets.pow(2).sum(1).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    full = offsets.detach()[proxy.cluster]  # (N, 3) piecewise constant per cluster
    for _ in range(4):  # smooth the steps between clusters away on the full mesh
        full = full - 0.5 * proxy.full_laplacian(full)
    return vertices + full


def colour_vertices(vertices: torch.Tensor, faces: torch.Tensor, latents: torch.Tensor) -> np.ndarray:
    """(N, 3) colours in [0, 1]: per vertex, the mean of the colour views that see it (in front of
    the depth buffer, inside the mask, facing the camera), weighted by how squarely it faces each
    view; vertices no view sees take their nearest seen vertex's colour."""
    res = latents.shape[-1]
    color, _ = latents_to_views(latents[None])  # (1, V, 3, H, W)
    with torch.no_grad():
        out = render_views(vertices[None], faces, torch.ones_like(vertices)[None], res)
        cam = world_to_views(vertices[None])[0]  # (V, N, 3)
        pix = views_to_pixels(cam, res).floor().long().clamp(0, res - 1)  # (V, N, 2)
        facing = torch.einsum("vij,nj->vni", view_rotations(), vertex_normals(vertices[None], faces)[0])[..., 2]
    views = torch.arange(NUM_VIEWS)[:, None]
    depth = out["depth"][0][views, pix[..., 1], pix[..., 0]]  # (V, N)
    inside = out["mask"][0][views, pix[..., 1], pix[..., 0]] > 0
    pixel_size = 2 * ORTHO_HALF_EXTENT / res
    seen = inside & (cam[..., 2] > depth - 0.5 * pixel_size) & (facing > 0.2)
    weight = seen.float() * facing.clamp(min=0)  # (V, N)
    sampled = color[0][views, :, pix[..., 1], pix[..., 0]]  # (V, N, 3)
    total = weight.sum(0)
    colours = (weight[..., None] * sampled).sum(0) / total.clamp(min=1e-8)[:, None]
    colours = colours.numpy()
    known = total.numpy() > 0
    if known.any() and not known.all():
        _, nearest = cKDTree(vertices.numpy()[known]).query(vertices.numpy()[~known])
        colours[~known] = colours[known][nearest]
    elif not known.any():
        colours[:] = 0.5
    return colours


# --- one sample ---------------------------------------------------------------------------------------

def skeleton_targets(latents: torch.Tensor, gskel_ctx, joints: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """(V, K, H, W) maps in [0, 1] to fit to, and their line width: g_skel's maps of the views, or
    (ideal) the maps of the GT joints."""
    if joints is not None:
        return skeleton_maps(joints[None], latents.shape[-1], SKELETON_WIDTH)[0], SKELETON_WIDTH
    with torch.no_grad():
        logits = gskel_logits(gskel_ctx.gskel, latents[None].to(gskel_ctx.device))[0]
    return torch.sigmoid(logits).float().cpu(), gskel_ctx.width


def reconstruct_sample(body, proxy: Proxy, skinner: SubsetSkinner, latents: torch.Tensor, args: Args,
                       gskel_ctx=None, gt_joints: torch.Tensor | None = None) -> dict:
    """Views (V, 6, H, W) in [-1, 1] -> fitted params, joints (55, 3), carved mesh + colours, seconds."""
    seconds, tick = {}, time.time()

    def lap(stage: str) -> None:  # seconds per stage, for the manifest and bench/reconstruct_stages.py
        nonlocal tick
        seconds[stage], tick = time.time() - tick, time.time()

    maps, width = skeleton_targets(latents, gskel_ctx, gt_joints)
    lap("maps")
    params, joints = fit_body(body, maps, views_mask(latents), args, width, skinner)
    lap("fit")
    with torch.no_grad():
        fitted, _ = body_forward(body, dict(params, transl=torch.zeros(1, 3)))
        fitted = to_world(fitted, params)[0]  # (N, 3)
    vertices = carve(fitted, body.faces_tensor.cpu(), proxy, latents, args) if args.carve_steps > 0 else fitted
    lap("carve")
    faces = body.faces_tensor.cpu()
    colours = colour_vertices(vertices, faces, latents)
    lap("colour")
    return dict(params=params, joints=joints, vertices=vertices, fitted=fitted, faces=faces, colors=colours,
                seconds=seconds)


VIEW_FILES = ("views.npz", "views.png")
FIT_FILES = ("body.json", "joints.npz", "mesh.ply")


def write_sample(folder: Path, latents: torch.Tensor, image: torch.Tensor, result: dict | None) -> None:
    """Everything of one sample into `folder` (a temporary folder that atomic_dir renames): the views,
    and the fitted body and mesh unless `result` is None (a views-only sample, see --fit-every)."""
    np.savez(folder / "views.npz", latents=latents.numpy().astype(np.float32))
    color, normal = latents_to_views(latents[None])
    contact_sheet(folder / "views.png", [np.concatenate([to_uint8(image[None]), to_uint8(color[0]),
                                                         to_uint8(normal[0])])])
    if result is None:
        return
    params = {k: v[0].numpy().tolist() for k, v in result["params"].items()}
    write_json(folder / "body.json", dict(
        params, left_hand_pose=[[0.0] * 3] * 15, right_hand_pose=[[0.0] * 3] * 15,
        frame="world = scale * smplx(global_orient, body_pose, betas, hands, transl=0) + transl; metres, "
              "the bench's centred frame", seconds=result["seconds"]))
    np.savez(folder / "joints.npz", joints=result["joints"].numpy().astype(np.float32))
    mesh = trimesh.Trimesh(result["vertices"].numpy(), result["faces"].numpy(),
                           vertex_colors=(np.clip(result["colors"], 0, 1) * 255).astype(np.uint8), process=False)
    mesh.export(folder / "mesh.ply")


# --- the judge sets: the model's views of datasets besides the bench -----------------------------------
# evaluate.py's judge reads every model's views of held-out scans (the in-distribution row) and of the DrPose
# poses' GT renders (the ceiling's own training poses). They are generated here, in the model's own stage, so
# that `make demo` makes them beside the other models' work; evaluate generates them itself where none are kept.

JUDGE_SETS = {"val": "data/scans/val.npz", "drpose_gt": "data/drpose_gt/train.npz"}  # name -> file in the run


@torch.no_grad()
def generate_set(model_dir: Path, images: torch.Tensor, seed: int, device, chunk: int = 16) -> torch.Tensor:
    """A model's views of images (N, 3, H, W) in [0, 1] -> (N, V, 6, H, W), with the model's own
    sampling settings and noise from its own generator (seed), so every model sees the same noise."""
    model = load_model(model_dir, device)
    generator = torch.Generator().manual_seed(seed + 12345)
    sampling = model.config["sampling"]
    out = [sample_views(model.unet, images[i:i + chunk].to(device), sampling["num_steps"], sampling["guidance"],
                        generator, alphas=model.alphas, codec=model.codec).float().cpu()
           for i in range(0, len(images), chunk)]
    return torch.cat(out)


def images_sha256(images: torch.Tensor) -> str:
    return hashlib.sha256(images.float().contiguous().numpy().tobytes()).hexdigest()


def judge_views(folder: Path, model_dir: Path, images: torch.Tensor, seed: int, device) -> torch.Tensor:
    """What generate_set(model_dir, images, seed) returns: read from a judge_<set>.npz of the reconstruction
    folder `folder` made by the same weights from the same images and seed, else generated now."""
    made_by = dict(model_sha256=weights_sha256(model_dir), images_sha256=images_sha256(images), seed=str(seed))
    for path in sorted(Path(folder).glob("judge_*.npz")):
        try:
            with np.load(path) as kept:
                if set(made_by) <= set(kept.files) and all(str(kept[k]) == v for k, v in made_by.items()):
                    return torch.from_numpy(kept["latents"])
        except (OSError, ValueError, zipfile.BadZipFile):  # unreadable: as if it were not there
            continue
    return generate_set(model_dir, images, seed, device)


def write_judge_views(args: Args, out: Path, model_dir: Path) -> dict[str, int]:
    """recon/<tag>/judge_<set>.npz for every --judge-sets dataset the run holds (see judge_views); returns
    {set: subjects}. The images are the first --judge-count subjects' front views, as evaluate.py takes them."""
    written = {}
    for name in args.judge_sets:
        data = args.run_dir / JUDGE_SETS[name]
        if not data.exists():  # e.g. a run made with prepare_data.py --no-ceiling has no drpose_gt
            continue
        arrays = load_split(data, expect_keys=("color", "normal"),
                            made_by=f"python prepare_data.py --run-dir {args.run_dir}")
        count = min(args.judge_count, len(arrays["color"]))
        gt = views_to_latents(from_uint8(arrays["color"][:count]), from_uint8(arrays["normal"][:count]))
        images = from_uint8(arrays["image"][:count]) if "image" in arrays else (gt[:, 0, :3] + 1) / 2
        path = out / f"judge_{name}.npz"
        if not path.exists():  # a re-run keeps what an earlier one made
            views = generate_set(model_dir, images, args.seed, args.device)
            with atomic_write(path) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, latents=views.numpy(), model_sha256=weights_sha256(model_dir),
                         images_sha256=images_sha256(images), seed=str(args.seed))
        written[name] = count
    return written


# --- main ---------------------------------------------------------------------------------------------

def resolve_model(args: Args) -> Path:
    named = Path(args.model)
    return named if named.is_dir() or "/" in args.model else args.run_dir / args.model


def output_tag(args: Args) -> str:
    if args.tag is not None:
        return args.tag
    return "oracle" if args.oracle else "views" if args.views_from else resolve_model(args).name


def given_views(args: Args, inputs: dict, index: int) -> torch.Tensor | None:
    """(V, 6, H, W) views of sample `index` when generation is skipped, else None."""
    if args.oracle:
        data = inputs["dataset"]
        return views_to_latents(from_uint8(data["color"][index:index + 1]), from_uint8(data["normal"][index:index + 1]))[0]
    if args.views_from is not None:
        path = args.views_from / f"{index:05d}" / "views.npz"
        if not path.exists():
            raise UserError(f"{path} is missing; --views-from needs a folder of {{i:05d}}/views.npz "
                            "(a recon/<tag>/ folder made by reconstruct.py)")
        res = inputs["image"].shape[-1]
        return torch.from_numpy(read_npz_key(path, "latents", f"python reconstruct.py --run-dir {args.run_dir}",
                                             shape=(NUM_VIEWS, 6, res, res)))
    return None


def main(args: Args) -> Path:
    args, threads = args.resolved(), torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return reconstruct_all(args)
    finally:
        torch.set_num_threads(threads)  # callers (tests) keep their own setting


def reconstruct_all(args: Args) -> Path:
    if args.input is not None and args.input.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        load_image(args.input, MIN_IMAGE_SIDE, args.mask)  # refuse a bad image before loading any model
    generate = not args.oracle and args.views_from is None
    model = None
    if generate:
        model = load_model(resolve_model(args), args.device)  # the U-Net with its codec and noise schedule
    inputs = load_inputs(args, model.config["resolution"] if model else None)
    count = len(inputs["image"]) if args.count is None else min(args.count, len(inputs["image"]))
    if args.views_from is not None:  # read every given view now: a bad file stops the stage before it writes
        for i in range(count):
            given_views(args, inputs, i)
    gskel_ctx = reader = None
    if args.skeleton == "reader":
        reader = args.reader_dir or args.run_dir / "pose_reader"
        if not (reader / "posescore_config.json").exists():
            raise UserError(f"{reader} holds no pose reader; make it with `python posescore.py train --run-dir "
                            f"{args.run_dir} --train-on any --seed 1 --out {reader}` (or pass --reader-dir)")
        gskel_ctx = posescore.load_gskel(reader, args.device)
        if gskel_ctx.resolution != inputs["image"].shape[-1]:
            raise UserError(f"{reader} works at {gskel_ctx.resolution} px, the views are {inputs['image'].shape[-1]} px; "
                            "use a pose reader trained on this run's data")
    body = load_body_model(args.run_dir / "body")
    proxy, skinner = Proxy(body), SubsetSkinner(body)

    # --- the output folder: its manifest says how it was made; a different recipe is refused ---
    # Paths are stored relative to the run folder, so another spelling of it (or a moved one) still matches.
    out = args.run_dir / "recon" / output_tag(args)
    recipe = dict(model=run_relative(resolve_model(args), args.run_dir) if generate else None, seed=args.seed,
                  resolution=int(inputs["image"].shape[-1]), source=run_relative(inputs["source"], args.run_dir),
                  views="generated" if generate else "oracle" if args.oracle else run_relative(args.views_from, args.run_dir),
                  skeleton=args.skeleton, reader=run_relative(reader, args.run_dir),
                  fit_steps=args.fit_steps, carve_steps=args.carve_steps, fit_every=args.fit_every)
    for name in ("manifest.json", PARTIAL_MANIFEST):  # a finished run's recipe, or an unfinished one's
        if (out / name).exists():
            old = read_json(out / name, f"python reconstruct.py --run-dir {args.run_dir} --tag NEW_NAME")
            if any(old.get(k) != v for k, v in recipe.items()):
                raise UserError(f"{out} holds reconstructions made differently ({out / name}); delete it "
                                "or pass --tag NAME for a new folder")
    write_json(out / PARTIAL_MANIFEST, dict(recipe, stage="reconstruct", count=count, complete=False))

    # --- every sample: views -> body -> mesh, one atomic folder each ---
    sampling = model.config.get("sampling", {}) if model else {}
    steps = args.ddim_steps or sampling.get("num_steps", 20)
    guidance = args.guidance if args.guidance is not None else sampling.get("guidance", 1.5)
    timings, stages = [], []
    for i in tqdm(range(count), desc=f"reconstruct {output_tag(args)}", disable=None):  # a bar on a terminal only
        folder = out / f"{i:05d}"
        fit = i % args.fit_every == 0
        if all((folder / name).exists() for name in VIEW_FILES + (FIT_FILES if fit else ())):
            continue  # done by an earlier run
        tick = time.time()
        image = inputs["image"][i]
        latents = given_views(args, inputs, i)
        if latents is None:
            generator = torch.Generator().manual_seed(args.seed * 100003 + i)  # same noise for every model
            latents = sample_views(model.unet, image[None].to(args.device), steps, guidance, generator,
                                   alphas=model.alphas, codec=model.codec)[0].float().cpu()
        generate_seconds = time.time() - tick
        gt_joints = torch.from_numpy(inputs["dataset"]["joints"][i]).float() if args.skeleton == "ideal" else None
        result = reconstruct_sample(body, proxy, skinner, latents, args, gskel_ctx, gt_joints) if fit else None
        write_tick = time.time()
        with atomic_dir(folder) as tmp:
            write_sample(tmp, latents, image, result)
        if fit:  # per-stage seconds of full samples only, so the numbers stay comparable
            timings.append(time.time() - tick)
            stages.append(dict(generate=generate_seconds, **result["seconds"], write=time.time() - write_tick))
    judged = write_judge_views(args, out, resolve_model(args)) if generate and args.input is None else {}
    write_json(out / "manifest.json", dict(
        recipe, stage="reconstruct", count=count, complete=True, judge_sets=judged, sampling=dict(
            num_steps=steps, guidance=guidance, generator="torch.Generator().manual_seed(seed * 100003 + i)"),
        seconds_per_sample=float(np.mean(timings)) if timings else None,
        seconds_per_stage={k: float(np.mean([s[k] for s in stages])) for k in stages[0]} if stages else None,
        device=args.device, run=provenance(args)))
    (out / PARTIAL_MANIFEST).unlink()  # the finished manifest, written last, is what says the folder is done
    print(f"wrote {count} samples to {out}" + (f" ({np.mean(timings):.1f} s each)" if timings else ""))
    return out


if __name__ == "__main__":
    run_cli(main, Args)
