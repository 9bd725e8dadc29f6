"""Stage 6 of DrPose: score the reconstructions of the hard-pose bench, base model vs DrPose.

    python evaluate.py --run-dir runs/demo                       # base and drpose, demo preset
    python evaluate.py --run-dir runs/demo --models drpose       # one model alone
    python evaluate.py --run-dir runs/full --preset full --align translation

Reads runs/<name>/data/bench/ (GT joints, six-view GT renders, GT meshes) and
runs/<name>/recon/<model>/ (what reconstruct.py wrote), and writes runs/<name>/eval/:
    results.json        per metric and model: mean, std, per-subject values; relative changes
    results.md          the same as a table (mean +- std, change vs the first model)
    metrics.png         every metric side by side, one bar per model
    reward_curve.png    the fine-tuning reward per step (from drpose/metrics.jsonl, when present)
    scatter.png         per subject: first model (x) vs each other model (y)
    splits.png          the pose reader's view joint error per split and model
    grids/NNNNN.png     per subject: input, GT / model views, GT and model meshes front and side
    report.html         all of the above, offline (relative paths only), opening with the table per split
                        and a verdict computed from it

Protocol (also written into results.json):
- Geometry. Both meshes are already in the same centred world frame (the front view is the world
  frame and every subject is centred on its bounding box), so nothing is aligned by default;
  `--align translation` runs translation-only ICP of the prediction onto the GT first. Each mesh is
  sampled uniformly by area (`num_samples` points, numpy Generator seeded per subject, so every
  model meets the same GT samples). Chamfer = the mean of the two directions' mean Euclidean (L2,
  not squared) nearest-sample distances, in cm. P2S = mean exact distance from the predicted
  samples to the GT surface (the closest point on each triangle near enough to hold it), in cm.
  Normal consistency = mean |cos| between a sample's face normal and its nearest sample's, both
  directions averaged (absolute value, as in
  Occupancy Networks: a carved mesh's orientation is not guaranteed). F-score = harmonic mean of
  precision (predicted samples within tau of the GT samples) and recall (the reverse); tau = 5 cm by
  default: under one demo pixel (2.2 m / 32 px = 6.9 cm) and 1.5 full pixels (3.4 cm), so a score
  near 1 means sub-pixel agreement at either preset, and one tau keeps both tables comparable.
- Pose. MPJPE (mm) of the 22 SMPL-X body joints after moving both pelvises (joint 0) to the origin
  (Human3.6M protocol 1); PA-MPJPE (mm) after the best similarity transform (rotation, scale,
  translation; protocol 2); the fitted joints come from reconstruct.py's body fit to the pose
  reader's maps. View joint error (px): the pose reader's 2D joints of each generated view against
  the GT joints projected into it, no 3D fit in between. Silhouette IoU of the generated views' masks
  against the GT masks (no network at all). PoseScore: the reward's own g_skel (posescore/), i.e.
  what DrPose optimised, reported but not a judge of it. The pose reader (pose_reader/) is a
  separate g_skel trained on broad poses in any orientation with another seed. For both network
  metrics the GT renders' value is given as a reference (what a perfect generator would score).
- Appearance. PSNR (dB; one MSE over all six views and channels, images in [0, 1]) and SSIM (mean
  over the six views; skimage, 7x7 window, data range 1) of the generated colour and normal views
  against the GT renders.
- Spread. std is the population standard deviation (ddof = 0) over bench subjects.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import trimesh
from matplotlib.figure import Figure
from scipy.spatial import cKDTree
from skimage.metrics import structural_similarity
from tqdm import tqdm

from prepare_data import (NUM_BODY_JOINTS, ORTHO_HALF_EXTENT, VIEW_AZIMUTHS, from_uint8, latents_to_views,
                          load_split, view_rotations, views_mask, views_to_latents)
from plumbing import (SEED_MAX, UserError, atomic_write, check_device, check_name, check_number, guard_output,
                      provenance, read_json, read_manifest, read_npz_key, run_cli, with_preset, write_json)
import posescore
from pretrain import CONFIG_NAME, psnr
from reconstruct import JUDGE_SETS, judge_views


@dataclass
class Args:
    """Score base and DrPose reconstructions of the hard-pose bench and write a report."""

    preset: Literal["demo", "full"] = "demo"
    """demo: 5K surface samples per mesh; full: 20K (fields below left unset take the preset's value)"""
    run_dir: Path = Path("runs/demo")
    """the run folder: reads data/bench/, recon/<model>/, drpose/metrics.jsonl, posescore/; writes eval/"""
    models: tuple[str, ...] = ("base", "drpose")
    """model tags under recon/; the first is the reference the others' relative change is against"""
    num_samples: int | None = None
    """surface samples per mesh for the geometry metrics (demo 5000, full 20000)"""
    fscore_cm: float = 5.0
    """F-score threshold tau in cm (under one demo pixel of 6.9 cm; see the module docstring)"""
    align: Literal["none", "translation"] = "none"
    """none: meshes share the centred world frame as written; translation: ICP shift first"""
    network_metrics: bool = True
    """also score the generated views with the networks: PoseScore (run_dir/posescore/) and the view
    joint error (run_dir/pose_reader/), each when its folder exists"""
    judge_sets: tuple[str, ...] = ("val", "drpose_gt")
    """datasets besides the bench whose views every model makes, for the judge's rows: `val` (held-out scans:
    the in-distribution row) and `drpose_gt` (the DrPose poses' GT renders: the ceiling's own training poses).
    Views reconstruct.py kept under recon/<model>/ are read, others generated here with the model folder its
    manifest names. Needs pose_reader/; () skips"""
    judge_count: int = 48
    """subjects of each judge set (the first N)"""
    max_grids: int | None = None
    """image grids for the first N bench subjects (demo 12, full 16)"""
    seed: int = 0
    """seed of the surface sampling (its own numpy Generator per subject; global RNG untouched)"""
    device: str = "cpu"
    """torch device for those networks"""

    def resolved(self) -> "Args":
        """The preset's values for every field left unset (an explicit flag always wins), checked."""
        table = PRESETS[self.preset]
        return with_preset(self, table).check()

    @property
    def outputs(self) -> tuple[Path, ...]:
        """The folder this stage writes."""
        return (self.run_dir / "eval",)

    def check(self) -> "Args":
        """Every flag, before any work (one line and exit status 2 for the first bad one)."""
        if not self.models:
            raise UserError("--models is empty; name at least one folder under recon/, e.g. --models base drpose")
        if len(set(self.models)) != len(self.models):
            raise UserError(f"--models {' '.join(self.models)} names a model twice; name each once")
        for tag in self.models:
            check_name(tag, "--models")
        check_number(self, "num_samples", 1, high=1_000_000)
        check_number(self, "judge_count", 1, high=100_000)
        unknown = [name for name in self.judge_sets if name not in JUDGE_SETS]
        if unknown:
            raise UserError(f"--judge-sets {' '.join(unknown)}: not a judge set; pass any of {' '.join(JUDGE_SETS)}")
        check_number(self, "fscore_cm", 0, above=True, high=100)
        check_number(self, "max_grids", 0, high=10_000)
        check_number(self, "seed", 0, high=SEED_MAX)
        check_device(self.device)
        guard_output(self.outputs[0], "--run-dir", "evaluate")
        return self


PRESETS = {
    "demo": dict(num_samples=5000, max_grids=12),
    "full": dict(num_samples=20000, max_grids=16),
}

# name -> (table label, unit, which way is better). The order is the table's and the plots'.
METRICS = {
    "chamfer_cm": ("Chamfer", "cm", "lower"),
    "p2s_cm": ("P2S", "cm", "lower"),
    "normal_consistency": ("normal consistency", "", "higher"),
    "fscore": ("F-score", "", "higher"),
    "mpjpe_mm": ("MPJPE", "mm", "lower"),
    "pa_mpjpe_mm": ("PA-MPJPE", "mm", "lower"),
    "view_joint_error_px": ("view joint error", "px", "lower"),
    "judged_error_px": ("judged error (side views)", "px", "lower"),
    "judged_error_px_reader2": ("judged error, second reader (side views)", "px", "lower"),
    "solidity": ("solidity", "", "higher"),
    "sureness": ("sureness", "", "higher"),
    "mask_iou": ("silhouette IoU", "", "higher"),
    "posescore": ("PoseScore", "", "higher"),
    "psnr_color_db": ("PSNR colour", "dB", "higher"),
    "ssim_color": ("SSIM colour", "", "higher"),
    "psnr_normal_db": ("PSNR normal", "dB", "higher"),
    "ssim_normal": ("SSIM normal", "", "higher"),
}


def bench_command(run_dir: Path) -> str:
    return f"python prepare_data.py --run-dir {run_dir}"


def recon_command(run_dir: Path, tag: str) -> str:
    return f"python reconstruct.py --run-dir {run_dir} --model {tag}"


# --- geometry metrics ------------------------------------------------------------------------------

def sample_surface(mesh, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Area-uniform surface samples (P, 3) and their face normals (P, 3)."""
    points, faces = trimesh.sample.sample_surface(mesh, count, seed=rng)
    return np.asarray(points), np.asarray(mesh.face_normals)[faces]


def _nearest(queries: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance (Q,) and index (Q,) of each query's nearest point."""
    dist, index = cKDTree(points).query(queries)
    return dist, index


def chamfer_cm(pred: np.ndarray, gt: np.ndarray) -> float:
    """Symmetric Chamfer in cm: mean of the two directions' mean Euclidean nearest-point distance."""
    return float(100 * 0.5 * (_nearest(pred, gt)[0].mean() + _nearest(gt, pred)[0].mean()))


def closest_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The closest point (N, 3) to each point p (N, 3) on the triangle (a, b, c) (N, 3 each): its vertex,
    edge or face region, as in Ericson's Real-Time Collision Detection, 5.1.5, over arrays."""
    ab, ac = b - a, c - a
    d1, d2 = (ab * (p - a)).sum(1), (ac * (p - a)).sum(1)
    d3, d4 = (ab * (p - b)).sum(1), (ac * (p - b)).sum(1)
    d5, d6 = (ab * (p - c)).sum(1), (ac * (p - c)).sum(1)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2  # barycentric areas
    with np.errstate(divide="ignore", invalid="ignore"):  # the regions below replace what divides by zero
        out = a + (vb / (va + vb + vc))[:, None] * ab + (vc / (va + vb + vc))[:, None] * ac  # inside the face
        regions = [  # (where, the closest point there), later ones win, as Ericson's early returns do
            ((va <= 0) & (d4 >= d3) & (d5 >= d6), b + ((d4 - d3) / ((d4 - d3) + (d5 - d6)))[:, None] * (c - b)),
            ((vb <= 0) & (d2 >= 0) & (d6 <= 0), a + (d2 / (d2 - d6))[:, None] * ac),
            ((d6 >= 0) & (d5 <= d6), c), ((vc <= 0) & (d1 >= 0) & (d3 <= 0), a + (d1 / (d1 - d3))[:, None] * ab),
            ((d3 >= 0) & (d4 <= d3), b), ((d1 <= 0) & (d2 <= 0), a)]
    for where, point in regions:
        out[where] = point[where]
    return out


def point_to_surface_cm(points: np.ndarray, mesh) -> float:
    """Mean exact distance (cm) from points (P, 3) to the surface of `mesh`. Only triangles that can hold the
    closest point are measured: with u the distance to the triangle whose centre is nearest and r a
    triangle's radius about its centre, one whose centre lies further than u + r cannot."""
    triangles = np.asarray(mesh.triangles, dtype=np.float64)  # (F, 3, 3)
    centres = triangles.mean(1)
    radius = np.linalg.norm(triangles - centres[:, None], axis=2).max(1)  # (F,)
    tree = cKDTree(centres)
    _, nearest = tree.query(points)
    bound = np.linalg.norm(closest_on_triangles(points, *triangles[nearest].transpose(1, 0, 2)) - points, axis=1)
    candidates = tree.query_ball_point(points, bound + radius.max())
    point = np.repeat(np.arange(len(points)), [len(c) for c in candidates])
    face = np.concatenate(candidates).astype(np.int64)
    near = np.linalg.norm(points[point] - centres[face], axis=1) <= bound[point] + radius[face]
    point, face = point[near], face[near]
    dist = np.linalg.norm(closest_on_triangles(points[point], *triangles[face].transpose(1, 0, 2)) - points[point],
                          axis=1)
    best = bound.copy()
    np.minimum.at(best, point, dist)
    return 100 * float(np.mean(best))


def normal_consistency(pred: np.ndarray, pred_normals: np.ndarray, gt: np.ndarray,
                       gt_normals: np.ndarray) -> float:
    """Mean |cos| between each sample's normal and its nearest sample's, both directions averaged."""
    _, to_gt = _nearest(pred, gt)
    _, to_pred = _nearest(gt, pred)
    forward = np.abs(np.sum(pred_normals * gt_normals[to_gt], axis=-1)).mean()
    backward = np.abs(np.sum(gt_normals * pred_normals[to_pred], axis=-1)).mean()
    return float(0.5 * (forward + backward))


def fscore(pred: np.ndarray, gt: np.ndarray, threshold_m: float) -> float:
    """F-score at `threshold_m`: precision = pred samples near gt, recall = gt samples near pred."""
    precision = (_nearest(pred, gt)[0] < threshold_m).mean()
    recall = (_nearest(gt, pred)[0] < threshold_m).mean()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def icp_translation(source: np.ndarray, target: np.ndarray, iterations: int = 30) -> np.ndarray:
    """The shift (3,) that translation-only ICP moves `source` by to meet `target`."""
    shift = target.mean(0) - source.mean(0)  # start from the centroids, then refine on nearest points
    for _ in range(iterations):
        _, index = _nearest(source + shift, target)
        step = (target[index] - (source + shift)).mean(0)
        shift = shift + step
        if np.linalg.norm(step) < 1e-7:
            break
    return shift


def geometry_metrics(pred_mesh, gt_mesh, num_samples: int, threshold_m: float,
                     rng: np.random.Generator, align: str = "none") -> dict:
    """Chamfer, P2S, normal consistency and F-score of one predicted mesh against its GT."""
    gt, gt_normals = sample_surface(gt_mesh, num_samples, rng)  # GT first: same samples for every model
    pred, pred_normals = sample_surface(pred_mesh, num_samples, rng)
    shift = icp_translation(pred, gt) if align == "translation" else np.zeros(3)
    pred = pred + shift
    return dict(chamfer_cm=chamfer_cm(pred, gt), p2s_cm=point_to_surface_cm(pred, gt_mesh),
                normal_consistency=normal_consistency(pred, pred_normals, gt, gt_normals),
                fscore=fscore(pred, gt, threshold_m), shift_cm=100 * shift)


# --- pose metrics ----------------------------------------------------------------------------------

def mpjpe_mm(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean per-joint error (mm) of (J, 3) joints after putting both pelvises (joint 0) at the origin."""
    return 1000 * float(np.linalg.norm((pred - pred[0]) - (gt - gt[0]), axis=-1).mean())


def procrustes_align(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """`pred` (J, 3) moved by the similarity transform (s, R, t) that best fits it to `gt` (Umeyama)."""
    mu_pred, mu_gt = pred.mean(0), gt.mean(0)
    p, g = pred - mu_pred, gt - mu_gt
    u, sigma, vt = np.linalg.svd(p.T @ g)  # row vectors: minimise |s p R - g|, so R = U D V^T
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])  # a rotation, never a reflection
    rot = u @ d @ vt
    scale = np.trace(np.diag(sigma) @ d) / np.sum(p ** 2)
    return scale * p @ rot + mu_gt


def pa_mpjpe_mm(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean per-joint error (mm) after the best similarity transform of pred onto gt."""
    return 1000 * float(np.linalg.norm(procrustes_align(pred, gt) - gt, axis=-1).mean())


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean over views of the intersection over union of (V, H, W) {0, 1} masks: how well the
    generated silhouettes match the true ones, with no learned reader involved (an empty pair
    counts as a perfect match)."""
    pred, gt = pred > 0.5, gt > 0.5
    inter, union = (pred & gt).sum((1, 2)), (pred | gt).sum((1, 2))
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


# --- appearance metrics ----------------------------------------------------------------------------

def ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean SSIM over views of (V, 3, H, W) images in [0, 1]."""
    return float(np.mean([structural_similarity(p, g, channel_axis=0, data_range=1.0)
                          for p, g in zip(pred.astype(np.float64), gt.astype(np.float64))]))


# --- inputs: the bench ground truth and each model's reconstructions -------------------------------

def load_bench(run_dir: Path) -> dict:
    """GT arrays of data/bench/bench.npz plus its resolution and mesh paths (checked to exist)."""
    folder = run_dir / "data" / "bench"
    made_by = bench_command(run_dir)
    manifest = read_manifest(folder, made_by)
    bench = load_split(folder / "bench.npz", expect_keys=("joints", "image", "color", "normal", "mask"),
                       made_by=made_by)
    bench["resolution"] = manifest.get("resolution", bench["color"].shape[-1])
    bench["mesh_paths"] = [folder / "meshes" / f"{i:05d}.ply" for i in range(len(bench["joints"]))]
    for path in bench["mesh_paths"]:
        if not path.exists():
            raise UserError(f"{path} is missing; make it with `{made_by}`")
    # Read once, now: a bad mesh stops the stage before any scoring, and every model and grid reuses it.
    bench["meshes"] = [load_mesh(path, made_by) for path in bench["mesh_paths"]]
    return bench


def load_recon(run_dir: Path, tag: str, bench: dict) -> dict:
    """One model's reconstructions: latents (N, V, 6, H, W), joints (N, 55, 3), mesh paths and the model folder
    that generated them (None for given views); a views-only sample (reconstruct.py --fit-every) has NaN joints
    and no mesh."""
    folder = run_dir / "recon" / tag
    made_by = recon_command(run_dir, tag)
    manifest = read_manifest(folder, made_by)
    count = int(manifest.get("count", -1))
    if not 0 < count <= len(bench["joints"]):
        raise UserError(f"{folder / 'manifest.json'}: count {count} does not fit the "
                        f"{len(bench['joints'])} bench subjects; re-run `{made_by}`")
    if manifest.get("resolution", bench["resolution"]) != bench["resolution"]:
        raise UserError(f"{folder / 'manifest.json'}: resolution {manifest['resolution']} differs from the "
                        f"bench's {bench['resolution']}; re-run `{made_by}`")
    fit_every = int(manifest.get("fit_every") or 1)  # reconstruct.py --fit-every: 3D for every N-th sample
    latents, joints, meshes = [], [], []
    for i in range(count):
        sample = folder / f"{i:05d}"
        fitted = i % fit_every == 0
        for name in ("views.npz",) + (("joints.npz", "mesh.ply") if fitted else ()):
            if not (sample / name).exists():
                raise UserError(f"{sample / name} is missing; make it with `{made_by}`")
        latents.append(read_npz_key(sample / "views.npz", "latents", made_by,
                                    shape=(len(VIEW_AZIMUTHS), 6) + bench["color"].shape[-2:]))
        if fitted:
            joints.append(read_npz_key(sample / "joints.npz", "joints", made_by, shape=(55, 3)))
        else:
            joints.append(np.full(bench["joints"].shape[1:], np.nan, np.float32))
        meshes.append(sample / "mesh.ply" if fitted else None)
    latents = np.stack(latents)
    if latents.shape[1:] != (len(VIEW_AZIMUTHS), 6) + bench["color"].shape[-2:]:
        raise UserError(f"{folder}: views.npz latents have shape {latents.shape[1:]}, expected "
                        f"(V, 6, H, W) = {(len(VIEW_AZIMUTHS), 6) + bench['color'].shape[-2:]}; re-run `{made_by}`")
    # The model folder that generated these views (stored relative to the run folder): the judge's other rows
    # are generated with the same one, wherever it lies (a committed model under pretrained/, say).
    model = run_dir / manifest["model"] if isinstance(manifest.get("model"), str) else None
    return dict(latents=latents, joints=np.stack(joints), mesh_paths=meshes, model=model,
                meshes=[load_mesh(path, made_by) if path else None for path in meshes])  # read once, checked now


def model_label(folder: Path | None, run_dir: Path) -> str | None:
    """How a fine-tuned model was made, from its model_config.json: `live` (trained inside this run folder) or
    `committed` (weights from elsewhere, e.g. pretrained/), the samples it trained on (steps x batch x processes)
    and, where its config says, the CPU or GPU it trained on. None without a model folder."""
    if folder is None or not (folder / CONFIG_NAME).is_file():
        return None
    config = read_json(folder / CONFIG_NAME, f"python finetune.py --out {folder}")
    args = config.get("drpose" if config.get("stage") == "finetune" else "train_args")
    args = args if isinstance(args, dict) else {}
    trained_on = config.get("trained_on") if isinstance(config.get("trained_on"), dict) else {}
    numbers = [config.get("step"), args.get("batch_size"), trained_on.get("processes", 1)]
    samples = math.prod(numbers) if all(isinstance(n, int) for n in numbers) else None
    device = {"cpu": "CPU", "cuda": "GPU"}.get(trained_on.get("device", args.get("device")))
    where = "live" if folder.resolve().is_relative_to(run_dir.resolve()) else "committed"
    return ", ".join([where] + ([f"{samples:,} samples"] if samples is not None else []) + ([device] if device else []))


def load_mesh(path: Path, made_by: str):
    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as err:  # a truncated or foreign file means the same to a user
        raise UserError(f"{path} is not a readable mesh ({type(err).__name__}); re-run `{made_by}`") from None
    if len(mesh.faces) == 0 or mesh.area <= 0 or not np.isfinite(mesh.vertices).all():
        raise UserError(f"{path} has no surface; re-run `{made_by}`")
    return mesh


# --- per-subject scores ----------------------------------------------------------------------------

def score_model(args: Args, bench: dict, recon: dict, count: int, tag: str) -> dict:
    """metric name -> (N,) per-subject values for one model (all but the network metrics)."""
    color, normal = latents_to_views(torch.from_numpy(recon["latents"][:count]))  # (N, V, 3, H, W) each
    gt_color, gt_normal = from_uint8(bench["color"][:count]), from_uint8(bench["normal"][:count])
    pred_masks = views_mask(torch.from_numpy(recon["latents"][:count])).numpy()  # (N, V, H, W)
    rows = []
    for i in tqdm(range(count), desc=f"evaluate {tag}", leave=False, disable=None):  # a bar on a terminal only
        # One Generator per subject: base and drpose meet identical GT samples, global RNG untouched.
        rng = np.random.default_rng([args.seed, i])
        row = dict.fromkeys(("chamfer_cm", "p2s_cm", "normal_consistency", "fscore", "mpjpe_mm", "pa_mpjpe_mm"), np.nan)
        if recon["meshes"][i] is not None:  # 3D metrics where the body was fitted (--fit-every)
            geometry = geometry_metrics(recon["meshes"][i], bench["meshes"][i],
                                        args.num_samples, args.fscore_cm / 100, rng, args.align)
            pred_joints = recon["joints"][i, :NUM_BODY_JOINTS].astype(np.float64)
            gt_joints = bench["joints"][i, :NUM_BODY_JOINTS].astype(np.float64)
            row.update(chamfer_cm=geometry["chamfer_cm"], p2s_cm=geometry["p2s_cm"],
                       normal_consistency=geometry["normal_consistency"], fscore=geometry["fscore"],
                       mpjpe_mm=mpjpe_mm(pred_joints, gt_joints), pa_mpjpe_mm=pa_mpjpe_mm(pred_joints, gt_joints))
        rows.append(dict(
            row, mask_iou=mask_iou(pred_masks[i], bench["mask"][i]),
            psnr_color_db=psnr(color[i][None], gt_color[i][None]).item(),
            ssim_color=ssim(color[i].numpy(), gt_color[i].numpy()),
            psnr_normal_db=psnr(normal[i][None], gt_normal[i][None]).item(),
            ssim_normal=ssim(normal[i].numpy(), gt_normal[i].numpy()),
        ))
    return {name: np.array([row[name] for row in rows]) for name in rows[0]}


def posescore_metric(views, batch, ctx):
    """PoseScore with the reward's own network: what DrPose optimised (the paper's reward function
    itself, not whatever the registry holds under its name)."""
    return posescore.posescore_reward(views, batch, ctx)[0], {}


def view_joint_error_metric(views, batch, gskel_ctx):
    """The pose reader's 2D joint error in pixels, mean over the six views (posescore.view_joint_error)."""
    return posescore.view_joint_error(gskel_ctx, views, batch["joints"]).mean(1), {}


# What a g_skel network reads off the generated views: metric -> (folder under the run, how it is loaded,
# the metric in a reward's signature). The view joint error uses the pose reader, a network trained apart
# (broad poses in any orientation, another seed), so it measures pose without being the target.
NETWORK_METRICS = {
    "posescore": ("posescore", lambda folder, device: posescore.load_reward_context(folder, device), posescore_metric),
    "view_joint_error_px": ("pose_reader", lambda folder, device: posescore.load_gskel(folder, device),
                            view_joint_error_metric),
}


def network_scores(args: Args, latents: dict[str, np.ndarray], bench: dict, count: int) -> dict[str, dict]:
    """metric -> {model tag or 'gt' (the GT renders): (N,) values} for each NETWORK_METRICS entry
    whose folder exists (a missing one is skipped with a note, not failed)."""
    if not args.network_metrics:
        return {}
    gt_latents = views_to_latents(from_uint8(bench["color"][:count]), from_uint8(bench["normal"][:count]))
    batch = posescore.reward_batch(bench, slice(0, count), args.device)  # the pair rows: joints, image, ...
    out = {}
    for metric, (name, load, fn) in NETWORK_METRICS.items():
        folder = args.run_dir / name
        if not folder.exists():
            print(f"{METRICS[metric][0]} skipped: {folder} not found (see README, stages)")
            continue
        ctx = load(folder, args.device)
        out[metric] = {}
        for tag, views in list(latents.items()) + [("gt", gt_latents.numpy())]:
            values, _ = posescore.reward_in_chunks(fn, torch.as_tensor(views).float().to(args.device), batch, ctx)
            out[metric][tag] = values.float().numpy()  # chunks of 16: a full bench fits
    return out


# --- summaries: results.json and results.md --------------------------------------------------------

def summary(values: np.ndarray) -> dict:
    """mean, std and count over the subjects that have the metric (3D metrics: the fitted ones);
    per_subject keeps every subject, null where it has none."""
    finite = values[np.isfinite(values)]
    some = len(finite) > 0
    return dict(mean=float(np.mean(finite)) if some else None, std=float(np.std(finite)) if some else None,
                count=int(len(finite)), per_subject=[float(v) if np.isfinite(v) else None for v in values])


# The judge of DrPose's effect: the pose reader's view joint error, and the share of the base ->
# supervised ceiling gap a model closes on it, per bench split (README, "How the result is judged").
GAP_METRIC = "judged_error_px"  # the judge: the pose reader's side-view error with the penalties (posescore.judged_error)
# The judge's readers: folder under the run -> the suffix of its quantities. The second reader, trained apart
# from the first (seed, width, images, pose-free kinds), reads every table; a verdict holds where both agree.
READERS = {"pose_reader": "", "pose_reader2": "_reader2"}


JUDGE_SET_LABELS = {"val": "val (held-out scans: in-distribution)", "drpose_gt": "DrPose poses (the ceiling's training set)"}


def judge(readers: dict, views: torch.Tensor, gt_views: torch.Tensor, joints: torch.Tensor) -> dict[str, np.ndarray]:
    """The judge on side views 1..5 (the front view is the input's), per subject (N,), for each reader
    ({suffix: GskelContext}, see READERS): the reader's view joint error (px), the solidity (share of the
    GT's ink), the sureness (its confidence against the GT render's) and the judged error, keyed
    side_error_px, solidity, sureness, judged_px plus the reader's suffix."""
    out = {}
    for suffix, reader in readers.items():
        verdict = posescore.judge_verdict(reader, views, gt_views, joints)
        out |= {f"{key}{suffix}": verdict[name][:, 1:].mean(1).numpy() for key, name in (
            ("side_error_px", "error"), ("solidity", "solidity"), ("sureness", "sureness"), ("judged_px", "judged"))}
    return out


def load_readers(run_dir: Path, device) -> dict:
    """{suffix: GskelContext} of the judge's readers present under the run folder (see READERS)."""
    return {suffix: posescore.load_gskel(run_dir / folder, device) for folder, suffix in READERS.items()
            if (run_dir / folder).exists()}


def judge_set(run_dir: Path, data_path: Path, models: dict[str, Path], readers: dict, count: int, seed: int,
              device, split: str | None = None) -> dict:
    """{model tag or 'gt': {quantity: mean}} of the judge (`judge`, every reader) on the first `count` subjects
    of a dataset (of its bench `split` only, when given). Each model's views: those reconstruct.py kept of these
    images under recon/<tag>/, or generated now (reconstruct.judge_views)."""
    arrays = load_split(data_path, expect_keys=("color", "normal", "joints"), made_by=bench_command(run_dir))
    if split is not None:
        arrays = {k: v[np.array([str(x) for x in arrays["split"]]) == split] for k, v in arrays.items()}
    count = min(count, len(arrays["joints"]))
    gt = views_to_latents(from_uint8(arrays["color"][:count]), from_uint8(arrays["normal"][:count]))
    joints = torch.from_numpy(arrays["joints"][:count]).float()
    images = from_uint8(arrays["image"][:count]) if "image" in arrays else (gt[:, 0, :3] + 1) / 2
    out = {"gt": judge(readers, gt, gt, joints)}
    for tag, folder in models.items():
        out[tag] = judge(readers, judge_views(run_dir / "recon" / tag, folder, images, seed, device), gt, joints)
    return dict(count=count, models={tag: {k: float(v.mean()) for k, v in values.items()}
                                     for tag, values in out.items()})


def gap_closed(base: float, model: float, ceiling: float) -> float | None:
    """(base - model) / (base - ceiling): 0 is the base, 1 the ceiling; None when the ceiling is no
    better than the base (no gap to close)."""
    return (base - model) / (base - ceiling) if base - ceiling > 1e-9 else None


def split_summary(per_subject: dict, bench: dict, count: int) -> dict:
    """Per bench split (`dynamic`, `extreme`; a bench without splits is one split `all`): each model's
    mean of every metric and, when models `base` and `ceiling` are both evaluated, the gap each other
    model closes on GAP_METRIC."""
    splits = np.array([str(s) for s in bench["split"][:count]]) if "split" in bench else np.full(count, "all")
    out = {}
    for name in dict.fromkeys(splits):
        rows = splits == name
        means = {tag: {m: summary(np.asarray(v)[rows])["mean"] for m, v in values.items()}
                 for tag, values in per_subject.items()}
        entry = dict(count=int(rows.sum()), models=means)
        for suffix in READERS.values():  # gap_closed for the first reader, gap_closed_reader2 for the second
            metric = GAP_METRIC + suffix
            if {"base", "ceiling"} <= set(means) and means["base"].get(metric) is not None:
                base, ceiling = means["base"][metric], means["ceiling"][metric]
                entry["gap_closed" + suffix] = {tag: gap_closed(base, m[metric], ceiling) for tag, m in means.items()
                                                if tag not in ("base", "ceiling")}
        out[name] = entry
    return out


def summarise(args: Args, per_subject: dict, gt_values: dict, bench: dict, count: int) -> dict:
    """The results.json object: protocol, per model per metric mean/std/per-subject, changes."""
    models = {tag: {name: summary(values[name]) for name in METRICS if name in values}
              for tag, values in per_subject.items()}
    reference = args.models[0]
    change = {}
    for tag in args.models[1:]:
        change[tag] = {}
        for name in models[tag]:
            base = models[reference][name]["mean"]
            if base is None or models[tag][name]["mean"] is None:
                continue
            delta = models[tag][name]["mean"] - base
            better = METRICS[name][2]
            tied = abs(delta) <= 1e-9 * max(1.0, abs(base))  # float noise is no change
            change[tag][name] = dict(
                absolute=delta, relative=delta / abs(base) if base != 0 else None,
                verdict="same" if tied else "better" if (delta < 0) == (better == "lower") else "worse")
    return dict(
        stage="evaluate", run=provenance(args), run_dir=str(args.run_dir), models=models, reference=reference,
        change=change,
        splits=split_summary(per_subject, bench, count),
        subjects=count, bench_subjects=len(bench["joints"]),
        categories=[str(c) for c in bench.get("category", np.array([""] * count))[:count]],
        gt_reference={metric: dict(mean=float(np.mean(v)), std=float(np.std(v))) for metric, v in gt_values.items()},
        protocol=dict(
            alignment="none (shared centred world frame)" if args.align == "none"
            else "translation-only ICP of prediction onto GT",
            surface_samples=args.num_samples, sampling_seed=args.seed,
            chamfer="mean of both directions' mean Euclidean (L2, not squared) nearest-sample distance, cm "
                    "(identical surfaces score a small floor from sampling that shrinks as samples grow)",
            p2s="mean exact distance from predicted samples to the GT surface (closest point on every triangle "
                "that can hold it), cm",
            normal_consistency="mean |cos| to the nearest sample's face normal, both directions",
            fscore_threshold_cm=args.fscore_cm,
            mpjpe="22 SMPL-X body joints, pelvis-aligned, mm", pa_mpjpe="after similarity Procrustes, mm",
            view_joint_error_px="the pose reader's (pose_reader/) 2D body joints read off each generated view "
                                "(posescore.joints_from_maps), mean distance to the GT joints projected into "
                                "that view, px, over 6 views x 22 joints; a network trained apart from the reward",
            posescore="the reward's PoseScore (posescore/) of the generated views against the GT joints; "
                      "what DrPose optimised, so not an independent judge",
            mask_iou="mean over 6 views of IoU between the generated views' masks (prepare_data.views_mask) "
                     "and the GT render masks",
            psnr="one MSE over 6 views x 3 channels, images in [0, 1], dB",
            ssim="mean over 6 views, skimage 7x7 window, data range 1",
            std="population (ddof=0) over bench subjects"),
        metrics={name: dict(label=label, unit=unit, better=better) for name, (label, unit, better) in METRICS.items()},
    )


def metric_label(name: str, results: dict) -> str:
    label, unit, better = METRICS[name]
    if name == "fscore":
        label = f"F-score@{results['protocol']['fscore_threshold_cm']:g}cm"
    return f"{label}{f' ({unit})' if unit else ''} {'↓' if better == 'lower' else '↑'}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table: metric, mean +- std per model, change per other model."""
    tags = list(results["models"])
    others = list(results["change"])
    header = ["metric"] + tags + [f"{tag} vs {results['reference']}" for tag in others]
    rows = []
    for name in METRICS:
        if name not in results["models"][tags[0]]:
            continue
        counted = results["models"][tags[0]][name].get("count", results["subjects"])
        row = [metric_label(name, results) + (f" [{counted} subjects]" if counted != results["subjects"] else "")]
        row += [_mean_std(results["models"][t][name]) for t in tags]
        for tag in others:
            c = results["change"][tag].get(name)
            if c is None:
                row.append("n/a")
                continue
            rel = "n/a" if c["relative"] is None else f"{100 * c['relative']:+.1f}%"
            row.append(f"{rel} ({c['verdict']})")
        rows.append(row)
    return header, rows


def _mean_std(entry: dict) -> str:
    return "n/a" if entry["mean"] is None else f"{entry['mean']:.4g} ± {entry['std']:.2g}"


def split_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The judge's table: per judge set and bench split, every model's judged error (each reader's, "first /
    second") and, with a base and a ceiling, the share of the gap each other model closes."""
    tags = list(results["models"])
    others = [t for t in tags if t not in ("base", "ceiling")]
    rows = judge_rows(results)
    has_gap = "base" in tags and "ceiling" in tags and bool(others)
    header = ["split", "subjects"] + [f"{labelled(results, t)}: {metric_label(GAP_METRIC, results)}" for t in tags]
    header += [f"{t}: gap closed" for t in others] if has_gap else []
    return header, [[label, str(count)] + [_per_reader(values, t, "{:.3f}") for t in tags]
                    + ([_per_reader(gaps, t, "{:.0%}") for t in others] if has_gap else [])
                    for label, count, values, gaps in rows]


def _per_reader(by_reader: dict, tag: str, form: str, none: str = "n/a") -> str:
    """One table cell: each reader's value of `tag`, "first / second"; `none` where a reader has none."""
    return " / ".join(none if v.get(tag) is None else form.format(v[tag]) for v in by_reader.values())


def write_markdown(path: Path, results: dict) -> str:
    header, rows = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if any(GAP_METRIC in entry["models"].get(results["reference"], {}) for entry in results["splits"].values()):
        header, rows = split_rows(results)
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = (f"{results['subjects']} bench subjects; mean ± std (population) over subjects; "
            f"alignment: {results['protocol']['alignment']}; Chamfer = mean of both directions' mean "
            f"L2 distance. Made by `python evaluate.py --run-dir {results['run_dir']} "
            f"--models {' '.join(results['models'])}`.")
    for metric, value in results["gt_reference"].items():
        note += f" {METRICS[metric][0]} of the GT renders: {value['mean']:.4g}."
    note += (" Judge table: the judged error (px) on the side views, first / second reader: each pose reader's joint "
             "error (networks trained apart from the reward and from each other) plus the penalties for a faint "
             "drawing and for a view the reader sees no body in (posescore.judged_error), "
             "on held-out scans, the DrPose poses and each bench split; gap closed = (base - model) / "
             "(base - ceiling), the share of the way from the base to the supervised ceiling (the base "
             "fine-tuned on six-view renders of the DrPose poses).")
    text = weights_line(results) + "\n\n" + "\n".join(lines) + "\n\n" + note + "\n"
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return "\n".join(lines)


# --- plots -----------------------------------------------------------------------------------------

def _save(fig, path: Path) -> None:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


def plot_metrics(path: Path, results: dict) -> None:
    """One small panel per metric, one bar (mean, std as error bar) per model."""
    tags = list(results["models"])
    names = [n for n in METRICS if n in results["models"][tags[0]]]
    cols = 4
    fig = Figure(figsize=(3 * cols, 2.4 * math.ceil(len(names) / cols)))
    axes = fig.subplots(math.ceil(len(names) / cols), cols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        means = [results["models"][t][name]["mean"] or 0.0 for t in tags]
        stds = [results["models"][t][name]["std"] or 0.0 for t in tags]
        ax.bar(tags, means, yerr=stds, color=[f"C{k}" for k in range(len(tags))], capsize=3)
        ax.set_title(metric_label(name, results), fontsize=9)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def plot_scatter(path: Path, results: dict) -> None:
    """Per subject, the reference model (x) against every other model (y); below/above y = x wins."""
    ref = results["reference"]
    names = [n for n in METRICS if n in results["models"][ref]]
    cols = 4
    fig = Figure(figsize=(3 * cols, 2.8 * math.ceil(len(names) / cols)))
    axes = fig.subplots(math.ceil(len(names) / cols), cols, squeeze=False)
    def per_subject(tag: str, name: str) -> np.ndarray:  # null (no 3D fit) -> NaN, which plots skip
        return np.array([np.nan if v is None else v for v in results["models"][tag][name]["per_subject"]], float)

    for ax, name in zip(axes.flat, names):
        x = per_subject(ref, name)
        for k, tag in enumerate(results["change"]):
            ax.scatter(x, per_subject(tag, name), s=12, color=f"C{k + 1}", label=tag)
        values = np.concatenate([x] + [per_subject(t, name) for t in results["change"]])
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        ax.set_title(metric_label(name, results), fontsize=9)
        ax.set_xlabel(ref, fontsize=8)
        ax.set_ylabel(" / ".join(results["change"]), fontsize=8)
        ax.ticklabel_format(useOffset=False)  # tiny spreads otherwise get unreadable offset labels
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def read_metrics(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl; a line cut short by a killed run is skipped, the rest still count."""
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return [x for x in lines if isinstance(x, dict) and "step" in x]


def plot_reward_curve(metrics_path: Path, png: Path) -> bool:
    """The training reward per logged step (with a running mean once there are enough points) and the
    fixed-input evaluation reward against the base's. False, and nothing written, without a usable log."""
    lines = [x for x in read_metrics(metrics_path) if "reward" in x] if metrics_path.exists() else []
    if not lines:
        return False
    steps, rewards = np.array([x["step"] for x in lines], float), np.array([x["reward"] for x in lines], float)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(steps, rewards, lw=0.8, alpha=0.5, label="training batch reward")
    if len(rewards) >= 10:  # a running mean makes the trend readable through per-batch noise
        width = max(len(rewards) // 20, 5)
        ax.plot(steps[width - 1:], np.convolve(rewards, np.ones(width) / width, mode="valid"), lw=1.5,
                label=f"mean of {width}")
    evals = [x for x in lines if "eval_reward" in x]
    if evals:
        ax.plot([x["step"] for x in evals], [x["eval_reward"] for x in evals], "o-", label="bench inputs, fixed noise")
        if evals[0].get("eval_reward_base") is not None:
            ax.axhline(evals[0]["eval_reward_base"], color="gray", ls="--", label="base model, same inputs")
    ax.set_xlabel("step")
    ax.set_ylabel("reward (higher is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return True


# --- per-subject image grids -----------------------------------------------------------------------

def render_mesh(mesh, view: int, size: int = 128, samples: int = 60000, seed: int = 0) -> np.ndarray:
    """A cheap grey headlight render (size, size, 3) in [0, 1] of `mesh` in one of the six views:
    dense surface samples splatted into a z-buffer (nearest sample per pixel wins). No renderer
    dependency, and fast enough for a 50K-face mesh."""
    rng = np.random.default_rng(seed)
    points, normals = sample_surface(mesh, samples, rng)
    rot = view_rotations(dtype=torch.float64)[view].numpy()  # (3, 3) world -> camera
    cam, cam_normals = points @ rot.T, normals @ rot.T
    scale = size / (2 * ORTHO_HALF_EXTENT)
    u = np.clip(((cam[:, 0] + ORTHO_HALF_EXTENT) * scale).astype(int), 0, size - 1)
    v = np.clip(((ORTHO_HALF_EXTENT - cam[:, 1]) * scale).astype(int), 0, size - 1)
    pixel = v * size + u
    order = np.lexsort((-cam[:, 2], pixel))  # per pixel, the sample nearest the camera (largest z) first
    first = order[np.r_[True, pixel[order][1:] != pixel[order][:-1]]]
    image = np.ones(size * size)
    image[pixel[first]] = 0.25 + 0.7 * np.abs(cam_normals[first, 2])  # |n_z|: mesh orientation may vary
    return np.repeat(image.reshape(size, size, 1), 3, axis=2)


def plot_grid(path: Path, index: int, bench: dict, recons: dict, title: str) -> None:
    """Row 0: input image, then GT and every model's mesh (front, side). Then colour and normal
    views: GT, then each model."""
    views = len(VIEW_AZIMUTHS)
    meshes = [("GT", bench["meshes"][index])]
    meshes += [(tag, r["meshes"][index]) for tag, r in recons.items()
               if r["meshes"][index] is not None]  # views-only samples (--fit-every) have none
    image_rows = [("GT colour", bench["color"][index] / 255), ("GT normal", bench["normal"][index] / 255)]
    for tag, recon in recons.items():
        color, normal = latents_to_views(torch.from_numpy(recon["latents"][index:index + 1]))
        image_rows += [(f"{tag} colour", color[0].numpy()), (f"{tag} normal", normal[0].numpy())]
    cols = 1 + max(views, 2 * len(meshes))
    fig = Figure(figsize=(1.3 * cols, 1.4 * (1 + len(image_rows))))
    axes = fig.subplots(1 + len(image_rows), cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(bench["image"][index].transpose(1, 2, 0))
    axes[0, 0].set_title("input", fontsize=7)
    side = VIEW_AZIMUTHS.index(90)
    for k, (name, mesh) in enumerate(meshes):
        for j, (view, label) in enumerate(((0, "front"), (side, "side"))):
            ax = axes[0, 1 + 2 * k + j]
            ax.imshow(render_mesh(mesh, view))
            ax.set_title(f"{name} mesh {label}", fontsize=7)
    for r, (label, images) in enumerate(image_rows, start=1):
        axes[r, 0].text(0.95, 0.5, label, ha="right", va="center", fontsize=8, transform=axes[r, 0].transAxes)
        for v in range(views):
            axes[r, 1 + v].imshow(np.clip(images[v].transpose(1, 2, 0), 0, 1))
            if r == 1:
                axes[r, 1 + v].set_title(f"az {VIEW_AZIMUTHS[v]}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


# --- the report ------------------------------------------------------------------------------------

IN_DISTRIBUTION = "val"  # the judge set of held-out scans: a fine-tune that gains on the bench and loses here is damage

# What each figure shows and what to look for, under it in report.html (file name -> caption).
CAPTIONS = {
    "reward_curve.png": "DrPose's reward per training step, and on fixed bench inputs with fixed noise against the "
                        "base's (dashed). Look for the fixed-input curve rising above the dashed line: DrPose raises "
                        "its reward. A rising reward alone says nothing about the pose; the table above reads that.",
    "splits.png": "The judge's error per row of the table above, one bar per model (lower is better); the dashed "
                  "line is the GT renders' error on the bench, the best a generator can get. Look for DrPose's bar "
                  "below the base's on the bench splits, and not above it on the held-out scans.",
    "metrics.png": "Every metric, one bar per model (mean, std over subjects as the error bar). Look for PoseScore, "
                   "the reward, moving together with the judged error and MPJPE: a reward gain without a pose "
                   "gain is the reward being gamed.",
    "scatter.png": "Per subject, the first model (x) against each other model (y); the grey line is y = x. Look for "
                   "points on the better side of the line (below it where lower is better): a consistent gain puts "
                   "most subjects there, noise scatters them on both sides.",
    "grids": "Each subject: the input image, then GT and every model's mesh from the front and the side; below, the "
             "six colour and normal views of the GT and of each model. Look at the side views (az 90, 270): do they "
             "follow the input's pose, or fall back to an upright standing figure? Blurred, faint or speckled "
             "views raise PoseScore without a better pose.",
}


def reader_suffixes(results: dict) -> list[str]:
    """The suffixes (READERS) of the readers that judged these results; older results had one reader."""
    return list((results.get("readers") or {"pose_reader": ""}).values())


def judge_rows(results: dict) -> list[tuple[str, int, dict, dict]]:
    """The judge per row, in-distribution first: the judge sets (held-out scans, DrPose poses), then the bench
    splits. Each row: (label, subjects, {reader suffix: {model: judged error or None}}, {reader suffix:
    {fine-tune: gap closed or None}})."""
    tags = list(results["models"])
    others = [t for t in tags if t not in ("base", "ceiling")]
    suffixes = reader_suffixes(results)
    rows = []
    sets = results.get("judge_sets", {})
    for name in sorted(sets, key=lambda n: n != IN_DISTRIBUTION):
        values, gaps = {}, {}
        for suffix in suffixes:
            values[suffix] = {t: sets[name]["models"].get(t, {}).get("judged_px" + suffix) for t in tags}
            base, ceiling = values[suffix].get("base"), values[suffix].get("ceiling")
            gaps[suffix] = {t: gap_closed(base, values[suffix][t], ceiling)
                            if None not in (base, ceiling, values[suffix][t]) else None for t in others}
        rows.append((JUDGE_SET_LABELS.get(name, name), sets[name]["count"], values, gaps))
    for name, entry in results["splits"].items():
        values = {suffix: {t: entry["models"][t].get(GAP_METRIC + suffix) for t in tags} for suffix in suffixes}
        gaps = {suffix: {t: entry.get("gap_closed" + suffix, {}).get(t) for t in others} for suffix in suffixes}
        rows.append((f"bench {name}", entry["count"], values, gaps))
    return rows


def headline_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The report's first table: per row of judge_rows, each model's judged error and each fine-tune's gap
    closed, each reader's ("first / second" where two readers judged)."""
    tags = list(results["models"])
    others = [t for t in tags if t not in ("base", "ceiling")]
    has_gap = "base" in tags and "ceiling" in tags and bool(others)
    header = ["", "subjects", *[labelled(results, t) for t in tags]] + (
        [f"{t}: gap closed" for t in others] if has_gap else [])
    rows = []
    for label, count, values, gaps in judge_rows(results):
        row = [label, str(count)] + [_per_reader(values, t, "{:.3f}") for t in tags]
        if has_gap:
            row += [_per_reader(gaps, t, "{:.0%}", "no gap: ceiling not better than base") for t in others]
        rows.append(row)
    return header, rows


def agreement(model: list[float], base: list[float]) -> str:
    """"better", "worse" or "same" where every reader says so (lower judged error is better), else
    "readers disagree": a verdict holds only where both readers agree."""
    says = {"better" if m < b else "worse" if m > b else "same" for m, b in zip(model, base)}
    return says.pop() if len(says) == 1 else "readers disagree"


def labelled(results: dict, tag: str) -> str:
    """A model's tag with how it was made (model_label), e.g. `drpose (live, 80 samples, CPU)`."""
    label = results.get("labels", {}).get(tag)
    return f"{tag} ({label})" if label else tag


def weights_line(results: dict) -> str:
    """The report's first line: whether the verdict reads committed GPU-trained weights or only live runs."""
    labels = results.get("labels", {})
    committed = [labelled(results, t) for t, label in labels.items() if label.startswith("committed")]
    live = [labelled(results, t) for t, label in labels.items() if label.startswith("live")]
    if committed:
        return (f"Committed weights, evaluated here beside the base: {_names(committed)}; the verdict reads them"
                + (f". Live runs of this machine, which show the loop running: {_names(live)}." if live else "."))
    return ("No committed GPU-trained weights are evaluated here (make demo evaluates pretrained/demo_drpose and "
            "pretrained/demo_ceiling where they exist), so this verdict cannot show the method"
            + (f": every fine-tuned model is a live run of this machine, {_names(live)}, which shows the loop "
               "running." if live else "."))


def _names(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def verdict_sentence(results: dict) -> str:
    """One sentence from the numbers: per row of judge_rows, does each fine-tuned model read a better pose than
    the base by every reader (the judged error; "readers disagree" where they do not agree), how its reward
    moved, and where the ceiling leaves a gap."""
    rows = [(label, values) for label, _, values, _ in judge_rows(results)
            if all(v.get("base") is not None for v in values.values())]
    if not rows:
        return ("No verdict: it needs a base model and the judge (evaluate `--models base ...` on a run with "
                "pose_reader/).")
    clauses = []
    fine_tunes = [t for t in results["models"] if t not in ("base", "ceiling")]
    for tag in sorted(fine_tunes, key=lambda t: not results.get("labels", {}).get(t, "").startswith("committed")):
        read = {label: ([v[tag] for v in values.values()], [v["base"] for v in values.values()])
                for label, values in rows if all(v[tag] is not None for v in values.values())}
        said = {label: agreement(m, b) for label, (m, b) in read.items()}
        better, worse, split = ([n for n, s in said.items() if s == word] for word in ("better", "worse", "readers disagree"))
        on = lambda names: "every row" if len(names) == len(read) else _names(names)  # noqa: E731
        how = " and ".join(filter(None, [better and f"a better pose than the base on {on(better)}", worse and (
            f"a worse one on {on(worse)}" if better else f"a worse pose than the base on {on(worse)}")])) or \
            "the same pose as the base"
        if split:
            how += f"; the readers disagree on {on(split)}"
        numbers = ", ".join(f"{n} {' / '.join(f'{x:.3f}' for x in m)} against {' / '.join(f'{x:.3f}' for x in b)}"
                            for n, (m, b) in read.items())
        reward = results["change"].get(tag, {}).get("posescore", {}).get("relative")
        reward = "" if reward is None else \
            f", while its reward, PoseScore, {'rises' if reward > 0 else 'falls'} {abs(100 * reward):.1f}%"
        if read:
            clauses.append(f"{labelled(results, tag)} reads {how} (judged error, px"
                           f"{', first / second reader' if len(rows[0][1]) > 1 else ''}: {numbers}){reward}")
    if "ceiling" in results["models"]:
        above = [label for label, values in rows if all(v["ceiling"] is not None for v in values.values())
                 and agreement([v["ceiling"] for v in values.values()], [v["base"] for v in values.values()]) == "better"]
        ceiling = labelled(results, "ceiling").replace("ceiling", "the supervised ceiling", 1)
        clauses.append(f"{ceiling} beats the base on {_names(above)}" if above else
                       f"{ceiling} beats the base nowhere, so there is no gap to close")
    return "Verdict: " + "; ".join(clauses) + "." if clauses else "No verdict: only the base was evaluated."


def plot_splits(path: Path, results: dict) -> bool:
    """Bars of the judged error per row of judge_rows and per model, the GT renders' on the bench as a line.
    False, and nothing written, where no model has it."""
    tags = list(results["models"])
    rows = [(label, count, values[""], gaps) for label, count, values, gaps in judge_rows(results)]  # the first reader
    if not any(v is not None for _, _, values, _ in rows for v in values.values()):
        return False
    fig = Figure(figsize=(2 + 1.6 * len(rows), 3.2))
    ax = fig.subplots()
    width = 0.8 / len(tags)
    for k, tag in enumerate(tags):
        ax.bar(np.arange(len(rows)) + k * width, [np.nan if values[tag] is None else values[tag]
                                                  for _, _, values, _ in rows], width, label=tag, color=f"C{k}")
    if GAP_METRIC in results["gt_reference"]:
        ax.axhline(results["gt_reference"][GAP_METRIC]["mean"], color="gray", ls="--", label="GT renders (bench)")
    ax.set_xticks(np.arange(len(rows)) + width * (len(tags) - 1) / 2,
                  [label.replace(" (", "\n(") for label, *_ in rows], fontsize=7)
    ax.set_ylabel(metric_label(GAP_METRIC, results))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return True


def write_report(path: Path, results: dict, figures: dict[str, str], grids: list[tuple[str, str]]) -> None:
    """report.html, every reference relative to eval/: the headline table per split and a verdict computed from
    it, then the reward curve, the per-split plot (splits.png, drawn here), the subject grids, every metric and
    the protocol. Every image has a caption saying what to look for."""
    esc = html.escape

    def html_table(header, rows) -> str:
        return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")

    def figure(name: str, title: str, caption: str) -> str:
        return (f"<figure><img src='{esc(name)}' alt='{esc(title)}'><figcaption>{esc(caption)}</figcaption>"
                "</figure>")

    gt = results["gt_reference"].get(GAP_METRIC)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>DrPose evaluation</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}"
        "figcaption{color:#444;font-size:90%;margin-bottom:1.5em}</style></head><body>",
        f"<h1>DrPose evaluation: {esc(results['run_dir'])}</h1>",
        f"<p><b>{esc(weights_line(results))}</b></p>",
        f"<h2>Result</h2><p>The pose the generated views show, judged on the side views by the pose reader (a "
        f"network trained apart from the reward): {esc(metric_label(GAP_METRIC, results))}, lower is better"
        + (f"; the GT renders of the bench read {gt['mean']:.3f}" if gt else "") + ". Gap closed = (base - model) / "
        "(base - ceiling), the share of the way from the base to the supervised ceiling.</p>",
        html_table(*headline_rows(results)),
        f"<p><b>{esc(verdict_sentence(results))}</b></p>",
    ]
    if IN_DISTRIBUTION not in results.get("judge_sets", {}):
        parts.append("<p>No in-distribution row: these results hold no judge of held-out scans (`--judge-sets`).</p>")
    shown = [(title, name) for title, name in figures.items() if name == "reward_curve.png"]
    if not shown:
        parts.append("<p>No fine-tuning reward curve: drpose/metrics.jsonl not found or without reward.</p>")
    if plot_splits(path.parent / "splits.png", results):
        shown.append(("Per split", "splits.png"))
    rest = [(title, name) for title, name in figures.items() if name != "reward_curve.png"]
    for title, name in shown:
        parts.append(f"<h2>{esc(title)}</h2>" + figure(name, title, CAPTIONS.get(name, "")))
    if grids:
        parts.append(f"<h2>Subjects</h2><p>{esc(CAPTIONS['grids'])}</p>")
        parts += [figure(name, title, f"{title}: GT rows first, then each model's.") for title, name in grids]
    parts.append(f"<h2>Every metric</h2><p>{results['subjects']} of {results['bench_subjects']} bench subjects; "
                 f"changes are relative to {esc(results['reference'])}. Raw numbers: "
                 "<a href='results.json'>results.json</a>, <a href='results.md'>results.md</a>.</p>")
    parts.append(html_table(*table_rows(results)))
    for title, name in rest:
        parts.append(f"<h3>{esc(title)}</h3>" + figure(name, title, CAPTIONS.get(name, title)))
    protocol = "".join(f"<li><b>{esc(k)}</b>: {esc(str(v))}</li>" for k, v in results["protocol"].items())
    parts += [f"<h2>Protocol</h2><ul>{protocol}</ul>", "</body></html>\n"]
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(parts))


# --- main ------------------------------------------------------------------------------------------

def main(args: Args) -> dict:
    args = args.resolved()
    bench = load_bench(args.run_dir)
    recons = {tag: load_recon(args.run_dir, tag, bench) for tag in args.models}
    for folder, load, _ in NETWORK_METRICS.values():  # refuse a damaged network before any scoring
        if args.network_metrics and (args.run_dir / folder).exists():
            load(args.run_dir / folder, args.device)
    count = min(len(r["joints"]) for r in recons.values())  # compare on the subjects every model has
    if count < len(bench["joints"]):
        print(f"note: evaluating the first {count} of {len(bench['joints'])} bench subjects")

    # --- scores per subject ---
    per_subject = {tag: score_model(args, bench, recon, count, tag) for tag, recon in recons.items()}
    scores = network_scores(args, {t: r["latents"][:count] for t, r in recons.items()}, bench, count)
    for metric, values in scores.items():
        for tag in recons:
            per_subject[tag][metric] = values[tag]
    readers = load_readers(args.run_dir, args.device) if args.network_metrics else {}
    judge_rows = {}
    if "" in readers:  # the first reader; the second (pose_reader2/) reads beside it where it exists
        if "_reader2" not in readers:
            print(f"second reader skipped: {args.run_dir / 'pose_reader2'} not found; verdicts rest on one reader")
        gt = views_to_latents(from_uint8(bench["color"][:count]), from_uint8(bench["normal"][:count]))
        joints = torch.from_numpy(bench["joints"][:count]).float()
        for tag, recon in recons.items():
            verdict = judge(readers, torch.from_numpy(recon["latents"][:count]).float(), gt, joints)
            per_subject[tag] |= dict(solidity=verdict["solidity"], sureness=verdict["sureness"])
            per_subject[tag] |= {GAP_METRIC + suffix: verdict["judged_px" + suffix] for suffix in readers}
        truth = judge(readers, gt, gt, joints)
        scores |= {GAP_METRIC + suffix: dict(gt=truth["judged_px" + suffix]) for suffix in readers}
        # --- the judge's other rows: held-out scans (in-distribution) and the DrPose poses' GT ---
        models = {tag: recon["model"] for tag, recon in recons.items() if recon["model"] and recon["model"].is_dir()}
        for name in args.judge_sets:
            if not (args.run_dir / JUDGE_SETS[name]).exists():  # e.g. a run made with --no-ceiling has no drpose_gt
                print(f"judge set {name} skipped: {args.run_dir / JUDGE_SETS[name]} not found")
                continue
            judge_rows[name] = judge_set(args.run_dir, args.run_dir / JUDGE_SETS[name], models, readers,
                                         args.judge_count, args.seed, args.device)

    # --- results.json, results.md ---
    out = args.run_dir / "eval"
    results = summarise(args, per_subject, {metric: values["gt"] for metric, values in scores.items()}, bench, count)
    results["judge_sets"] = judge_rows
    results["readers"] = {folder: suffix for folder, suffix in READERS.items() if suffix in readers}
    results["labels"] = {tag: label for tag in args.models if tag != "base"
                         and (label := model_label(recons[tag]["model"], args.run_dir)) is not None}
    write_json(out / "results.json", results)
    table = write_markdown(out / "results.md", results)

    # --- plots, grids, report ---
    figures = {"Metrics": "metrics.png"}
    plot_metrics(out / "metrics.png", results)
    if plot_reward_curve(args.run_dir / "drpose" / "metrics.jsonl", out / "reward_curve.png"):
        figures["Fine-tuning reward"] = "reward_curve.png"
    if len(recons) > 1:
        plot_scatter(out / "scatter.png", results)
        figures["Per subject"] = "scatter.png"
    grids = []
    for i in range(min(args.max_grids, count)):
        title = f"subject {i:05d} {results['categories'][i]}".strip()
        plot_grid(out / "grids" / f"{i:05d}.png", i, bench, recons, title)
        grids.append((title, f"grids/{i:05d}.png"))
    write_report(out / "report.html", results, figures, grids)
    print(weights_line(results))
    print(table)
    print(f"report: {out / 'report.html'}")
    return results


if __name__ == "__main__":
    run_cli(main, Args)
