"""Stage 2 of DrPose: skeleton maps, the g_skel network, PoseScore and the reward registry.

    python posescore.py train --preset demo --run-dir runs/demo        # g_skel on data/scans/, < 2 min CPU
    python posescore.py train --preset demo --train-on broad           # + broad poses rendered on the fly
    python posescore.py train --preset demo --train-on any --seed 1 --out runs/demo/pose_reader
                                                                       # the pose reader (not a reward)
    python posescore.py score --views-dir runs/demo/recon/base         # score generated views vs GT poses
    python posescore.py score --views-dir runs/demo/data/bench/bench.npz   # score GT renders
    python posescore.py check-reward --reward my_rewards.py:fn         # a reward's tests on the run's GT renders

PoseScore (the paper's reward) is r(x0, theta) = -BCE(g_skel(x0), S(theta)):
    S(theta)   `skeleton_maps`: the body joints projected into the six views, one soft line per bone
    g_skel     a small diffusers UNet2DModel, one view latent (6, H, W) + its view index -> K logits
    BCE        per pixel, averaged over views, bones and pixels; higher reward is better

Writes `posescore/` under the run folder (or --out): the U-Net (`save_pretrained`), `posescore_config.json`
(line width, resolution, training args, time), `validation.json` (map PSNR / SSIM, 2D joint
error, true-vs-perturbed pose accuracy on val scans and on bench hard poses), `metrics.jsonl`
(one line per log step: step, loss, lr, seconds) and `maps.png` (views | target | predicted maps).

Every reward in REWARDS has one signature, so finetune.py's `--reward NAME` swaps it (or
`--reward module:function` / `path/to/file.py:function` takes one from the user's own code):
    fn(views (B, V, 6, H, W) in [-1, 1], batch, ctx: RewardContext)
        -> (rewards (B,), parts {name: (B,)})      higher is better, differentiable in views
where batch is the whole (pose, image) pair row (`reward_batch`, keys in `BATCH_KEYS`): joints (B, 55, 3),
image (B, 3, H, W) in [0, 1], mask (B, H, W) 0/1, the SMPL-X parameters, and anything else pairs.npz holds.
A reward's first call is checked (`check_reward`) before any work; `check-reward` runs its tests. The
evaluation's view joint error (`view_joint_error`) is no registry entry, so editing a reward cannot change it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal, Union

import diffusers
import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
import tyro
from diffusers import UNet2DModel
from scipy.spatial.transform import Rotation
from scipy.stats import spearmanr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm import tqdm

from prepare_data import (BONE_GROUPS, views_mask, BONES, NUM_BODY_JOINTS, NUM_VIEWS, POSE_KEYS, VIEW_AZIMUTHS, body_forward,
                          from_uint8, load_body_model, load_split, views_to_latents, views_to_pixels, world_to_views,
                          generate_poses, render_subjects, sample_outfits, MASK_THRESHOLD, encoded_normal_min)
from plumbing import (SEED_MAX, UserError, atomic_dir, run_cli, write_json, with_preset, check_device, check_number,
                      check_finite_weights, guard_output, guard_output_file, provenance, read_json, read_npz,
                      read_npz_key)


@dataclass
class TrainArgs:
    """Train g_skel on scan renders and write posescore/ (weights, config, validation numbers)."""

    preset: Literal["demo", "full"] = "demo"
    """demo: a tiny U-Net, under 2 min on a shared 2-core CPU at 32 px; full: a wider one for one GPU at 64 px
    (fields below left unset take the preset's value)"""
    run_dir: Path = Path("runs/demo")
    """the run folder: reads data/scans/, data/bench/, body/; writes posescore/"""
    out: Path | None = None
    """where g_skel goes (default: <run-dir>/posescore); e.g. <run-dir>/pose_reader for the held-out
    pose reader that reconstruction and evaluation use"""
    train_on: Literal["scans", "broad", "any"] = "scans"
    """scans: the scan renders only, as in the paper; broad: scans plus broad poses rendered here
    (prepare_data.generate_poses + render_subjects), the fix if g_skel does not transfer to hard poses;
    any: scans plus broad poses turned to uniformly random orientations (upside down included): the
    held-out pose reader that reconstruction and evaluation use, never a reward"""
    init: Path | None = None
    """start from the g_skel of this folder (its architecture and line width), e.g. a committed
    pretrained/demo_reader; with --steps 0 it is only validated and written to --out"""
    num_broad: int | None = None
    """extra broad-pose subjects rendered for --train-on broad (demo 240, full 3000)"""
    steps: int | None = None
    """optimiser steps (demo 400, full 6000)"""
    batch_size: int | None = None
    """single views per step (demo 32, full 64)"""
    lr: float = 3e-3
    """peak AdamW learning rate (linear warm-up over 5% of steps, then cosine to zero)"""
    channels: tuple[int, ...] | None = None
    """U-Net block widths; the number of entries is the number of resolution levels (demo 16 32 64)"""
    width: float | None = None
    """skeleton-map line width: Gaussian sigma in pixels (demo 1.0 at 32 px, full 1.5 at 64 px)"""
    pos_weight: float = 1.0
    """BCE weight of bone pixels; 1 keeps the predicted maps calibrated (what PSNR/SSIM measure)"""
    blur: float = 1.0
    """augmentation: views are blended towards a Gaussian blur of this sigma (px) by a random amount,
    so g_skel holds up on generated, softer views"""
    noise: float = 0.05
    """augmentation: the largest std of added Gaussian noise (latents are in [-1, 1])"""
    mess: float = 0.0
    """augmentation: strength of `solid_mess` (speckle, blotches, blur up to a blob, colour shifts, pixels
    missing or added at the limbs; 1 puts each on up to half the views), so the pose reader reads a
    correct pose drawn messily as correct; 0 = off (the reward's g_skel, as in the paper)"""
    adv_eps: float = 0.0
    """adversarial training: each training image is first moved within an L2 ball of this radius (a view
    latent (6, H, W) in [-1, 1]) to raise g_skel's loss by --adv-steps of projected gradient ascent, targets
    unchanged (PGD, Madry et al.). A robust g_skel has perceptually aligned gradients, so an ascent on its
    reward draws limbs rather than noise. 0 = off (as in the paper)"""
    adv_steps: int = 3
    """PGD steps per training batch when --adv-eps > 0"""
    pose_free: float = 0.0
    """share of each batch replaced by pose-free images of the same views (a body's ink, no limbs; see
    `pose_free_images`) whose target is empty maps, so that a reader answers a blob with "no skeleton" rather
    than a guess near the middle; 0 = off (the reward's g_skel, as in the paper)"""
    pose_free_kinds: tuple[Literal["gaussian", "gaussians", "mean"], ...] = ("gaussian", "gaussians")
    """which pose-free images: gaussian (one Gaussian of the view's ink mass, centre and spread), gaussians
    (the ink as a cloud of 2 to 5 smaller Gaussians), mean (the mean of 16 other training people's same view)"""
    negatives: tuple[Path, ...] = ()
    """hard negatives: npz files of single views with key `views` (M, 6, H, W) uint8 and their `view_ids` (M,)
    (indices of VIEW_AZIMUTHS), e.g. hacked views that `bench/mine_negatives.py` mines from a reward ascent and
    from models that game the reward on the DrPose poses' inputs (never the bench); their target is empty maps.
    For the reward's g_skel only: a reader never trains on a model's output"""
    negative_share: float = 0.3
    """share of each batch replaced by rows of --negatives (when given)"""
    perturb_levels: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
    """validation: std (radians) of the noise added to every body_pose joint for perturbed poses"""
    log_every: int = 50
    """steps between log lines (also appended to posescore/metrics.jsonl)"""
    seed: int = 0
    """seeds the weights, batches, augmentation and the perturbation directions"""
    device: str = "cpu"
    """torch device"""
    threads: int | None = None
    """torch CPU threads, 0 = torch's choice (demo 1: on a shared 2-core CPU two threads per job
    thrash, measured 4x slower per step; full 0)"""

    def resolved(self) -> "TrainArgs":
        """The preset's values for every field left unset (an explicit flag always wins), checked."""
        table = PRESETS[self.preset]
        return with_preset(self, table).check()

    @property
    def outputs(self) -> tuple[Path, ...]:
        """The folder this stage writes (and replaces when re-run)."""
        return (self.out or self.run_dir / "posescore",)

    def check(self) -> "TrainArgs":
        """Every flag, before any work (one line and exit status 2 for the first bad one)."""
        check_number(self, "steps", 0, high=MAX_STEPS)
        if self.steps == 0 and self.init is None:
            raise UserError("--steps 0 trains nothing and would write an untrained g_skel; pass --steps N >= 1, "
                            "or --init FOLDER to only validate given weights")
        check_number(self, "batch_size", 1, high=MAX_BATCH)
        check_number(self, "log_every", 1)
        if self.train_on != "scans":
            check_number(self, "num_broad", 1, high=MAX_BROAD)
        check_number(self, "lr", 0, above=True, high=1)
        check_number(self, "width", 0, above=True, high=MAX_LINE_WIDTH)
        check_number(self, "pos_weight", 0, above=True, high=1000)
        check_number(self, "blur", 0, high=MAX_LINE_WIDTH)
        check_number(self, "noise", 0, high=2, fix="pass a noise std <= 2 (latents are in [-1, 1])")
        check_number(self, "mess", 0, high=2, fix="pass a strength from 0 (off) to 2 (each artefact on every view)")
        check_number(self, "seed", 0, high=SEED_MAX)
        check_number(self, "threads", 0, high=1024)
        check_number(self, "pose_free", 0, high=1, fix="pass a share from 0 (off) to 1")
        check_number(self, "adv_eps", 0, high=100, fix="pass an L2 radius >= 0 (about 1 moves each value ~1%)")
        check_number(self, "adv_steps", 1, high=100)
        check_number(self, "negative_share", 0, high=1, fix="pass a share from 0 (off) to 1")
        for path in self.negatives:
            if not path.is_file():
                raise UserError(f"--negatives {path} is not a file; pass npz files made by bench/mine_negatives.py")
        if self.pose_free > 0 and not self.pose_free_kinds:
            raise UserError("--pose-free-kinds is empty; pass one or more of " + " ".join(POSE_FREE_KINDS))
        if self.init is None and (not self.channels or len(self.channels) > MAX_LEVELS or any(
                c < 8 or c % 8 or c > MAX_CHANNELS for c in self.channels)):
            raise UserError(f"--channels {' '.join(map(str, self.channels))}: pass 1 to {MAX_LEVELS} widths, each a "
                            f"multiple of 8 (GroupNorm groups) up to {MAX_CHANNELS}, e.g. --channels 16 32 64")
        if not self.perturb_levels or not all(math.isfinite(x) and 0 < x <= math.pi for x in self.perturb_levels):
            raise UserError(f"--perturb-levels {' '.join(map(str, self.perturb_levels))}: pass one or more "
                            "noise levels in radians, > 0 and <= pi, e.g. 0.1 0.3 0.5")
        if self.init is not None and not self.init.is_dir():
            raise UserError(f"--init {self.init} is not a folder; pass a g_skel folder (posescore/, pose_reader/, "
                            "pretrained/demo_reader) or leave --init out")
        check_device(self.device)
        guard_output(self.outputs[0], "--out", "posescore")
        return self


@dataclass
class ScoreArgs:
    """Score views against their poses with any reward of the registry; print and write json."""

    views_dir: Path
    """a reconstruct.py output folder (recon/<tag>/ with {i:05d}/views.npz, key `latents`), or a
    dataset npz with `color`, `normal` and `joints` (data/scans/val.npz, data/bench/bench.npz)"""
    poses: Path | None = None
    """npz with the GT `joints` (N, 55, 3) for a recon folder; sample folder i takes row i
    (default: <run-dir>/data/bench/bench.npz; ignored when --views-dir is a dataset npz)"""
    run_dir: Path = Path("runs/demo")
    """the run folder holding posescore/"""
    reward_dir: Path | None = None
    """the reward's g_skel folder (default: <run-dir>/posescore)"""
    reward: str = "posescore"
    """a name in posescore.REWARDS, or module:function / path/to/file.py:function"""
    lpips_weights: Path | None = None
    """optional perceptual term: a TorchScript LPIPS module (see `load_perceptual`); off by default"""
    out: Path | None = None
    """where to write the scores json (default: <views-dir>/score_<reward>.json for a folder,
    none for a dataset npz)"""
    batch_size: int = 16
    """subjects per reward call"""
    device: str = "cpu"
    """torch device"""

    def check(self) -> "ScoreArgs":
        """Every flag, before any work (one line and exit status 2 for the first bad one)."""
        check_number(self, "batch_size", 1, high=MAX_BATCH)
        resolve_reward(self.reward)
        check_device(self.device)
        if self.out is not None:
            guard_output_file(self.out, "--out")
        return self


@dataclass
class CheckArgs:
    """Test a reward on the run's GT renders before training against it: true pose vs perturbed poses,
    autograd vs finite differences, batched vs looped. One PASS/FAIL line each; exit status 1 if any fails."""

    reward: str = "posescore"
    """a name in posescore.REWARDS, or module:function / path/to/file.py:function"""
    run_dir: Path = Path("runs/demo")
    """the run folder holding posescore/, body/ and the data"""
    reward_dir: Path | None = None
    """the reward's g_skel folder, its ctx (default: <run-dir>/posescore)"""
    data: Path | None = None
    """GT renders with their poses, a dataset npz (default: <run-dir>/data/scans/val.npz, the held-out scans)"""
    count: int = 8
    """subjects checked, the first N of --data"""
    levels: tuple[float, ...] = (0.2, 0.4)
    """std (radians) of the noise added to every body_pose joint for the perturbed poses"""
    seed: int = 0
    """seeds the perturbation directions and the finite-difference direction"""
    device: str = "cpu"
    """torch device of the reward's g_skel"""

    def check(self) -> "CheckArgs":
        """Every flag, before any work (one line and exit status 2 for the first bad one)."""
        check_number(self, "count", 2, high=MAX_BATCH, fix="pass --count 2 or more: batched vs looped needs two")
        check_number(self, "seed", 0, high=SEED_MAX)
        if not self.levels or not all(math.isfinite(x) and 0 < x <= math.pi for x in self.levels):
            raise UserError(f"--levels {' '.join(map(str, self.levels))}: pass one or more noise levels in radians, "
                            "> 0 and <= pi, e.g. 0.2 0.4")
        resolve_reward(self.reward)
        check_device(self.device)
        return self


PRESETS = {
    "demo": dict(steps=400, batch_size=32, channels=(16, 32, 64), width=1.0, num_broad=240, threads=1),
    "full": dict(steps=6000, batch_size=64, channels=(32, 64, 128, 128), width=1.5, num_broad=3000, threads=0),
}
# Upper bounds that keep a run within one machine's memory (the full preset is far below each).
MAX_STEPS = 1_000_000
MAX_BATCH = 4096  # single views (train) or subjects (score)
MAX_BROAD = 100_000
MAX_CHANNELS, MAX_LEVELS = 1024, 6
MAX_LINE_WIDTH = 32.0  # px: skeleton-map line width and augmentation blur
NUM_BONES = len(BONES)  # K = 21
PAPER_MAP_PSNR, PAPER_MAP_SSIM = 22.48, 0.93


# --- S(theta): skeleton maps ----------------------------------------------------------------------

def project_joints(joints: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, J >= 22, 3) world joints -> (B, V, 22, 2) pixel coordinates (u, v) of the body joints."""
    return views_to_pixels(world_to_views(joints[:, :NUM_BODY_JOINTS]), resolution)


def skeleton_maps(joints: torch.Tensor, resolution: int, width: float = 1.0) -> torch.Tensor:
    """S(theta): (B, 55 or 22, 3) world joints -> (B, V, K, H, W) soft bone lines in [0, 1].

    Channel k is bone BONES[k] drawn as exp(-d^2 / (2 width^2)), d the distance in pixels from each
    pixel centre to the projected segment. No occlusion: every bone shows in every view, so the
    maps carry the full pose even where the body hides a limb. Differentiable in the joints."""
    _check_joints(joints)
    return draw_bones(project_joints(joints, resolution), resolution, width)


def draw_bones(pix: torch.Tensor, resolution: int, width: float = 1.0) -> torch.Tensor:
    """(..., 22, 2) joint pixel coordinates -> (..., K, H, W) soft bone lines (see skeleton_maps)."""
    parent, child = (torch.tensor(side, device=pix.device) for side in zip(*BONES))
    start, stop = pix[..., parent, :], pix[..., child, :]  # (..., K, 2)
    centres = torch.arange(resolution, device=pix.device, dtype=pix.dtype) + 0.5
    along = (stop - start)[..., None, None, :]  # (..., K, 1, 1, 2)
    du = centres - start[..., 0, None, None]  # (..., K, 1, W): pixel centre minus segment start
    dv = centres[:, None] - start[..., 1, None, None]  # (..., K, H, 1)
    # Closest point on the segment: t in [0, 1] along it (eps keeps zero-length bones finite).
    length2 = along.pow(2).sum(-1) + 1e-8  # (..., K, 1, 1)
    t = ((du * along[..., 0] + dv * along[..., 1]) / length2).clamp(0, 1)  # (..., K, H, W)
    dist2 = (du - t * along[..., 0]).pow(2) + (dv - t * along[..., 1]).pow(2)
    return torch.exp(-dist2 / (2 * width ** 2))


@functools.lru_cache
def _joint_bones() -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, int], ...]]:
    """For each body joint, the bones that meet at it; and (leaf joint, its bone) pairs."""
    incident = tuple(tuple(k for k, bone in enumerate(BONES) if j in bone) for j in range(NUM_BODY_JOINTS))
    leaves = tuple((j, bones[0]) for j, bones in enumerate(incident) if len(bones) == 1)
    return incident, leaves


def _soft_argmax(weights: torch.Tensor) -> torch.Tensor:
    """(..., H, W) non-negative weights -> (..., 2) weighted centroid in pixels (u, v)."""
    res = weights.shape[-1]
    centres = torch.arange(res, device=weights.device, dtype=weights.dtype) + 0.5
    weights = weights / (weights.sum((-2, -1), keepdim=True) + 1e-12)
    u = (weights.sum(-2) * centres).sum(-1)
    v = (weights.sum(-1) * centres).sum(-1)
    return torch.stack([u, v], -1)


def joints_from_maps(maps: torch.Tensor, sharpness: float = 4.0) -> torch.Tensor:
    """Read the 22 body joints off skeleton maps: (B, V, K, H, W) in [0, 1] -> (B, V, 22, 2) pixels.

    A joint where bones meet is the soft-argmax of the product of those bones' maps (each line
    fades past its end, so the product peaks at the shared end). A leaf (head, hands, feet) is its
    bone's centre mirrored through the parent joint. Powers (`sharpness`) keep a faint background
    from dragging centroids to the image centre. Differentiable."""
    incident, leaves = _joint_bones()
    bone_centres = _soft_argmax(maps.clamp(min=0) ** sharpness)  # (B, V, K, 2)
    joints = [None] * NUM_BODY_JOINTS
    for j, bones in enumerate(incident):
        if len(bones) > 1:
            product = maps[:, :, list(bones)].clamp(min=0).prod(2)  # (B, V, H, W)
            joints[j] = _soft_argmax(product ** (sharpness / 2))
    for j, k in leaves:
        parent = BONES[k][0]
        joints[j] = 2 * bone_centres[:, :, k] - joints[parent]
    return torch.stack(joints, 2)


# --- g_skel: views -> skeleton-map logits --------------------------------------------------------

def build_gskel(resolution: int, channels: tuple[int, ...]):
    """A small diffusers U-Net: one view latent (6, H, W) + view index -> K bone logits.
    The timestep is always 0 (nothing is noised); the view index enters as a class embedding,
    which is what lets one network tell a side view's left arm from a front view's."""
    return UNet2DModel(
        sample_size=resolution, in_channels=6, out_channels=NUM_BONES, block_out_channels=tuple(channels),
        layers_per_block=1, down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels), norm_num_groups=8, add_attention=False,
        num_class_embeds=NUM_VIEWS)


def gskel_apply(gskel, images: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
    """(N, 6, H, W) single views + (N,) view indices -> (N, K, H, W) logits, at least float32
    (a bf16 g_skel still gives the loss float32 logits; a float64 one keeps float64 for tests)."""
    timestep = torch.zeros(images.shape[0], device=images.device)
    logits = gskel(images.to(gskel.dtype), timestep, class_labels=view_ids).sample
    return logits.to(torch.promote_types(images.dtype, torch.float32))


def gskel_logits(gskel, views: torch.Tensor, view_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V, 6, H, W) -> (B, V, K, H, W) logits; all B * V views go through the U-Net as one batch
    (GroupNorm normalises per image, so this equals a loop over views). g_skel reads a view knowing which
    it is: `view_ids` (V,) are the views' indices in VIEW_AZIMUTHS (default: all six in order; a subset of
    the views needs its ids, which `select_views` returns)."""
    batch, num_views = views.shape[:2]
    if view_ids is None and num_views != NUM_VIEWS:
        raise UserError(f"gskel_logits got {num_views} views and no view_ids: g_skel labels each view by its index "
                        "in VIEW_AZIMUTHS; pass view_ids (posescore.select_views returns them with the views)")
    view_ids = torch.arange(num_views) if view_ids is None else torch.as_tensor(view_ids).reshape(-1)
    if len(view_ids) != num_views or not ((view_ids >= 0) & (view_ids < NUM_VIEWS)).all():
        raise UserError(f"gskel_logits: view_ids {view_ids.tolist()} must give one index in 0..{NUM_VIEWS - 1} "
                        f"(VIEW_AZIMUTHS) per view of the {num_views}; pass the ids posescore.select_views returns")
    labels = view_ids.to(views.device).repeat(batch)  # (B * V,) v fastest
    logits = gskel_apply(gskel, views.flatten(0, 1), labels)
    return logits.unflatten(0, (batch, num_views))


def load_gskel_network(folder: Path, device="cpu"):
    """(g_skel frozen in eval mode, config dict) from a g_skel folder (posescore/, pose_reader/)."""
    folder = Path(folder)
    config_path = folder / "posescore_config.json"
    made_by = f"python posescore.py train --run-dir {folder.parent} --out {folder}"
    if not config_path.exists():
        raise UserError(f"{folder} holds no trained g_skel ({config_path.name} missing); "
                        f"make it with `{made_by}`")
    config = read_json(config_path, made_by)
    resolution, width = config.get("resolution"), config.get("width")
    if not isinstance(resolution, int) or resolution < 1 or not isinstance(width, (int, float)) or not width > 0:
        raise UserError(f"{config_path} lacks a valid resolution / width ({resolution} / {width}); re-run `{made_by}`")
    try:
        gskel = UNet2DModel.from_pretrained(folder)
    except Exception as err:  # truncated weights, a foreign config.json, missing files: all one thing to a user
        raise UserError(f"{folder}: cannot load the g_skel weights ({type(err).__name__}); re-run `{made_by}`") from None
    if gskel.config.in_channels != 6 or gskel.config.out_channels != NUM_BONES:
        raise UserError(f"{folder} is not a g_skel ({gskel.config.in_channels} -> {gskel.config.out_channels} "
                        f"channels, expected 6 -> {NUM_BONES}); re-run `{made_by}`")
    check_finite_weights(gskel.state_dict().items(), folder, f"re-run `{made_by}` or pass another g_skel")
    return gskel.to(device).eval().requires_grad_(False), config


@dataclass
class GskelContext:
    """A frozen g_skel and what reading its maps needs: the reward's network, or the pose reader."""

    gskel: torch.nn.Module
    """the frozen skeleton-map U-Net (eval mode, no grad on its weights)"""
    resolution: int
    """view resolution H = W it reads"""
    width: float
    """skeleton-map line width (Gaussian sigma, px) g_skel was trained with"""
    device: torch.device
    """where g_skel lives"""


def load_gskel(folder: Path, device="cpu") -> GskelContext:
    """The frozen g_skel of a folder (posescore/, or pose_reader/: what reconstruction and evaluation read
    poses with, never a reward)."""
    gskel, config = load_gskel_network(folder, device)
    return GskelContext(gskel=gskel, resolution=config["resolution"], width=config["width"],
                        device=torch.device(device))


# --- rewards: one signature, a registry --------------------------------------------------------

MULTIVIEW_KEYS = ("color", "normal", "depth")  # six-view ground truth: never in a reward's batch (DrPose has none)


def reward_batch(arrays: dict, rows=None, device=None) -> dict:
    """The `batch` every reward gets: the (pose, image) pair rows of a data file as tensors on `device`,
    keyed as in pairs.npz: image (B, 3, H, W) as float in [0, 1], mask (B, H, W) as float 0/1, joints (B, 55, 3),
    the SMPL-X parameters, outfits, and whatever else the file holds (`BATCH_KEYS`). A six-view file
    (bench.npz, scans) gives the same row: its multi-view GT and text columns are left out, its mask is the
    front view's, and a scans file's front colour view is its image.
    `arrays`: numpy arrays by key (other entries are skipped); `rows`: indices or a slice (default: all)."""
    if "image" not in arrays and isinstance(arrays.get("color"), np.ndarray):
        arrays = dict(arrays, image=arrays["color"][:, 0])  # (N, 3, H, W): the front view is the input image
    batch = {}
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray) or key in MULTIVIEW_KEYS or value.dtype.kind not in "biuf":
            continue  # not an array column (a path, a count), six-view GT or text
        value = torch.as_tensor(value)
        value = (value if rows is None else value[rows]).to(device)
        if key == "mask" and value.ndim == 4:
            value = value[:, 0]  # (B, V, H, W) -> the front view's (B, H, W), as in pairs.npz
        if key == "image":
            value = value.float() / 255  # uint8 -> [0, 1], what the sampler is conditioned on
        batch[key] = value.float() if value.is_floating_point() or key == "mask" else value
    return batch


# The `batch` a reward gets, key by key, as `reward_batch` makes it: shape (B subjects, H x W the resolution),
# dtype, what it is, and which rows have it. Pair rows (data/drpose/pairs.npz) are what finetune.py trains
# on; bench rows (data/bench/bench.npz) are what the periodic evaluation, `score` and the gate read.
BATCH_KEYS = {
    "image": (("B", 3, "H", "W"), torch.float32, "the input image in [0, 1]: the front view the views are sampled from",
              "both"),
    "mask": (("B", "H", "W"), torch.float32, "0/1, the person in that image", "both"),
    "joints": (("B", 55, 3), torch.float32, "SMPL-X joints in metres (y up, body centred), smplx's order", "both"),
    "global_orient": (("B", 3), torch.float32, "axis-angle of the root", "both"),
    "body_pose": (("B", 21, 3), torch.float32, "axis-angle of the 21 body joints", "both"),
    "left_hand_pose": (("B", 15, 3), torch.float32, "axis-angle, relative to smplx's relaxed hand", "both"),
    "right_hand_pose": (("B", 15, 3), torch.float32, "axis-angle, relative to smplx's relaxed hand", "both"),
    "betas": (("B", 10), torch.float32, "shape coefficients", "both"),
    "transl": (("B", 3), torch.float32, "SMPL-X translation, metres", "both"),
    "outfit_colors": (("B", 5, 3), torch.float32, "RGB in [0, 1] of skin, hair, top, bottom, shoes "
                      "(prepare_data.REGIONS)", "both"),
    "outfit_style": (("B", 2), torch.uint8, "0/1: long sleeves, long trousers", "both"),
    "anchor": (("B",), torch.int64, "the farthest-point anchor a pair belongs to (its temporal neighbours share it)",
               "pairs"),
    "scan_distance": (("B",), torch.float32, "the pose's distance to the nearest scan pose (pose_features, metres)",
                      "bench"),
}


def batch_keys(rows: Literal["pairs", "bench"]) -> dict[str, tuple[tuple, torch.dtype]]:
    """{key: (shape, dtype)} of the batch a reward gets from pair rows or bench rows (`BATCH_KEYS`)."""
    return {key: (shape, dtype) for key, (shape, dtype, _, which) in BATCH_KEYS.items() if which in ("both", rows)}


@dataclass
class RewardContext(GskelContext):
    """What every reward may use besides the views and the batch: the reward's g_skel (the fields of
    GskelContext) and an optional perceptual term. Frozen; built once per run."""

    perceptual: Callable | None = None
    """optional LPIPS-style distance (N, 3, H, W) x2 in [-1, 1] -> (N,) or (N, 1, 1, 1); None = off"""
    perceptual_weight: float = 1.0
    """weight of the perceptual term in PoseScore when `perceptual` is set"""
    members: tuple = ()
    """other g_skels (RewardContexts) of an ensemble reward (`posescore_ensemble`): the folders the reward folder's
    `ensemble.json` lists; empty for every other reward"""


def check_reward_inputs(views: torch.Tensor, batch: dict, ctx: GskelContext) -> torch.Tensor:
    """Refuse malformed inputs in one line; return the joints tensor (B, 55 or 22, 3)."""
    res = ctx.resolution
    if not torch.is_tensor(views) or views.ndim != 5 or tuple(views.shape[1:]) != (NUM_VIEWS, 6, res, res):
        shape = tuple(views.shape) if torch.is_tensor(views) else type(views).__name__
        raise UserError(f"views must be a (B, {NUM_VIEWS}, 6, {res}, {res}) tensor in [-1, 1] "
                        f"(colour + normal latents at g_skel's resolution), got {shape}")
    if not torch.isfinite(views).all():
        raise UserError("views hold NaN or Inf; check the sampler that produced them")
    joints = batch.get("joints") if isinstance(batch, dict) else None
    if joints is None:
        raise UserError("the reward batch needs 'joints' (B, 55, 3), the GT SMPL-X joints in metres")
    _check_joints(joints)
    if joints.shape[0] != views.shape[0]:
        raise UserError(f"views hold {views.shape[0]} subjects but batch['joints'] holds {joints.shape[0]}")
    return joints


def _check_joints(joints) -> None:
    if not torch.is_tensor(joints) or joints.ndim != 3 or joints.shape[1] not in (NUM_BODY_JOINTS, 55) \
            or joints.shape[2] != 3:
        shape = tuple(joints.shape) if torch.is_tensor(joints) else type(joints).__name__
        raise UserError(f"joints must be a (B, 55, 3) or (B, 22, 3) tensor (SMPL-X order, metres), got {shape}")
    if not torch.isfinite(joints).all():
        raise UserError("joints hold NaN or Inf")


# Helpers for rewards of one's own: views by azimuth with the ids g_skel and the maps index by, and a
# foreground mask with a gradient.
SIDE_AZIMUTHS = VIEW_AZIMUTHS[1:]  # every view but the front one, which shows what the input image shows


def select_views(views: torch.Tensor, azimuths=SIDE_AZIMUTHS) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V, C, H, W) views in VIEW_AZIMUTHS order -> (B, V', C, H, W) the views at `azimuths` (degrees, of
    VIEW_AZIMUTHS) and their (V',) view ids: their indices in VIEW_AZIMUTHS, which `gskel_logits(...,
    view_ids=)` needs to read them and which index the V axis of `skeleton_maps` and `project_joints`."""
    unknown = [a for a in azimuths if a not in VIEW_AZIMUTHS]
    if unknown or not len(azimuths):
        raise UserError(f"select_views: azimuths {list(azimuths)} must be one or more of VIEW_AZIMUTHS "
                        f"{list(VIEW_AZIMUTHS)} (degrees); pass e.g. posescore.SIDE_AZIMUTHS")
    view_ids = torch.tensor([VIEW_AZIMUTHS.index(a) for a in azimuths], device=views.device)
    return views[:, view_ids], view_ids


MASK_SHARPNESS = 50.0  # per unit of encoded normal: 0.02 below the threshold is 73% foreground, 0.1 is 99%


def soft_views_mask(views: torch.Tensor, sharpness: float = MASK_SHARPNESS) -> torch.Tensor:
    """(..., 6, H, W) views -> (..., H, W) in (0, 1): `prepare_data.views_mask` with a gradient, a sigmoid of
    how far the encoded normal's smallest channel lies below MASK_THRESHOLD. It covers the whole figure
    (colour ink misses light clothes and skin); 0 on the white background, about 1 on any surface."""
    return torch.sigmoid(sharpness * (MASK_THRESHOLD - encoded_normal_min(views)))


def maps_and_bce(views: torch.Tensor, batch: dict, ctx: RewardContext):
    """g_skel's logits (B, V, K, H, W) of the views, the target maps S(theta) of batch['joints']
    (same shape) and their per-pixel BCE averaged over pixels (B, V, K)."""
    joints = check_reward_inputs(views, batch, ctx)
    logits = gskel_logits(ctx.gskel, views.to(ctx.device))
    target = skeleton_maps(joints.to(ctx.device, logits.dtype), ctx.resolution, ctx.width)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((-2, -1))
    return logits, target, bce


def posescore_reward(views: torch.Tensor, batch: dict, ctx: RewardContext):
    """The paper's reward: -BCE(g_skel(views), S(theta)), mean over views, bones and pixels.

    views (B, V, 6, H, W) in [-1, 1]; batch['joints'] (B, 55, 3). Returns rewards (B,) and parts
    view_<azimuth> (B,) and bones_<group> (B,), each the same -BCE restricted to that view or
    bone group (and `perceptual` when ctx has one). A perfect match scores -H(S), not 0: BCE of
    soft targets bottoms out at their entropy; only differences between poses matter."""
    logits, target, bce = maps_and_bce(views, batch, ctx)
    rewards = -bce.mean((1, 2))
    parts = {f"view_{az:03d}": -bce[:, v].mean(1) for v, az in enumerate(VIEW_AZIMUTHS)}
    parts |= {f"bones_{name}": -bce[:, :, bones].mean((1, 2)) for name, bones in BONE_GROUPS.items()}
    if ctx.perceptual is not None:
        # LPIPS sees the maps as colour images (one hue per bone), as the paper compares them.
        pred_rgb, target_rgb = maps_to_rgb(torch.sigmoid(logits)), maps_to_rgb(target)  # (B, V, 3, H, W)
        dist = ctx.perceptual(pred_rgb.flatten(0, 1) * 2 - 1, target_rgb.flatten(0, 1) * 2 - 1)
        dist = dist.reshape(views.shape[0], NUM_VIEWS).mean(1)
        parts["perceptual"] = -dist
        rewards = rewards - ctx.perceptual_weight * dist
    return rewards, parts


def keypoints_reward(views: torch.Tensor, batch: dict, ctx: RewardContext):
    """A forked reward in a few lines: joints read off g_skel's maps (soft-argmax) against the
    projected GT joints. Reward = -mean 2D distance as a fraction of the image width (0 is
    perfect, about -0.05 is a few pixels off at 32 px); parts per view."""
    joints = check_reward_inputs(views, batch, ctx)
    maps = torch.sigmoid(gskel_logits(ctx.gskel, views.to(ctx.device)))  # (B, V, K, H, W)
    error = joints_from_maps(maps) - project_joints(joints.to(ctx.device, maps.dtype), ctx.resolution)
    error = error.norm(dim=-1).mean(-1) / ctx.resolution  # (B, V)
    return -error.mean(1), {f"view_{az:03d}": -error[:, v] for v, az in enumerate(VIEW_AZIMUTHS)}


def soft_dice(maps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(..., H, W) x2 in [0, 1] -> (...) soft Dice overlap 2 sum(p t) / (sum p + sum t), in [0, 1].
    Unlike per-pixel BCE it falls when a prediction spreads out: a diffuse map pays for every pixel
    it lights, so hedging between poses scores below committing to the right one."""
    overlap = (maps * target).sum((-2, -1))
    return (2 * overlap + 1e-3) / (maps.sum((-2, -1)) + target.sum((-2, -1)) + 1e-3)


DICE_WEIGHT = 0.3


def posescore_dice_reward(views: torch.Tensor, batch: dict, ctx: RewardContext):
    """PoseScore with an overlap term: -(BCE + DICE_WEIGHT * (1 - soft Dice)) of g_skel's maps."""
    logits, target, bce = maps_and_bce(views, batch, ctx)
    dice = soft_dice(torch.sigmoid(logits), target)  # (B, V, K)
    rewards = -bce.mean((1, 2)) - DICE_WEIGHT * (1 - dice.mean((1, 2)))
    parts = {"bce": -bce.mean((1, 2)), "dice": dice.mean((1, 2))}
    parts |= {f"view_{az:03d}": -bce[:, v].mean(1) for v, az in enumerate(VIEW_AZIMUTHS)}
    return rewards, parts


SMOOTH_DRAWS, SMOOTH_STD = 4, 0.15  # noisy copies PoseScore is averaged over, and their noise std (views in [-1, 1])


def posescore_smooth_reward(views: torch.Tensor, batch: dict, ctx: RewardContext):
    """PoseScore averaged over SMOOTH_DRAWS copies of the views with Gaussian noise of std SMOOTH_STD added: the
    reward of a randomly smoothed g_skel, as RSA-FT averages the reward's gradient over perturbed samples. A
    pixel-level adversarial direction raises one copy's score and not the others', so an ascent on the average
    follows what the copies agree on. The noise is the same on every call and for every subject (a fixed
    generator), so the reward is a deterministic function of the views."""
    generator = torch.Generator().manual_seed(0)
    noise = SMOOTH_STD * torch.randn((SMOOTH_DRAWS, 1, *views.shape[1:]), generator=generator)  # (D, 1, V, 6, H, W)
    scores = [posescore_reward((views + n.to(views)).clamp(-1, 1), batch, ctx) for n in noise]
    rewards = torch.stack([r for r, _ in scores]).mean(0)
    return rewards, {key: torch.stack([p[key] for _, p in scores]).mean(0) for key in scores[0][1]}


def median3(views: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) -> the same after a 3x3 median per channel (edges replicated); differentiable almost
    everywhere (the gradient reaches the median pixel of each window)."""
    flat = F.pad(views.reshape(-1, 1, *views.shape[-2:]), (1, 1, 1, 1), mode="replicate")
    return flat.unfold(2, 3, 1).unfold(3, 3, 1).flatten(-2).median(-1).values.reshape(views.shape)


def posescore_median_reward(views: torch.Tensor, batch: dict, ctx: RewardContext):
    """PoseScore of the views after a 3x3 median: an isolated stroke or speckle pixel, the raw material of a
    pixel-level attack on g_skel, is gone before g_skel reads the view; limbs two pixels wide stay."""
    return posescore_reward(median3(views), batch, ctx)


def posescore_lowpass_reward(views: torch.Tensor, batch: dict, ctx: RewardContext):
    """PoseScore of the views after a 3x3 box blur twice (g_skel trains under such blur, see `augment`): the
    gradient that reaches the views is low-pass too, so an ascent moves regions, not single pixels."""
    return posescore_reward(box_blur(views, 2), batch, ctx)


CONTRAST_DRAWS, CONTRAST_M = 4, 0.15  # wrong poses each view is contrasted with, and their joints' offset std (m)


def posescore_contrast_reward(views: torch.Tensor, batch: dict, ctx: RewardContext):
    """How much better g_skel's maps match the pose than nearby wrong poses: the mean BCE against CONTRAST_DRAWS
    wrong poses (every joint moved by a fixed Gaussian offset of std CONTRAST_M in 3D) minus the BCE against the
    pose. A hedge (maps spread over every possible pose) or an erased figure matches the wrong poses as well as
    the right one and earns about 0; only maps with the pose's own bones in place earn more. The offsets are
    the same on every call and for every subject (a fixed generator)."""
    logits, target, bce = maps_and_bce(views, batch, ctx)  # (B, V, K)
    joints = batch["joints"].to(logits.device, logits.dtype)
    generator = torch.Generator().manual_seed(0)
    offsets = CONTRAST_M * torch.randn((CONTRAST_DRAWS, 1, *joints.shape[1:]), generator=generator)  # (D, 1, J, 3)
    wrong = torch.stack([F.binary_cross_entropy_with_logits(
        logits, skeleton_maps(joints + offset.to(joints), ctx.resolution, ctx.width), reduction="none").mean((-2, -1))
        for offset in offsets]).mean(0)  # (B, V, K)
    margin = wrong - bce
    parts = {"bce": -bce.mean((1, 2))} | {f"view_{az:03d}": margin[:, v].mean(1) for v, az in enumerate(VIEW_AZIMUTHS)}
    return margin.mean((1, 2)), parts


ENSEMBLE_K = 1.0  # posescore_ensemble: mean - ENSEMBLE_K * std over the members' PoseScores


def posescore_ensemble_reward(views: torch.Tensor, batch: dict, ctx: RewardContext):
    """PoseScore of the reward's g_skel and of each g_skel in ctx.members (the folders that `ensemble.json` in the
    reward folder lists, e.g. {"members": ["../posescore_seed1", "../posescore_seed2"]}), mean - ENSEMBLE_K * std
    over them: a view that one g_skel pays for and the others do not earns less, as ensembles of reward models curb
    over-optimisation. Without members it is PoseScore."""
    scores = torch.stack([posescore_reward(views, batch, member)[0] for member in (ctx, *ctx.members)])  # (M, B)
    spread = (scores.var(0, unbiased=False) + 1e-12).sqrt()  # the epsilon keeps the gradient finite at zero spread
    return scores.mean(0) - ENSEMBLE_K * spread, {"mean": scores.mean(0), "std": spread}


REWARDS = {"posescore": posescore_reward, "keypoints": keypoints_reward, "posescore_dice": posescore_dice_reward,
           "posescore_smooth": posescore_smooth_reward, "posescore_median": posescore_median_reward,
           "posescore_contrast": posescore_contrast_reward, "posescore_lowpass": posescore_lowpass_reward,
           "posescore_ensemble": posescore_ensemble_reward}
# The rewards stage 2 validates (true vs perturbed poses), by name: the paper's and the two the
# README's findings are about. A forked reward is validated by bench/reward_probe.py, not here, so
# one that needs more from the context than g_skel cannot break this stage.
VALIDATED_REWARDS = ("posescore", "keypoints", "posescore_dice")


def load_perceptual(path: Path, device="cpu") -> Callable:
    """An LPIPS distance from local weights, never downloaded: a TorchScript module taking two
    (N, 3, H, W) images in [-1, 1]. A user with the `lpips` package and its weights makes one with
        m = lpips.LPIPS(net="vgg").eval(); x = torch.zeros(1, 3, 64, 64)
        torch.jit.trace(m, (x, x)).save("lpips_vgg.pt")"""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--lpips-weights {path} does not exist; pass a TorchScript LPIPS file (see "
                        "posescore.load_perceptual) or leave the flag out to use BCE only")
    try:
        module = torch.jit.load(str(path), map_location=device).eval()
    except Exception as err:
        raise UserError(f"{path} is not a TorchScript module ({type(err).__name__}); export it with "
                        "torch.jit.trace as posescore.load_perceptual describes") from None
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def load_reward_context(reward_dir: Path, device="cpu", lpips_weights: Path | None = None,
                        perceptual_weight: float = 1.0) -> RewardContext:
    """The frozen g_skel of a reward folder (posescore/), ready for any reward in REWARDS; where the folder holds
    an `ensemble.json` ({"members": [g_skel folders, relative to it]}), its members too (posescore_ensemble)."""
    gskel_ctx = load_gskel(reward_dir, device)
    perceptual = load_perceptual(lpips_weights, device) if lpips_weights is not None else None
    members, listing = (), Path(reward_dir) / "ensemble.json"
    if listing.exists():
        folders = read_json(listing, "an ensemble.json written by hand").get("members")
        if not isinstance(folders, list) or not all(isinstance(f, str) for f in folders):
            raise UserError(f'{listing}: pass {{"members": ["../other_gskel", ...]}}, folders relative to {reward_dir}')
        members = tuple(RewardContext(**vars(load_gskel(Path(reward_dir) / f, device))) for f in folders)
        if any(m.resolution != gskel_ctx.resolution for m in members):
            raise UserError(f"{listing}: every member must read {gskel_ctx.resolution} px views, as {reward_dir} does")
    return RewardContext(**vars(gskel_ctx), perceptual=perceptual, perceptual_weight=perceptual_weight,
                         members=members)


def resolve_reward(spec: str) -> Callable:
    """A reward by name in REWARDS, or from the user's own code: `module:function` (an importable
    module) or `path/to/file.py:function`. Anything that does not resolve, or whose parameters cannot take
    (views, batch, ctx), is refused in one line."""
    if spec in REWARDS:
        fn = REWARDS[spec]
    elif ":" not in spec:
        raise UserError(f"--reward {spec} is not in posescore.REWARDS {sorted(REWARDS)}; pass one of them, or "
                        "module:function or path/to/file.py:function for a reward of your own")
    else:
        fn = _import_reward(spec)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without one: the first call tells
        return fn
    try:
        signature.bind(None, None, None)
    except TypeError:
        raise UserError(f"--reward {spec}: {_function_name(fn)}{signature} cannot be called as {REWARD_SIGNATURE}; "
                        "give it those three parameters (ctx may go unused)") from None
    return fn


@functools.lru_cache(maxsize=None)
def _import_reward(spec: str) -> Callable:
    """`module:function` or `path/to/file.py:function`, imported once per process (a file's module state,
    e.g. a cache, is the same object on every call)."""
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            if not Path(where).is_file():
                raise UserError(f"--reward {spec}: {where} does not exist; pass path/to/file.py:function")
            module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as err:  # the user's module failed to import: say so in one line
        raise UserError(f"--reward {spec}: importing {where} failed ({type(err).__name__}: {err}); fix it or "
                        "pass path/to/file.py:function") from None
    if not callable(getattr(module, name, None)):
        raise UserError(f"--reward {spec}: {where} has no function {name}; pass module:function")
    return getattr(module, name)


# --- the reward's first call, checked: what comes back, and that it has a gradient ----------------------

REWARD_SIGNATURE = "fn(views, batch, ctx) -> (rewards (B,), parts {name: (B,)})"


def _function_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _described(value) -> str:
    """What a reward returned, in a few words: 'a float', 'a float32 tensor of shape (4, 6)', ..."""
    if torch.is_tensor(value):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} (" + ", ".join(map(_described, value[:3])) + \
            (", ..." if len(value) > 3 else "") + ")"
    if isinstance(value, dict):
        return f"a dict of {len(value)}"
    return f"a {type(value).__name__}"


def check_reward(fn: Callable, spec: str, views: torch.Tensor, batch: dict, ctx) -> tuple[torch.Tensor, dict]:
    """Call a reward once on B subjects and return its (rewards, parts), or refuse in one line naming it,
    what came back and REWARD_SIGNATURE: anything but a pair of a (B,) float tensor and a dict of (B,)
    tensors, non-finite rewards, parameters that cannot take (views, batch, ctx); and, when `views`
    require grad, rewards with no gradient path to them (a float made a tensor, .item(), numpy, .detach()),
    which DrPose would train on as a constant. finetune.py, `score`, `check-reward` and the gate call it
    before any work."""
    size, function = views.shape[0], _function_name(fn)
    name = f"--reward {spec}" + ("" if spec.endswith(f":{function}") else f" ({function})")
    shape = f"a reward is {REWARD_SIGNATURE}, here B = {size}"
    try:
        out = fn(views, batch, ctx)
    except TypeError as err:
        if err.__traceback__.tb_next is not None:  # raised inside the reward: its own bug, its own traceback
            raise
        raise UserError(f"{name} cannot be called as {REWARD_SIGNATURE} ({err}); give it those three "
                        "parameters") from None
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise UserError(f"{name} returned {_described(out)}; {shape}: return the pair (rewards, parts)")
    rewards, parts = out
    if not torch.is_tensor(rewards) or not rewards.is_floating_point() or tuple(rewards.shape) != (size,):
        raise UserError(f"{name} returned rewards as {_described(rewards)}; {shape}: return one float per subject, "
                        "a tensor computed from views")
    if not isinstance(parts, dict) or not all(isinstance(k, str) and torch.is_tensor(v) and v.is_floating_point()
                                              and tuple(v.shape) == (size,) for k, v in parts.items()):
        got = _described(parts) if not isinstance(parts, dict) else "parts " + ", ".join(
            f"{k!r}: {_described(v)}" for k, v in parts.items())
        raise UserError(f"{name} returned {got}; {shape}: parts maps names to (B,) float tensors (or is empty)")
    if not torch.isfinite(rewards).all():
        raise UserError(f"{name} returned non-finite rewards {rewards.tolist()} on the first batch; {shape}, finite: "
                        "keep divisions and logs away from zero")
    if views.requires_grad and torch.is_grad_enabled():
        (grad,) = torch.autograd.grad(rewards.sum(), views, allow_unused=True) if rewards.requires_grad else (None,)
        if grad is None:
            raise UserError(f"{name} returned rewards with no gradient path to the views (a float made a tensor, "
                            f".item(), numpy or .detach()?), so training would not move; {shape}, differentiable in "
                            "views: compute them from views with torch operations")
    return rewards, parts


def checked_reward(spec: str, views: torch.Tensor, batch: dict, ctx, count: int = 2) -> Callable:
    """`resolve_reward(spec)`, its first call checked (`check_reward`) on the first `count` rows of
    `views` (N, V, 6, H, W) and `batch`, with gradients; the reward function."""
    fn = resolve_reward(spec)
    rows = {k: v[:count] for k, v in batch.items()}
    with torch.enable_grad():
        check_reward(fn, spec, views[:count].detach().clone().requires_grad_(True), rows, ctx)
    return fn


def maps_to_rgb(maps: torch.Tensor) -> torch.Tensor:
    """(..., K, H, W) maps in [0, 1] -> (..., 3, H, W) one hue per bone on black, for LPIPS and pngs."""
    hue = torch.arange(NUM_BONES, device=maps.device, dtype=maps.dtype) / NUM_BONES * 2 * math.pi
    palette = torch.stack([torch.cos(hue + phase) for phase in (0, 2.094, 4.189)], -1) * 0.5 + 0.5  # (K, 3)
    return torch.einsum("...khw,kc->...chw", maps, palette).clamp(0, 1)


# --- data: views and joints to train on --------------------------------------------------------

def load_view_latents(path: Path, keys=("joints",)) -> dict:
    """A dataset npz -> latents (N, V, 6, H, W) in [-1, 1], joints (N, 55, 3), the rows as a reward
    batch (`reward_batch`) and the raw arrays."""
    arrays = load_split(path, expect_keys=("color", "normal", *keys))
    latents = views_to_latents(from_uint8(arrays["color"]), from_uint8(arrays["normal"]))
    return dict(arrays, latents=latents, joints_t=torch.from_numpy(arrays["joints"]).float(),
                batch=reward_batch(arrays))


def render_broad(run_dir: Path, count: int, resolution: int, seed: int, device, any_orientation: bool = False) -> dict:
    """`count` broad poses in training-hue outfits, rendered through prepare_data's own path
    (the one that made data/scans/): latents (count, V, 6, H, W) and joints (count, 55, 3).
    any_orientation: each body turned to a uniformly random orientation (Haar measure on SO(3))."""
    rng = np.random.default_rng(seed + 1)  # not the scans' stream: new poses
    poses, outfits = generate_poses("broad", count, rng), sample_outfits(count, rng, held_out=False)
    if any_orientation:
        poses["global_orient"] = Rotation.random(count, random_state=rng).as_rotvec().astype(np.float32)
    body = load_body_model(run_dir / "body", device)
    latents, joints = [], []
    for i in range(0, count, 32):  # chunks keep the 2x render's memory small
        out = render_subjects(body, {k: v[i:i + 32] for k, v in poses.items()},
                              {k: v[i:i + 32] for k, v in outfits.items()}, resolution, device)
        latents.append(views_to_latents(out["color"], out["normal"]).cpu())
        joints.append(out["joints"].cpu())
    return dict(latents=torch.cat(latents), joints_t=torch.cat(joints))


def augment(images: torch.Tensor, blur: float, noise: float, generator: torch.Generator) -> torch.Tensor:
    """(N, 6, H, W) in [-1, 1] -> the same, softened: a random blend towards a Gaussian blur, a
    per-channel gain and Gaussian noise. Generated views are blurrier and noisier than renders."""
    num = images.shape[0]
    if blur > 0:
        taps = torch.arange(-2, 3, dtype=images.dtype)
        kernel = torch.exp(-taps ** 2 / (2 * blur ** 2))
        kernel = (kernel / kernel.sum()).to(images.device)
        blurred = F.pad(images, (2, 2, 2, 2), mode="replicate")
        blurred = F.conv2d(blurred, kernel.view(1, 1, 1, 5).expand(6, 1, 1, 5), groups=6)
        blurred = F.conv2d(blurred, kernel.view(1, 1, 5, 1).expand(6, 1, 5, 1), groups=6)
        amount = torch.rand(num, 1, 1, 1, generator=generator).to(images.device)
        images = images + amount * (blurred - images)
    gain = 1 + 0.1 * torch.randn(num, 6, 1, 1, generator=generator).to(images.device)
    std = noise * torch.rand(num, 1, 1, 1, generator=generator).to(images.device)
    jitter = torch.randn(images.shape, generator=generator).to(images.device)
    return (images * gain + std * jitter).clamp(-1, 1)


# --- artefacts of generated views: the judge reads through them, the judge check measures them ------
# Generated views are right or wrong in pose and, separately, clean or messy in drawing. A fair judge
# reads the pose through solid mess (isolated speckle, blotches, blur, colour shifts, pixels missing
# or added at the limbs) and does not reward a pose that is barely drawn (faint: blended towards the
# background). All act on view latents (..., 6, H, W) in [-1, 1] whose background is 1.

def speckle(views: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """`share` of the pixels replaced by uniform random values, independently per pixel."""
    hit = torch.rand(views[..., :1, :, :].shape, generator=generator) < share  # (..., 1, H, W)
    noise = torch.rand(views.shape, generator=generator) * 2 - 1
    return torch.where(hit.to(views.device), noise.to(views), views)


def box_blur(views: torch.Tensor, times: int) -> torch.Tensor:
    """A 3x3 box blur (edges replicated), `times` times: a blob when repeated."""
    flat = views.reshape(-1, 1, *views.shape[-2:])
    for _ in range(times):
        flat = F.avg_pool2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return flat.reshape(views.shape)


def fade(views: torch.Tensor, amount: float | torch.Tensor) -> torch.Tensor:
    """Blend towards the background (1) by `amount` in [0, 1]: a faint drawing of the same pose."""
    return views + amount * (1 - views)


def _random_discs(mask: torch.Tensor, count: int, radius: float, generator: torch.Generator) -> torch.Tensor:
    """(N, H, W) {0, 1} -> (N, H, W) bool: `count` discs per image centred on random pixels of `mask`."""
    res = mask.shape[-1]
    weights = mask.flatten(1) + 1e-6  # an empty mask still gets discs, anywhere
    centres = torch.multinomial(weights, count, replacement=True, generator=generator)  # (N, count)
    cu, cv = (centres % res).float() + 0.5, (centres // res).float() + 0.5
    grid = torch.arange(res, dtype=torch.float32) + 0.5
    d2 = (grid[None, None, None, :] - cu[..., None, None]) ** 2 + (grid[None, None, :, None] - cv[..., None, None]) ** 2
    return (d2 <= radius ** 2).any(1)  # (N, H, W)


def solid_mess(views: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """(N, 6, H, W) -> the same poses drawn messily but solidly, each artefact drawn at random per
    image: colour shift, blotches of random colour near the figure, figure pixels missing (turned to
    background) or added (the figure grown by a pixel) near the limbs, blur, isolated speckle.
    The reader trains under it, so that a correct, messy view reads close to a correct, clean one."""
    num, device = views.shape[0], views.device
    out = views.detach().float().cpu()  # drawn on the CPU, where the generator lives
    mask = views_mask(out)  # (N, H, W) the figure as drawn
    on = lambda p: (torch.rand(num, generator=generator) < p * strength)  # (N,) which images get it
    # colour shift: gain and offset per channel
    gain = 1 + 0.15 * torch.randn(num, 6, 1, 1, generator=generator)
    offset = 0.1 * torch.randn(num, 6, 1, 1, generator=generator)
    shifted = out + mask[:, None] * (out * (gain - 1) + offset)  # the figure moves, the background stays
    out = torch.where(on(0.5)[:, None, None, None], shifted, out)
    # pixels missing near the limbs: small discs of the figure turned to background
    gone = _random_discs(mask, 3, 1.0, generator) & on(0.4)[:, None, None]
    out = torch.where(gone[:, None], torch.ones_like(out), out)
    # pixels added near the limbs: the figure grown by one pixel (a max-pool of its darkness) in places
    grown = -F.max_pool2d(-out, 3, stride=1, padding=1)
    extra = _random_discs(mask, 4, 1.5, generator) & on(0.4)[:, None, None]
    out = torch.where(extra[:, None], grown, out)
    # blotches: discs of one random colour near the figure
    colour = torch.rand(num, 6, 1, 1, generator=generator) * 2 - 1
    blot = _random_discs(mask, 2, 1.5, generator) & on(0.4)[:, None, None]
    out = torch.where(blot[:, None], colour.expand_as(out), out)
    # blur: 0 to 6 passes of a 3x3 box (six passes is a blob)
    passes = torch.randint(0, 7, (num,), generator=generator) * on(0.5)
    for k in passes.unique().tolist():
        out[passes == k] = box_blur(out[passes == k], k)
    # isolated speckle, up to 12% of the pixels
    share = 0.12 * torch.rand(num, 1, 1, 1, generator=generator) * on(0.5)[:, None, None, None]
    hit = torch.rand(num, 1, *views.shape[-2:], generator=generator) < share
    out = torch.where(hit, torch.rand(out.shape, generator=generator) * 2 - 1, out)
    return out.clamp(-1, 1).to(device, views.dtype)


# Pose-free images carry a body's ink but no limbs: a blob, the mean of many people, a cloud of smudges. A
# reader that sees no limbs must say so (empty maps) rather than guess joints near the middle of the ink,
# which for a spread-out pose lies closer to the truth than a confidently wrong upright figure does.

def darkness(views: torch.Tensor) -> torch.Tensor:
    """(..., 6, H, W) -> (..., H, W) in [0, 1]: 1 - the smallest encoded normal channel; 0 on the background,
    >= 0.21 on any solid surface. The figure's ink, per pixel."""
    return 1 - encoded_normal_min(views).clamp(0, 1)


def ink_gaussians(views: torch.Tensor, generator: torch.Generator | None = None, parts: int = 1) -> torch.Tensor:
    """(N, 6, H, W) -> the same ink as `parts` Gaussians and no limbs. parts=1: one Gaussian of the view's ink
    mass, centre and spread (covariance), in its ink-weighted mean colour. parts>1: the ink split at random
    (`generator`) into that many Gaussians, each with a random share of the mass, a centre drawn from the ink
    and a random fraction of its spread: a cloud of smudges where the body was."""
    num, _, res, _ = views.shape
    dark = darkness(views.float())  # (N, H, W)
    grid = torch.arange(res, dtype=dark.dtype, device=dark.device) + 0.5
    u, v = grid[None, None, :], grid[None, :, None]  # (1, 1, W), (1, H, 1)
    mass = dark.sum((-2, -1)).clamp(min=1e-6)  # (N,)
    weights = dark / mass[:, None, None]
    cu, cv = (weights * u).sum((-2, -1)), (weights * v).sum((-2, -1))  # (N,)
    du, dv = u - cu[:, None, None], v - cv[:, None, None]
    cov = torch.stack([(weights * du * du).sum((-2, -1)), (weights * du * dv).sum((-2, -1)),
                       (weights * dv * dv).sum((-2, -1))], -1)  # (N, 3): uu, uv, vv
    colour = (views.float() * weights[:, None]).sum((-2, -1))  # (N, 6) ink-weighted mean latent
    field = torch.zeros_like(dark)
    for _ in range(parts):
        share, scale = torch.ones(num), torch.ones(num)
        centre_u, centre_v = cu, cv
        if parts > 1:  # a random part of the mass, centred on a random inked pixel, with a part of the spread
            share = torch.rand(num, generator=generator) * 2 / parts
            scale = 0.15 + 0.5 * torch.rand(num, generator=generator)
            pick = torch.multinomial(dark.flatten(1).cpu() + 1e-6, 1, generator=generator)[:, 0]
            centre_u, centre_v = (pick % res).to(dark) + 0.5, (pick // res).to(dark) + 0.5
        uu, uv, vv = (cov * scale.to(cov)[:, None] + 0.25).unbind(-1)  # +0.25: at least a pixel wide
        det = uu * vv - uv ** 2
        du, dv = u - centre_u[:, None, None], v - centre_v[:, None, None]
        quad = (vv[:, None, None] * du ** 2 - 2 * uv[:, None, None] * du * dv + uu[:, None, None] * dv ** 2) / det[:, None, None]
        field = field + (share.to(mass) * mass)[:, None, None] * torch.exp(-quad / 2) / (2 * math.pi * det.sqrt())[:, None, None]
    # Blend from the background (1) towards the mean colour by field / the colour's own darkness: the
    # blob's darkness is then the Gaussian field, and its ink the view's (where no pixel saturates).
    colour_dark = darkness(colour[..., None, None])[:, 0, 0].clamp(min=0.05)  # (N,)
    amount = (field / colour_dark[:, None, None]).clamp(0, 1)
    return (1 + amount[:, None] * (colour[..., None, None] - 1)).to(views.dtype)


POSE_FREE_KINDS = ("gaussian", "gaussians", "mean")
MEAN_OF = 16  # people averaged in a `mean` pose-free image


def pose_free_images(latents: torch.Tensor, subject: torch.Tensor, view: torch.Tensor, kinds: tuple[str, ...],
                     generator: torch.Generator) -> torch.Tensor:
    """Pose-free images for training rows: latents (S, V, 6, H, W) of the training people, the rows' subject and
    view indices (N,) -> (N, 6, H, W), each row of a kind drawn at random from `kinds` (POSE_FREE_KINDS)."""
    images = latents[subject, view].float()  # (N, 6, H, W)
    kind = torch.randint(len(kinds), (len(subject),), generator=generator)
    parts = torch.randint(2, 6, (1,), generator=generator).item()
    others = torch.randint(len(latents), (len(subject), MEAN_OF), generator=generator)
    made = {"gaussian": lambda: ink_gaussians(images),
            "gaussians": lambda: ink_gaussians(images, generator, parts),
            "mean": lambda: latents[others, view[:, None]].float().mean(1)}  # (N, 6, H, W)
    out = images.clone()
    for k, name in enumerate(kinds):
        rows = kind == k
        if rows.any():
            out[rows] = made[name]()[rows]
    return out


def ink(views: torch.Tensor) -> torch.Tensor:
    """(..., 6, H, W) -> (...) how much figure a view draws: the darkness of its encoded normals
    (1 - smallest channel; 0 on the background, >= 0.21 on any solid surface) summed over pixels,
    after a 3x3 median that removes isolated speckle. Blur keeps it; fading towards the background
    scales it down."""
    dark = darkness(views)  # (..., H, W)
    flat = F.pad(dark.reshape(-1, 1, *dark.shape[-2:]), (1, 1, 1, 1), mode="replicate")
    median = flat.unfold(2, 3, 1).unfold(3, 3, 1).flatten(-2).median(-1).values  # (M, 1, H, W)
    return median.sum((-3, -2, -1)).reshape(dark.shape[:-2])


def solidity(views: torch.Tensor, gt_views: torch.Tensor) -> torch.Tensor:
    """(..., 6, H, W) x2 -> (...) in [0, 1]: the share of the GT render's ink a view draws, capped at 1.
    A solid drawing of any pose scores about 1; a faint or fuzzy one scores its opacity."""
    return (ink(views) / ink(gt_views).clamp(min=1e-6)).clamp(max=1)


SOLID_SHARE = 0.8  # a view drawing at least this share of the GT's ink is judged by its pose alone
UNSOLID_PENALTY_PX = 10.0  # the judged error a view with no ink at all pays on top of its reading
# A view the reader is at least this share as sure of as of the GT render is judged by its pose alone. Half: a blob
# (one Gaussian of the ink) reads about 0, a gamed model's views about 0.55, and the right pose drawn messily 0.81 or
# more on average, with single blurred views below 0.8 (so the solidity's 0.8 would charge a correct pose).
SURE_SHARE = 0.5
UNSURE_PENALTY_PX = 10.0  # the judged error a view the reader sees no body in pays on top of its reading


def judged_error(error_px: torch.Tensor, solid: torch.Tensor, sure: torch.Tensor | None = None) -> torch.Tensor:
    """The judge's verdict on a view, pose and drawing together: the reader's joint error (px), plus
    a penalty growing linearly from 0 at SOLID_SHARE of the GT's ink to UNSOLID_PENALTY_PX at none, plus one
    growing from 0 at SURE_SHARE of the reader's confidence on the GT render to UNSURE_PENALTY_PX at none.
    A faint pose earns nothing for being in the right place, since it is not yet a body; a blob earns nothing
    for holding the body's ink, since the reader sees no limbs in it and its joints are a guess."""
    judged = error_px + UNSOLID_PENALTY_PX * (1 - solid / SOLID_SHARE).clamp(min=0)
    if sure is not None:
        judged = judged + UNSURE_PENALTY_PX * (1 - sure / SURE_SHARE).clamp(min=0)
    return judged


def judge_verdict(reader: GskelContext, views: torch.Tensor, gt_views: torch.Tensor, joints: torch.Tensor) -> dict:
    """The judge of one reader on (N, V, 6, H, W) generated views against the GT renders and joints of the same
    people, per view (N, V): the reader's error (px), the solidity (share of the GT's ink), the sureness (its
    confidence as a share of its confidence on the GT render, capped at 1) and the judged error."""
    read, truth = read_poses(reader, views, joints), read_poses(reader, gt_views, joints)
    solid = solidity(views, gt_views)
    sure = (read["confidence"] / truth["confidence"].clamp(min=1e-6)).clamp(max=1)
    return dict(error=read["error"], solidity=solid, sureness=sure, judged=judged_error(read["error"], solid, sure))


def read_poses(ctx: GskelContext, views: torch.Tensor, joints: torch.Tensor, chunk: int = 16) -> dict[str, torch.Tensor]:
    """A reader's reading of (N, V, 6, H, W) views against (N, 55, 3) GT joints, per view (N, V):
        error       mean distance in px between the body joints read off its maps and the GT joints projected
                    into the view (joints_from_maps)
        confidence  how sure it is that a body is there: the peak of each bone's map, averaged over the bones.
                    A reader trained on pose-free images (TrainArgs.pose_free) answers them with empty maps."""
    errors, confidences = [], []
    with torch.no_grad():
        for i in range(0, len(views), chunk):
            maps = torch.sigmoid(gskel_logits(ctx.gskel, views[i:i + chunk].to(ctx.device)))  # (B, V, K, H, W)
            truth = project_joints(joints[i:i + chunk].to(ctx.device, maps.dtype), ctx.resolution)
            errors.append((joints_from_maps(maps) - truth).norm(dim=-1).mean(-1).cpu())  # (B, V)
            confidences.append(maps.flatten(-2).amax(-1).mean(-1).cpu())  # (B, V)
    return dict(error=torch.cat(errors), confidence=torch.cat(confidences))


def view_joint_error(ctx: GskelContext, views: torch.Tensor, joints: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """The pose reader's 2D error: (N, V, 6, H, W) views and (N, 55, 3) GT joints -> (N, V) mean
    distance in px between the body joints read off its maps and the GT joints projected into each
    view. The evaluation metric; no reward of the registry computes it, so editing one cannot move it."""
    return read_poses(ctx, views, joints, chunk)["error"]


# --- training ----------------------------------------------------------------------------------

def warmup_cosine(step: int, steps: int, peak: float, warmup: int) -> float:
    """The learning rate at `step` of `steps`: a linear warm-up over `warmup` steps times a cosine from
    `peak` to zero. A function of the step, so a resumed run needs no scheduler state (pretrain.py uses
    it too)."""
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, steps))))


def adversarial_images(gskel, images: torch.Tensor, view: torch.Tensor, target: torch.Tensor, eps: float, steps: int,
                       pos_weight: torch.Tensor) -> torch.Tensor:
    """(N, 6, H, W) images moved within an L2 ball of radius `eps` (per image) to raise g_skel's BCE against the
    unchanged `target` maps: `steps` of normalised gradient ascent, each projected back onto the ball."""
    if eps <= 0:
        return images
    delta = torch.zeros_like(images)
    step_size = 2.5 * eps / steps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.binary_cross_entropy_with_logits(gskel_apply(gskel, (images + delta).clamp(-1, 1), view), target,
                                                  pos_weight=pos_weight)
        grad, = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta + step_size * grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None, None]
            norm = delta.flatten(1).norm(dim=1)
            delta = delta * (eps / norm.clamp(min=eps))[:, None, None, None]  # back onto the ball
    return (images + delta).clamp(-1, 1).detach()


def load_negatives(paths, resolution: int) -> dict | None:
    """--negatives files -> {"views": (M, 6, H, W) in [-1, 1], "view_ids": (M,)}, or None without files."""
    if not paths:
        return None
    views, view_ids = [], []
    for path in paths:
        arrays = read_npz(path, ("views", "view_ids"), "python bench/mine_negatives.py")
        if arrays["views"].ndim != 4 or arrays["views"].shape[1:] != (6, resolution, resolution):
            raise UserError(f"--negatives {path} holds views {arrays['views'].shape}, not (M, 6, {resolution}, "
                            f"{resolution}); mine them from this run's data with bench/mine_negatives.py")
        views.append(from_uint8(arrays["views"]) * 2 - 1)
        view_ids.append(torch.from_numpy(arrays["view_ids"]).long().clamp(0, NUM_VIEWS - 1))
    return dict(views=torch.cat(views), view_ids=torch.cat(view_ids))


def train_gskel(latents: torch.Tensor, joints: torch.Tensor, args: TrainArgs, log_path: Path | None = None,
                negatives: dict | None = None):
    """Fit g_skel by per-pixel BCE on single views. latents (N, V, 6, H, W), joints (N, 55, 3); negatives
    (load_negatives) are views whose target is empty maps. Targets are drawn on the fly (a full set of maps would
    be N*V*K*H*W floats). Returns g_skel."""
    resolution, device = latents.shape[-1], torch.device(args.device)
    torch.manual_seed(args.seed)  # the initial weights
    generator = torch.Generator().manual_seed(args.seed)  # batches and augmentation
    if args.init is not None:
        gskel, _ = load_gskel_network(args.init, device)
        gskel = gskel.float().requires_grad_(True).train()
    else:
        gskel = build_gskel(resolution, args.channels).to(device).train()
    optimiser = torch.optim.AdamW(gskel.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: warmup_cosine(s, args.steps, 1.0, warmup))
    pos_weight = torch.tensor(args.pos_weight, device=device)
    start, num = time.time(), latents.shape[0]
    bar = tqdm(range(args.steps), desc="g_skel", leave=False, disable=None)  # a bar on a terminal only
    for step in bar:
        subject = torch.randint(num, (args.batch_size,), generator=generator)
        view = torch.randint(NUM_VIEWS, (args.batch_size,), generator=generator)
        images = latents[subject, view]  # (N, 6, H, W)
        no_skeleton = torch.zeros(args.batch_size, dtype=torch.bool)  # rows whose target is empty maps
        if args.pose_free > 0:  # a share of the rows: the same views without their limbs
            free = torch.rand(args.batch_size, generator=generator) < args.pose_free
            images = torch.where(free[:, None, None, None], pose_free_images(
                latents, subject, view, args.pose_free_kinds, generator), images)
            no_skeleton |= free
        if negatives is not None:  # a share of the rows: hacked views, each read as its own view
            negative = torch.rand(args.batch_size, generator=generator) < args.negative_share
            pick = torch.randint(len(negatives["views"]), (args.batch_size,), generator=generator)
            images = torch.where(negative[:, None, None, None], negatives["views"][pick], images)
            view = torch.where(negative, negatives["view_ids"][pick], view)
            no_skeleton |= negative
        images = augment(images.to(device), args.blur, args.noise, generator)
        if args.mess > 0:
            images = solid_mess(images, generator, args.mess)
        pix = project_joints(joints[subject].to(device), resolution)[torch.arange(args.batch_size), view]
        target = draw_bones(pix, resolution, args.width)  # (N, K, H, W): only the views in the batch
        target = target * (~no_skeleton).to(target)[:, None, None, None]
        if args.adv_eps > 0:
            images = adversarial_images(gskel, images, view.to(device), target, args.adv_eps, args.adv_steps, pos_weight)
        logits = gskel_apply(gskel, images, view.to(device))
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
        if not torch.isfinite(loss):  # NaN guard: stop before the weights take a bad step; nothing is written
            raise UserError(f"g_skel training stopped at step {step + 1}: the loss is {loss.item()}; "
                            "lower --lr or check data/scans/")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            line = dict(step=step + 1, loss=round(loss.item(), 5), lr=schedule.get_last_lr()[0],
                        seconds=round(time.time() - start, 1))
            bar.set_postfix(loss=line["loss"])
            print(json.dumps(line), flush=True)
            if log_path is not None:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(line) + "\n")
    return gskel.eval().requires_grad_(False)


# --- validation: map quality, joint error, true vs perturbed poses -----------------------------

def perturbed_poses(body, arrays: dict, levels, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each subject's pose with noise level * eps added to every body_pose joint (eps ~ N(0, 1), drawn once
    per subject so the pose moves further along one direction as the level grows): body_pose (L, N, 21, 3)
    and joints (L, N, 55, 3). Orientation, shape and translation stay."""
    generator = torch.Generator().manual_seed(seed)
    device = body.v_template.device
    params = {k: torch.from_numpy(arrays[k]).float().to(device) for k in POSE_KEYS if k in arrays}
    direction = torch.randn(params["body_pose"].shape, generator=generator).to(device)
    poses, out = [], []
    with torch.no_grad():
        for level in levels:
            poses.append(params["body_pose"] + level * direction)
            out.append(body_forward(body, dict(params, body_pose=poses[-1]))[1].cpu())
    return torch.stack(poses).cpu(), torch.stack(out)


def perturbed_joints(body, arrays: dict, levels, seed: int) -> torch.Tensor:
    """(L, N, 55, 3) joints of `perturbed_poses`."""
    return perturbed_poses(body, arrays, levels, seed)[1]


def reward_in_chunks(fn, latents: torch.Tensor, batch: dict, ctx: RewardContext, chunk: int = 16):
    """(N,) rewards and {part: (N,)} of a reward over N subjects (`batch`: their pair rows, see
    `reward_batch`), without gradients."""
    rewards, parts = [], {}
    with torch.no_grad():
        for i in range(0, len(latents), chunk):
            r, p = fn(latents[i:i + chunk], {k: v[i:i + chunk] for k, v in batch.items()}, ctx)
            rewards.append(r.cpu())
            for k, v in p.items():
                parts.setdefault(k, []).append(v.cpu())
    return torch.cat(rewards), {k: torch.cat(v) for k, v in parts.items()}


def true_vs_perturbed(fn, latents, batch, moved_joints, levels, ctx) -> dict:
    """How a reward ranks GT renders' own pose (`batch`) against perturbed poses (`moved_joints`
    (L, N, 55, 3) in place of batch['joints']): accuracy (true scores higher) over all (subject,
    level) pairs, per level, and Spearman rank correlation between perturbation size (0 = true) and
    reward, per subject then averaged, and pooled."""
    true_r, _ = reward_in_chunks(fn, latents, batch, ctx)  # (N,)
    moved_r = torch.stack([reward_in_chunks(fn, latents, dict(batch, joints=j), ctx)[0]
                           for j in moved_joints])  # (L, N)
    wins = (true_r[None] > moved_r).double()
    table = torch.cat([true_r[None], moved_r]).numpy()  # (L + 1, N)
    sizes = np.array([0.0, *levels])
    per_subject = [spearmanr(sizes, table[:, n])[0] for n in range(table.shape[1])]
    pooled = spearmanr(np.repeat(sizes, table.shape[1]), table.reshape(-1))[0]
    return dict(accuracy=wins.mean().item(), accuracy_per_level=dict(zip(map(str, levels), wins.mean(1).tolist())),
                spearman_mean=float(np.nanmean(per_subject)), spearman_pooled=float(pooled),
                reward_per_level=dict(zip(map(str, sizes.tolist()), table.mean(1).tolist())))


def map_quality(ctx: GskelContext, latents: torch.Tensor, joints: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Skeleton-map PSNR / SSIM (skimage, data range 1, per view over all K channels, averaged) and
    the 2D joint error in pixels read off predicted maps (and off the target maps: the reader's
    own floor). Returns the numbers and the predicted maps (N, V, K, H, W)."""
    preds, targets = [], []
    with torch.no_grad():
        for i in range(0, len(latents), 16):
            preds.append(torch.sigmoid(gskel_logits(ctx.gskel, latents[i:i + 16].to(ctx.device))).cpu())
            targets.append(skeleton_maps(joints[i:i + 16], ctx.resolution, ctx.width))
    pred, target = torch.cat(preds), torch.cat(targets)
    pred_np, target_np = pred.flatten(0, 1).numpy(), target.flatten(0, 1).numpy()  # (N * V, K, H, W)
    psnr = [peak_signal_noise_ratio(t, p, data_range=1.0) for t, p in zip(target_np, pred_np)]
    ssim = [structural_similarity(t, p, data_range=1.0, channel_axis=0) for t, p in zip(target_np, pred_np)]
    gt_pix = project_joints(joints, ctx.resolution)
    error = (joints_from_maps(pred) - gt_pix).norm(dim=-1)
    floor = (joints_from_maps(target) - gt_pix).norm(dim=-1)
    return dict(map_psnr=float(np.mean(psnr)), map_ssim=float(np.mean(ssim)), joint_error_px=error.mean().item(),
                joint_error_px_median=error.median().item(), joint_error_px_reader_floor=floor.mean().item(),
                subjects=len(latents)), pred


class RememberedGskel(torch.nn.Module):
    """A frozen g_skel that runs once per distinct input and replays its output after: validation asks
    every reward about the same views under six poses, and g_skel's maps of a view do not depend on the
    pose (18 passes of the network become one)."""

    def __init__(self, gskel):
        super().__init__()
        self.gskel, self.seen = gskel, []

    @property
    def dtype(self) -> torch.dtype:
        return self.gskel.dtype

    def forward(self, images: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor):
        for (seen_images, seen_time, seen_labels), output in self.seen:
            if seen_images.shape == images.shape and torch.equal(seen_images, images) \
                    and torch.equal(seen_time, timestep) and torch.equal(seen_labels, class_labels):
                return output
        output = self.gskel(images, timestep, class_labels=class_labels)
        self.seen.append(((images, timestep, class_labels), output))
        return output


def validate(ctx: RewardContext, splits: dict, body, args: TrainArgs, folder: Path) -> dict:
    """Every validation number for every split, and maps.png (views | target | predicted)."""
    results, rows = {}, []
    for name, data in splits.items():
        remembered = dataclasses.replace(ctx, gskel=RememberedGskel(ctx.gskel))  # one split's views at a time
        quality, pred = map_quality(remembered, data["latents"], data["joints_t"])
        moved = perturbed_joints(body, data, args.perturb_levels, args.seed)
        results[name] = dict(quality, **{
            f"true_vs_perturbed_{reward}": true_vs_perturbed(REWARDS[reward], data["latents"], data["batch"],
                                                             moved, args.perturb_levels, remembered)
            for reward in VALIDATED_REWARDS})
        for n in range(min(2, len(pred))):  # two subjects per split: colour | normal | target | predicted
            views = (data["latents"][n] + 1) / 2  # (V, 6, H, W)
            target = maps_to_rgb(skeleton_maps(data["joints_t"][n:n + 1], ctx.resolution, ctx.width)[0])
            strip = torch.cat([views[:, :3], views[:, 3:], target, maps_to_rgb(pred[n])], 2)  # (V, 3, 4H, W)
            rows.append(torch.cat(list(strip), 2))  # (3, 4H, V*W)
    grid = torch.cat(rows, 1).permute(1, 2, 0).repeat_interleave(4, 0).repeat_interleave(4, 1)
    iio.imwrite(folder / "maps.png", (grid.clamp(0, 1) * 255).round().byte().numpy())
    return results


# --- score: a folder of views against their poses ----------------------------------------------

def read_scored_views(args: ScoreArgs) -> tuple[torch.Tensor, dict, list[str]]:
    """latents (N, V, 6, H, W), their pair rows (`reward_batch`: GT joints, image, ...) and a name per
    sample, from --views-dir."""
    if args.views_dir.suffix == ".npz":
        data = load_view_latents(args.views_dir)
        return data["latents"], data["batch"], [f"{i:05d}" for i in range(len(data["latents"]))]
    folders = sorted(p for p in args.views_dir.glob("[0-9]" * 5) if (p / "views.npz").exists())
    if not folders:
        raise UserError(f"{args.views_dir} holds no {{i:05d}}/views.npz sample folders; make them with "
                        "`python reconstruct.py` or pass a dataset npz")
    poses_path = args.poses or args.run_dir / "data" / "bench" / "bench.npz"
    poses = load_split(poses_path, expect_keys=("joints",))
    joints = poses["joints"]
    latents = []
    for folder in folders:
        made_by = f"python reconstruct.py --run-dir {args.run_dir}"
        res = latents[0].shape[-1] if latents else None
        array = read_npz_key(folder / "views.npz", "latents", made_by, shape=(NUM_VIEWS, 6, res, res))
        latents.append(torch.from_numpy(array))
    index = [int(f.name) for f in folders]
    if max(index) >= len(joints):
        raise UserError(f"{args.views_dir} has sample {max(index):05d} but {poses_path} holds {len(joints)} "
                        "poses; pass the dataset the views were made from with --poses")
    return torch.stack(latents), reward_batch(poses, index), [f.name for f in folders]


def score(args: ScoreArgs) -> None:
    args.check()
    ctx = load_reward_context(args.reward_dir or args.run_dir / "posescore", args.device, args.lpips_weights)
    latents, batch, names = read_scored_views(args)
    fn = checked_reward(args.reward, latents, batch, ctx)  # a malformed reward: one line, before any scoring
    rewards, parts = reward_in_chunks(fn, latents, batch, ctx, args.batch_size)
    result = dict(reward=args.reward, views=str(args.views_dir), count=len(names), mean=rewards.mean().item(),
                  parts_mean={k: v.mean().item() for k, v in parts.items()},
                  per_sample=[dict(name=n, reward=rewards[i].item(), **{k: v[i].item() for k, v in parts.items()})
                              for i, n in enumerate(names)])
    print(f"{args.reward}: mean {result['mean']:.4f} over {len(names)} samples of {args.views_dir}")
    for key, value in result["parts_mean"].items():
        print(f"  {key:16s} {value:.4f}")
    name = Path(args.reward).name.replace(":", "_")  # a name, or file.py:function
    out = args.out or (None if args.views_dir.suffix == ".npz" else args.views_dir / f"score_{name}.json")
    if out is not None:
        write_json(out, result)
        print(f"wrote {out}")


# --- check-reward: the README's tests of a reward, on the run's GT renders ------------------------

RANK_SHARE = 0.9  # the true pose must score above a perturbed one in at least this share of (subject, level) pairs
FD_STEP, FD_TOLERANCE = 1e-7, 1e-3  # float64 central differences, and the relative agreement asked of autograd


def ranks_true_pose_higher(fn, views, batch, ctx, body, arrays: dict, levels, seed: int) -> tuple[bool, str]:
    """The reward of GT renders with their own pose against the same renders with perturbed poses
    (`perturbed_poses`: batch body_pose and joints replaced)."""
    poses, joints = perturbed_poses(body, arrays, levels, seed)  # (L, N, 21, 3), (L, N, 55, 3)
    with torch.no_grad():
        true = fn(views, batch, ctx)[0]  # (N,)
        moved = torch.stack([fn(views, dict(batch, body_pose=poses[i], joints=joints[i]), ctx)[0]
                             for i in range(len(levels))])  # (L, N)
    share = (true[None] > moved).float().mean().item()
    return share >= RANK_SHARE, (f"true pose above perturbed in {share:.0%} of {moved.numel()} (subject, level) pairs "
                                 f"at {', '.join(map(str, levels))} rad (needs {RANK_SHARE:.0%})")


def gradient_matches_finite_differences(fn, views, batch, ctx, seed: int, count: int = 2) -> tuple[bool, str]:
    """Autograd against float64 central differences along a random direction and at the three entries of
    largest gradient, on the first `count` subjects (g_skel made float64 too). The renders get noise of
    0.01 first: 8-bit renders tie exactly (the background's three normal channels), where a min or max
    has no derivative; generated views never do."""
    generator = torch.Generator().manual_seed(seed)
    views = views[:count].double()
    views = (views + 0.01 * torch.randn(views.shape, generator=generator, dtype=views.dtype)).requires_grad_(True)
    batch = {k: v[:count].double() if v.is_floating_point() else v[:count] for k, v in batch.items()}
    ctx = dataclasses.replace(ctx, gskel=copy.deepcopy(ctx.gskel).double())
    try:
        (grad,) = torch.autograd.grad(fn(views, batch, ctx)[0].sum(), views)
    except Exception as err:  # a reward tied to float32 (its own network, a dtype)
        return False, (f"float64 views raised {type(err).__name__}: {err}; compute in views.dtype so the check can "
                       "compare in float64")
    if not grad.abs().sum() > 0:
        return False, "the gradient is zero at every pixel of the GT renders: training would not move"
    directions = [torch.randn(views.shape, generator=generator, dtype=views.dtype)]
    for index in grad.abs().flatten().topk(3).indices:
        directions.append(torch.zeros(views.numel(), dtype=views.dtype).index_fill_(0, index, 1).view(views.shape))
    worst = 0.0
    with torch.no_grad():
        for direction in directions:
            plus, minus = (fn(views + sign * FD_STEP * direction, batch, ctx)[0].sum() for sign in (1, -1))
            numeric, analytic = ((plus - minus) / (2 * FD_STEP)).item(), (grad * direction).sum().item()
            worst = max(worst, abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-9))
    return worst <= FD_TOLERANCE, (f"autograd vs finite differences along {len(directions)} directions (a random one, "
                                   f"the 3 largest entries): worst relative gap {worst:.1e} (needs <= {FD_TOLERANCE:g})")


def batched_equals_looped(fn, spec: str, views, batch, ctx) -> tuple[bool, str]:
    """Rewards and parts of all subjects in one call against one call per subject."""
    with torch.no_grad():
        together = fn(views, batch, ctx)
        alone = [check_reward(fn, spec, views[i:i + 1], {k: v[i:i + 1] for k, v in batch.items()}, ctx)
                 for i in range(len(views))]
    gaps = {"rewards": (together[0] - torch.cat([r for r, _ in alone])).abs().max().item()}
    gaps |= {k: (v - torch.cat([p[k] for _, p in alone])).abs().max().item() for k, v in together[1].items()}
    scale = max(together[0].abs().max().item(), 1e-6)
    worst = max(gaps, key=gaps.get)
    return gaps[worst] <= 1e-5 + 1e-4 * scale, (f"{len(views)} subjects in one call vs one at a time: largest gap "
                                                 f"{gaps[worst]:.1e} ({worst})")


def check_reward_command(args: CheckArgs) -> None:
    args.check()
    data_path = args.data or args.run_dir / "data" / "scans" / "val.npz"
    ctx = load_reward_context(args.reward_dir or args.run_dir / "posescore", args.device)
    data = load_view_latents(data_path, keys=("joints", *POSE_KEYS))
    count = min(args.count, len(data["latents"]))
    if count < 2 or data["latents"].shape[-1] != ctx.resolution:
        raise UserError(f"{data_path} holds {count} subjects at {data['latents'].shape[-1]} px; the check needs 2 or "
                        f"more at g_skel's {ctx.resolution} px: pass another --data or --reward-dir")
    views, batch = data["latents"][:count], {k: v[:count] for k, v in data["batch"].items()}
    fn = checked_reward(args.reward, views, batch, ctx)  # a malformed reward: one line, exit status 2
    body = load_body_model(args.run_dir / "body", args.device)
    print(f"check-reward {args.reward}: {count} subjects of {data_path}, GT renders")
    results = {"ranks the true pose higher": ranks_true_pose_higher(
                   fn, views, batch, ctx, body, {k: data[k][:count] for k in POSE_KEYS}, args.levels, args.seed),
               "gradients match finite differences": gradient_matches_finite_differences(fn, views, batch, ctx,
                                                                                         args.seed),
               "batched equals looped": batched_equals_looped(fn, args.reward, views, batch, ctx)}
    for name, (passed, detail) in results.items():
        print(f"{'PASS' if passed else 'FAIL'} {name}: {detail}")
    if not all(passed for passed, _ in results.values()):
        raise SystemExit(1)


# --- main --------------------------------------------------------------------------------------

def train(args: TrainArgs) -> None:
    args, threads = args.resolved(), torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        _train(args)
    finally:
        torch.set_num_threads(threads)  # a caller's (e.g. a test's) setting is its own


def _train(args: TrainArgs) -> None:
    data_dir, folder = args.run_dir / "data", args.out or args.run_dir / "posescore"
    scans = load_view_latents(data_dir / "scans" / "train.npz")
    resolution = scans["latents"].shape[-1]
    latents, joints = scans["latents"], scans["joints_t"]
    negatives = load_negatives(args.negatives, resolution)
    if args.init is not None:  # the starting weights fix the architecture and the line width
        init_gskel, init_config = load_gskel_network(args.init)
        if init_config["resolution"] != resolution:
            raise UserError(f"{args.init} is a {init_config['resolution']} px g_skel but {data_dir / 'scans'} is "
                            f"{resolution} px; pass an --init made for this preset or leave --init out")
        args = dataclasses.replace(args, width=init_config["width"],
                                   channels=tuple(init_gskel.config.block_out_channels))
    if resolution % 2 ** (len(args.channels) - 1):
        raise UserError(f"--channels has {len(args.channels)} levels, too many for {resolution} px views (each level "
                        "halves the size); pass fewer --channels")
    # Everything validation reads is read now, so a missing bench or body stops the stage before training.
    splits = {"val": load_view_latents(data_dir / "scans" / "val.npz", keys=("joints", *POSE_KEYS)),
              "bench": load_view_latents(data_dir / "bench" / "bench.npz", keys=("joints", *POSE_KEYS))}
    for name, split in splits.items():
        if split["latents"].shape[-1] != resolution:
            raise UserError(f"data/{'scans' if name == 'val' else 'bench'} is {split['latents'].shape[-1]} px, "
                            f"data/scans/train.npz {resolution} px; re-run `python prepare_data.py --run-dir {args.run_dir}`")
    body = load_body_model(args.run_dir / "body", args.device)
    if args.train_on in ("broad", "any") and args.steps > 0:
        broad = render_broad(args.run_dir, args.num_broad, resolution, args.seed, args.device, args.train_on == "any")
        latents, joints = torch.cat([latents, broad["latents"]]), torch.cat([joints, broad["joints_t"]])
    print(f"g_skel: {len(latents)} subjects x {NUM_VIEWS} views at {resolution} px, {args.steps} steps")

    with atomic_dir(folder) as tmp:
        start = time.time()
        gskel = train_gskel(latents, joints, args, log_path=tmp / "metrics.jsonl", negatives=negatives)
        train_seconds = time.time() - start
        gskel.save_pretrained(tmp)
        config = dict(stage="posescore", resolution=resolution, width=args.width, train_seconds=round(train_seconds, 1),
                      subjects=len(latents), args=dataclasses.asdict(args), run=provenance(args),
                      versions=dict(torch=torch.__version__, diffusers=diffusers.__version__))
        write_json(tmp / "posescore_config.json", config)
        # --- validation on held-out scans and on the hard-pose bench ---
        ctx = RewardContext(gskel=gskel, resolution=resolution, width=args.width, device=torch.device(args.device))
        results = validate(ctx, splits, body, args, tmp)
        write_json(tmp / "validation.json", dict(results, paper=dict(map_psnr=PAPER_MAP_PSNR, map_ssim=PAPER_MAP_SSIM),
                                                 train_on=args.train_on, perturb_levels_rad=args.perturb_levels,
                                                 train_seconds=round(train_seconds, 1)))
    print(f"trained in {train_seconds:.0f} s; wrote {folder}/")
    for name, r in results.items():
        acc = r["true_vs_perturbed_posescore"]
        print(f"  {name:5s} PSNR {r['map_psnr']:.2f} SSIM {r['map_ssim']:.3f} joint err {r['joint_error_px']:.2f} px"
              f" | PoseScore true>perturbed {acc['accuracy']:.1%}, Spearman {acc['spearman_mean']:.2f}")


def main(args) -> None:
    {TrainArgs: train, ScoreArgs: score, CheckArgs: check_reward_command}[type(args)](args)


Command = Union[Annotated[TrainArgs, tyro.conf.subcommand("train")],
                Annotated[ScoreArgs, tyro.conf.subcommand("score")],
                Annotated[CheckArgs, tyro.conf.subcommand("check-reward")]]

if __name__ == "__main__":
    run_cli(main, Command)
