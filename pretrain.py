"""Stage 3: the base image-to-multi-view (I2MV) diffusion model, PSHuman's stand-in.

    python pretrain.py --preset demo                 # base model on data/scans/ (CPU, ~3 minutes)
    python pretrain.py --preset full                 # 64 px, bigger net (one GPU, ~20 minutes)
    python pretrain.py --resume                      # continue from the newest base_ckpt/step_*/
    python pretrain.py --resume --max-minutes 8      # one job of a chain: stops with a checkpoint in time
    python pretrain.py --init pretrained/demo_base --steps 0   # take a trained model, only evaluate it
    python pretrain.py --init runs/demo/base --train-data runs/demo/data/drpose_gt/train.npz \
        --out runs/demo/ceiling --steps 100 --batch-size 4 --lr 5e-4   # the supervised ceiling (README)
    accelerate launch pretrain.py --preset full      # several GPUs, the same code

In the paper this model is downloaded (PSHuman); it is not part of DrPose. It lives in its own stage so
that finetune.py holds the method alone. What it is (learned from scratch at low resolution): a stock
diffusers `UNet2DConditionModel` that denoises the six views of one person at once.
  - input per view: the noisy view latent (colour + normal, 6 channels) concatenated with the
    conditioning front image (3 channels); which view it is enters as a class embedding;
  - the image also enters as cross-attention tokens: 8 x 8 patches projected by the U-Net's own
    `encoder_hid_proj` (PSHuman uses a CLIP image embedding; ours is learned and lives in the U-Net);
  - self-attention spans all six views of a subject (`MultiViewAttnProcessor`, installed with
    `set_attn_processor`; the diffusers blocks stay stock);
  - v-prediction, DDPM noise for training, DDIM (`sample_views`) for sampling, classifier-free
    guidance with the all-background image as the dropped condition.

Writes, under the run folder: base/ (`unet.save_pretrained` + model_config.json + val_metrics.json
+ sample sheets + metrics.jsonl) and base_ckpt/step_NNNNNN/ checkpoints.

What later stages use: the latent seam (`LatentCodec`, loaded with the model), the sampler
(`sample_views`, `predict`, `guided_output`, `split_v`, `clip_prediction`, `ddim_step`,
`ddim_timesteps`, `device_timesteps`, `alphas_cumprod`), `denoising_error`, `load_model`/`save_model`.
The run scaffold both trainers share (start or resume, end of step, save) is plumbing.TrainingRun.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from diffusers.models.attention_processor import AttnProcessor2_0
from tqdm import tqdm

from plumbing import (SEED_MAX, TrainingRun, UserError, autocast, check_device, check_finite_weights, check_number,
                      check_output, checkpoint_root, contact_sheet, guard_output, jsonable, provenance, read_json,
                      read_manifest, run_cli, step_rows, with_preset, write_json)
from prepare_data import NUM_VIEWS, VIEW_AZIMUTHS, from_uint8, latents_to_views, load_split, to_uint8, views_to_latents
from posescore import warmup_cosine


@dataclass
class Args:
    """Train the image-to-multi-view diffusion model on data/scans/ and save it as base/."""

    preset: Literal["demo", "full"] = "demo"
    """demo: small net, CPU minutes; full: bigger net, one GPU (fields left unset take the preset's value)"""
    run_dir: Path = Path("runs/demo")
    """the run folder: reads data/scans/ and data/bench/, writes base/ and base_ckpt/"""
    steps: int | None = None
    """optimizer steps (demo 300, full 4000)"""
    batch_size: int | None = None
    """subjects per step and device, each with all six views (demo 6, full 16)"""
    lr: float | None = None
    """peak AdamW learning rate; linear warmup, then cosine decay to zero (demo 2e-3, full 4e-4)"""
    warmup_steps: int = 50
    """learning-rate warmup steps"""
    cond_drop: float = 0.1
    """probability of replacing the input image by the all-background image (for guidance)"""
    grad_clip: float = 1.0
    """gradient norm clip"""
    channels: tuple[int, ...] | None = None
    """U-Net widths per resolution level (demo 32 64 96, full 64 128 192 256)"""
    layers_per_block: int | None = None
    """resnet (+ transformer) layers per level (demo 1, full 2)"""
    attn_levels: int | None = None
    """how many of the deepest levels have (multi-view) attention; the middle block always has (demo 1, full 3)"""
    heads: int = 4
    """attention heads in every transformer block"""
    token_dim: int | None = None
    """width of the image tokens the U-Net cross-attends to (demo 64, full 256)"""
    codec: str = "pixel"
    """the latent codec the U-Net denoises in (a name in CODECS; pixel: the views themselves); with
    --init the model brings its own"""
    train_data: Path | None = None
    """six-view training subjects (default: <run-dir>/data/scans/train.npz). The supervised ceiling
    trains the base further on <run-dir>/data/drpose_gt/train.npz: the DrPose poses' six-view renders"""
    replay_data: Path | None = None
    """six-view subjects mixed into every batch (e.g. <run-dir>/data/scans/train.npz for the ceiling, so it
    does not forget the scans while it learns the DrPose poses); off by default"""
    replay_share: float = 0.0
    """share of each batch drawn from --replay-data (rounded to whole subjects)"""
    ema_decay: float = 0.0
    """exponential moving average of the weights (diffusers EMAModel); the saved model is the average.
    0 = off; e.g. 0.999 for thousands of steps, 0.99 for a few hundred"""
    out: Path | None = None
    """where the model goes (default: <run-dir>/base); checkpoints go to <out>_ckpt/"""
    init: Path | None = None
    """start from the weights of this model folder (any base/-like folder) instead of random init"""
    resume: bool = False
    """continue from the newest complete base_ckpt/step_*/ folder"""
    max_minutes: float | None = None
    """wall-clock budget of this job: stop with a checkpoint before it runs out; --resume continues"""
    checkpoint_every: int | None = None
    """steps between checkpoints (demo 150, full 1000)"""
    keep_checkpoints: int = 2
    """how many newest checkpoints to keep"""
    log_every: int = 25
    """steps between log lines (tqdm postfix + metrics.jsonl)"""
    val_every: int = 100
    """steps between validation losses (fixed noise on val.npz)"""
    ddim_steps: int | None = None
    """DDIM steps for the final PSNR numbers; stored as the model's default (demo 10, full 20)"""
    guidance: float | None = None
    """classifier-free guidance for the final evaluation; stored as the model's default (demo 1.0:
    measured as good as 1.5 here and half the compute; full 1.5)"""
    num_eval: int | None = None
    """val and bench subjects scored at the end, each (demo 8, full 200); 0 skips the evaluation"""
    sheet_subjects: int = 6
    """subjects per contact sheet"""
    seed: int = 0
    """seeds model init, data order, noise and evaluation noise"""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda; bf16 autocast on cuda"""

    def resolved(self) -> "Args":
        """The preset's values for every field left unset (an explicit flag always wins), checked."""
        table = PRESETS[self.preset]
        return with_preset(self, table).check()

    @property
    def outputs(self) -> tuple[Path, ...]:
        """The model folder this stage writes (and replaces when re-run); checkpoints go next to it."""
        return (self.out or self.run_dir / "base",)

    def check(self) -> "Args":
        """Every flag, before any work (one line and exit status 2 for the first bad one)."""
        check_number(self, "steps", 0, high=MAX_STEPS)
        if self.steps == 0 and self.init is None:
            raise UserError("--steps 0 trains nothing and would replace base/ with an untrained model; pass "
                            "--steps N >= 1, or --init FOLDER to only evaluate a given model")
        check_number(self, "batch_size", 1, high=MAX_BATCH)
        check_number(self, "warmup_steps", 1, high=MAX_STEPS)
        for name in ("checkpoint_every", "log_every", "val_every"):
            check_number(self, name, 1)
        check_number(self, "keep_checkpoints", 1, high=1000)
        check_number(self, "ddim_steps", 1, high=SCHEDULER["num_train_timesteps"])
        check_number(self, "sheet_subjects", 1, high=100)
        check_number(self, "layers_per_block", 1, high=8)
        check_number(self, "heads", 1, high=64)
        check_number(self, "token_dim", 1, high=MAX_CHANNELS)
        check_number(self, "num_eval", 0, high=MAX_EVAL)
        check_number(self, "seed", 0, high=SEED_MAX)
        check_number(self, "guidance", 0, high=MAX_GUIDANCE)
        check_number(self, "lr", 0, above=True, high=1)
        check_number(self, "grad_clip", 0, above=True, high=1e6)
        check_number(self, "cond_drop", 0, high=1)
        check_number(self, "max_minutes", 0, above=True, high=1e6,
                     fix="pass the job's wall-clock budget in minutes, > 0, or leave --max-minutes out")
        check_number(self, "replay_share", 0, high=1)
        check_number(self, "ema_decay", 0, high=0.99999)
        if (self.replay_data is None) != (self.replay_share == 0):
            raise UserError("--replay-data and --replay-share go together: pass both (e.g. --replay-data "
                            "runs/demo/data/scans/train.npz --replay-share 0.5) or neither")
        if self.init is None:  # the architecture flags (with --init the model brings its own)
            if not self.channels or len(self.channels) > MAX_LEVELS or any(c > MAX_CHANNELS for c in self.channels):
                raise UserError(f"--channels {' '.join(map(str, self.channels or ()))}: pass 1 to {MAX_LEVELS} widths, "
                                f"each <= {MAX_CHANNELS}, e.g. --channels 32 64 96")
            check_number(self, "attn_levels", 0, high=len(self.channels),
                         fix=f"pass --attn-levels between 0 and the {len(self.channels)} levels of --channels")
            attended = self.channels[len(self.channels) - self.attn_levels:] + self.channels[-1:]
            if any(c < 1 or c % self.heads for c in attended):
                raise UserError(f"--channels {' '.join(map(str, self.channels))} with --heads {self.heads}: every "
                                "level with attention needs a width divisible by the heads; change either")
            if self.codec not in CODECS:
                raise UserError(f"--codec {self.codec} is not in pretrain.CODECS {sorted(CODECS)}; pass one of them")
        elif not self.init.is_dir():
            raise UserError(f"--init {self.init} is not a folder; pass a model folder (base/, pretrained/demo_base)")
        check_device(self.device, allow_auto=True)
        check_output(self.run_dir, "--run-dir")
        guard_output(self.outputs[0], "--out", "pretrain")
        guard_output(checkpoint_root(self.outputs[0]), "--out", "pretrain", whole=False)
        return self


# Upper bounds that keep a run within one machine's memory (the full preset is far below each).
MAX_STEPS = 1_000_000
MAX_BATCH = 1024  # subjects, six views each
MAX_CHANNELS, MAX_LEVELS = 2048, 6
MAX_EVAL = 100_000
MAX_GUIDANCE = 50.0

PRESETS = {
    # demo: ~0.4 s/step on 2 idle cores, so 300 steps + a 16-subject evaluation fit in 3 minutes.
    "demo": dict(steps=300, batch_size=6, lr=2e-3, channels=(32, 64, 96), layers_per_block=1, attn_levels=1,
                 token_dim=64, checkpoint_every=150, num_eval=8, ddim_steps=10, guidance=1.0),
    "full": dict(steps=4000, batch_size=16, lr=4e-4, channels=(64, 128, 192, 256), layers_per_block=2,
                 attn_levels=3, token_dim=256, checkpoint_every=1000, num_eval=200, ddim_steps=20, guidance=1.5),
}


IMAGE_CHANNELS = 3  # the conditioning front image
TOKEN_GRID = 8  # the input image becomes 8 x 8 patch tokens at any resolution
POS_FREQS = 4  # sin/cos frequencies per axis appended to each patch (tokens need a position)
POS_DIM = 4 * POS_FREQS
# Cosine schedule: at 32-64 px in pixel space a linear schedule wastes most steps on near-clean
# images; the cosine one (Nichol & Dhariwal) also ends at almost zero SNR, so sampling from pure
# noise at t = T matches training.
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


# --- the latent seam: what the U-Net denoises ------------------------------------------------------
# The U-Net denoises latents; rewards, sheets and reconstruction read views. The codec turns one into
# the other and says what the latents are (channels, size, the range x0 is clipped to). It is loaded with
# the model (model_config.json `codec`), and every caller goes through it: training batches, the
# sampler's noise, clipping and decoding, DrPose's chain and realism penalty, reconstruction. The
# embedded default runs on the views themselves. A latent-diffusion fork (PSHuman: SD 2.1's VAE)
# subclasses LatentCodec, registers it in CODECS and trains a base with --codec NAME.

class LatentCodec(torch.nn.Module):
    """Views (..., 6, H, W) in [-1, 1] <-> latents (..., channels, H / downsample, W / downsample).
    This one is pixel space: identity, 6 channels (colour RGB + normal XYZ, prepare_data.views_to_latents),
    full resolution, x0 clipped to the data range [-1, 1]. A module, so a codec with weights moves with
    the model; its weights never train."""

    name = "pixel"
    channels = 6
    downsample = 1
    clip_range: tuple[float, float] | None = (-1.0, 1.0)  # x0 clamp while sampling; None: no clamp (SD latents)

    def encode(self, views: torch.Tensor) -> torch.Tensor:
        return views

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def latent_shape(self, batch: int, resolution: int, num_views: int = NUM_VIEWS) -> tuple[int, ...]:
        """(B, V, C, h, w): the shape of the noise the sampler starts from."""
        size = resolution // self.downsample
        return (batch, num_views, self.channels, size, size)

    def config(self) -> dict:
        """What model_config.json stores under `codec`; `load_codec` rebuilds the codec from it."""
        return {"name": self.name}


CODECS = {"pixel": LatentCodec}  # name -> factory(**model_config.json's codec entry but the name)


def load_codec(config: dict) -> LatentCodec:
    """The codec of a model config (pixel space when the config names none)."""
    spec = dict(config.get("codec") or {"name": "pixel"})
    name = spec.pop("name", "pixel")
    if name not in CODECS:
        raise UserError(f"the model's codec {name!r} is not in pretrain.CODECS {sorted(CODECS)}; register it "
                        "(pretrain.CODECS[name] = factory) before loading the model")
    return CODECS[name](**spec).requires_grad_(False).eval()


# --- the model: stock U-Net + a multi-view self-attention processor -------------------------------

class MultiViewAttnProcessor:
    """Self-attention over all views of one subject: tokens (B*V, N, C) attend as (B, V*N, C).

    This is the only change to the stock U-Net (PSHuman/Era3D do the same with their "multi-view
    attention"). Everything but the token reshaping is diffusers' own `AttnProcessor2_0`, so peft
    LoRA on to_q/to_k/to_v/to_out still applies."""

    def __init__(self, num_views: int = NUM_VIEWS):
        self.num_views = num_views
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("MultiViewAttnProcessor is for unmasked self-attention on (B*V, N, C) tokens")
        bv, n, c = hidden_states.shape  # (B*V, N, C)
        joint = hidden_states.reshape(bv // self.num_views, self.num_views * n, c)  # (B, V*N, C)
        out = self.inner(attn, joint, None, None, temb)
        return out.reshape(bv, n, c)  # (B*V, N, C)


class RowWiseMultiViewAttnProcessor(MultiViewAttnProcessor):
    """Self-attention across views along image rows (Era3D's row-wise attention, which PSHuman uses at its size):
    the cameras circle the subject at one elevation, so row r of one view sees the same height band as row r of
    every other view, and a token attends to its row in all views: tokens (B*V, h*w, C) attend as (B*h, V*w, C).
    Each token attends to V*w tokens instead of V*h*w, which is what makes multi-view attention fit at 96 x 96
    latents. Square token grids only."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("RowWiseMultiViewAttnProcessor is for unmasked self-attention on (B*V, N, C) tokens")
        bv, n, c = hidden_states.shape  # (B*V, N, C)
        side, views = math.isqrt(n), self.num_views
        if side * side != n:
            raise ValueError(f"RowWiseMultiViewAttnProcessor needs a square token grid, got {n} tokens")
        rows = hidden_states.reshape(bv // views, views, side, side, c).transpose(1, 2)  # (B, h, V, w, C)
        out = self.inner(attn, rows.reshape(-1, views * side, c), None, None, temb)  # (B*h, V*w, C)
        return out.reshape(bv // views, side, views, side, c).transpose(1, 2).reshape(bv, n, c)  # (B*V, N, C)


def set_view_attention(unet, num_views: int = NUM_VIEWS, multi_view: bool = True, row_wise: bool = False):
    """Install the multi-view processor on every self-attention (attn1); cross-attention (attn2)
    keeps the stock one. multi_view=False gives each view its own attention (for tests/ablation);
    row_wise=True attends across views along rows only (RowWiseMultiViewAttnProcessor), for large latents."""
    kind = RowWiseMultiViewAttnProcessor if row_wise else MultiViewAttnProcessor
    processors = {name: (kind(num_views) if multi_view and name.endswith("attn1.processor")
                         else AttnProcessor2_0()) for name in unet.attn_processors}
    unet.set_attn_processor(processors)
    return unet


def unet_config(resolution: int, channels, layers_per_block: int, attn_levels: int, heads: int,
                token_dim: int, num_views: int = NUM_VIEWS, codec: LatentCodec | None = None) -> dict:
    """The diffusers config of our U-Net on `codec`'s latents (default: pixel space) of `resolution` px
    views. Attention only at the deepest `attn_levels` levels: at full resolution six views of H*W
    tokens would make self-attention the whole cost."""
    codec = LatentCodec() if codec is None else codec
    levels = len(channels)
    patch = resolution // TOKEN_GRID
    has_attn = [i >= levels - attn_levels for i in range(levels)]
    groups = math.gcd(*channels, 32)  # GroupNorm groups must divide every width
    return dict(
        sample_size=resolution // codec.downsample,
        in_channels=codec.channels + IMAGE_CHANNELS,
        out_channels=codec.channels,
        block_out_channels=tuple(channels),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=layers_per_block,
        norm_num_groups=groups,
        attention_head_dim=heads,  # diffusers' legacy name: this is the number of heads
        cross_attention_dim=token_dim,
        encoder_hid_dim=IMAGE_CHANNELS * patch * patch + POS_DIM,
        encoder_hid_dim_type="text_proj",
        num_class_embeds=num_views,  # view identity, added to the time embedding
    )


def build_unet(config: dict, num_views: int = NUM_VIEWS):
    return set_view_attention(UNet2DConditionModel(**config), num_views)


def image_tokens(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) image in [-1, 1] -> (B, 64, 3*p*p + POS_DIM) patch tokens with a fixed
    sin/cos position, so cross-attention knows where each patch is. No parameters: the learned
    projection is the U-Net's encoder_hid_proj."""
    b, _, h, w = image.shape
    patch = h // TOKEN_GRID
    patches = F.unfold(image, kernel_size=patch, stride=patch).transpose(1, 2)  # (B, 64, 3*p*p)
    pos = token_positions(image.device, image.dtype)  # (64, POS_DIM)
    return torch.cat([patches, pos.expand(b, -1, -1)], dim=2)


@functools.lru_cache(maxsize=None)
def token_positions(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(64, POS_DIM) the patches' sin/cos positions, computed on the CPU (the same numbers on every
    device) and copied once per device: a U-Net call replayed from a CUDA graph holds no host copy."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, TOKEN_GRID), torch.linspace(-1, 1, TOKEN_GRID), indexing="ij")
    freqs = math.pi * 2.0 ** torch.arange(POS_FREQS)  # (F,)
    angles = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=1)  # (64, 2F)
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(device, dtype)


def model_output(unet, x_t: torch.Tensor, t: torch.Tensor, cond_image: torch.Tensor) -> torch.Tensor:
    """One U-Net call on all views: latents x_t (B, V, C, h, w), t (B,) long, cond_image (B, 3, H, W)
    in [0, 1] -> v-prediction (B, V, C, h, w). Uses only `unet(...)`, so a DDP/peft wrapper works."""
    b, v, c, h, w = x_t.shape
    image = cond_image * 2 - 1
    # The image joins every view on the latent grid (area-resized where the codec downsamples).
    grid = image if image.shape[-2:] == (h, w) else F.interpolate(image, size=(h, w), mode="area")
    z_image = grid[:, None].expand(b, v, -1, h, w)  # (B, V, 3, h, w)
    sample = torch.cat([x_t, z_image.to(x_t.dtype)], dim=2).reshape(b * v, c + IMAGE_CHANNELS, h, w)
    tokens = image_tokens(image).repeat_interleave(v, dim=0)  # (B*V, 64, D)
    views = torch.arange(v, device=x_t.device).repeat(b)  # (B*V,) view index = class label
    out = unet(sample, t.repeat_interleave(v), encoder_hidden_states=tokens, class_labels=views).sample
    return out.reshape(b, v, c, h, w)


# --- one denoising step: predict, then a DDIM update ---------------------------------------------
# DrPose's loop calls these same two functions with its own gradient control (detached inputs,
# K steps in the graph, early stop taking x0 directly), so sampling is written exactly once.

class Prediction(NamedTuple):
    out: torch.Tensor  # (B, V, C, h, w) the (guided) model output, v
    x0: torch.Tensor  # (B, V, C, h, w) predicted clean latents
    eps: torch.Tensor  # (B, V, C, h, w) predicted noise


def alphas_cumprod(config: dict | None = None) -> torch.Tensor:
    """(T,) float64 cumulative alphas of the training noise schedule (ours, or a model's config)."""
    scheduler_config = (config or {}).get("scheduler", SCHEDULER)
    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.double()


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Descending DDIM timesteps with "trailing" spacing, so the first step is t = T - 1 (pure noise)."""
    return [int(t) for t in np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1]


def guided_output(unet, x_t: torch.Tensor, t: torch.Tensor | int, cond_image: torch.Tensor,
                  guidance: float) -> torch.Tensor:
    """The guided model output v at x_t (B, V, C, h, w), timestep t, image (B, 3, H, W) in [0, 1].
    Guidance g: v = v_uncond + g * (v_cond - v_uncond), with the all-background image as the
    dropped condition; g = 1 is exactly the conditional prediction (no unconditional pass)."""
    b = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device).long().expand(b)  # (B,)
    if guidance == 1:
        return model_output(unet, x_t, t, cond_image)
    null = torch.ones_like(cond_image)  # the dropped condition: all background (white)
    both = model_output(unet, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond_image, null]))
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


def split_v(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, alphas: torch.Tensor) -> Prediction:
    """x0 and eps from a v-prediction at x_t: v = sqrt(a) eps - sqrt(1-a) x0. Differentiable in
    both, so the DDIM arithmetic can stay in the graph when the U-Net call does not."""
    a = alphas.to(x_t.device)[torch.as_tensor(t, device=x_t.device).long()].to(x_t.dtype)
    x0 = a.sqrt() * x_t - (1 - a).sqrt() * out
    eps = a.sqrt() * out + (1 - a).sqrt() * x_t
    return Prediction(out, x0, eps)


def predict(unet, x_t: torch.Tensor, t: torch.Tensor | int, cond_image: torch.Tensor, guidance: float,
            alphas: torch.Tensor) -> Prediction:
    """One guided prediction (v, x0, eps) at x_t; see `guided_output` and `split_v`."""
    return split_v(guided_output(unet, x_t, t, cond_image, guidance), x_t, t, alphas)


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_prev: torch.Tensor | float) -> torch.Tensor:
    """Deterministic DDIM update (eta = 0) to the previous timestep's x. Differentiable."""
    alpha_prev = torch.as_tensor(alpha_prev, dtype=x0.dtype, device=x0.device)
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


def clip_prediction(pred: Prediction, x_t: torch.Tensor, t, alphas: torch.Tensor,
                    clip_range: tuple[float, float] | None = (-1.0, 1.0)) -> Prediction:
    """Clamp x0 to the codec's `clip_range` and recompute eps to match (diffusers' clip_sample);
    no clamp for None."""
    if clip_range is None:
        return pred
    a = alphas.to(x_t.device)[torch.as_tensor(t, device=x_t.device).long()].to(x_t.dtype)
    a = a.view(-1, 1, 1, 1, 1) if a.ndim else a  # per-sample t (B,) or one shared t
    x0 = pred.x0.clamp(*clip_range)
    return Prediction(pred.out, x0, (x_t - a.sqrt() * x0) / (1 - a).sqrt())


@torch.no_grad()
def sample_views(unet, cond_image: torch.Tensor, num_steps: int = 20, guidance: float = 1.5,
                 generator: torch.Generator | None = None, *, alphas: torch.Tensor | None = None,
                 codec: LatentCodec | None = None, noise: torch.Tensor | None = None, clip: bool = True,
                 num_views: int = NUM_VIEWS, progress: bool = False) -> torch.Tensor:
    """Six views from one image: cond_image (B, 3, H, W) in [0, 1] -> (B, V, 6, H, W) in [-1, 1].

    DDIM with `num_steps` steps and classifier-free `guidance`. All randomness is the starting
    noise, drawn from `generator` (or passed as `noise`), so a fixed generator gives fixed views and
    the caller's global RNG is untouched. `alphas` and `codec`: the model's (`load_model`; default:
    ours, pixel space)."""
    alphas = alphas_cumprod() if alphas is None else alphas
    codec = LatentCodec() if codec is None else codec
    if noise is None:
        gen_device = generator.device if generator is not None else "cpu"
        shape = codec.latent_shape(cond_image.shape[0], cond_image.shape[-1], num_views)
        noise = torch.randn(shape, generator=generator, device=gen_device)
    x = noise.to(cond_image.device, cond_image.dtype)  # (B, V, C, h, w)
    steps = ddim_timesteps(num_steps, len(alphas))
    for i, t in enumerate(tqdm(steps, desc="sampling", leave=False, disable=None if progress else True)):
        pred = predict(unet, x, t, cond_image, guidance, alphas)
        if clip:
            pred = clip_prediction(pred, x, t, alphas, codec.clip_range)
        alpha_prev = alphas[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0, dtype=alphas.dtype)
        x = ddim_step(pred.x0.float(), pred.eps.float(), alpha_prev.float())
    return codec.decode(x).clamp(-1, 1)


@functools.lru_cache(maxsize=None)
def device_timesteps(num_steps: int, num_train_timesteps: int, device: torch.device) -> torch.Tensor:
    """`ddim_timesteps` as a (T,) long tensor on `device`, copied there once: a chain that takes
    `steps[i:i + 1]` hands the U-Net and the schedule each timestep without a host-to-device copy
    (and a CUDA graph of the call sees a tensor input, plumbing.GraphedCall)."""
    return torch.tensor(ddim_timesteps(num_steps, num_train_timesteps)).to(device)


# --- loading and saving models --------------------------------------------------------------------

CONFIG_NAME = "model_config.json"


class Model(NamedTuple):
    """A model folder loaded: what sampling from it needs besides the image."""
    unet: UNet2DConditionModel  # eval mode, multi-view attention installed
    codec: LatentCodec  # the latent seam it denoises in
    alphas: torch.Tensor  # (T,) its noise schedule's cumulative alphas (float64, on its device)
    config: dict  # model_config.json


def load_model(folder: Path, device="cpu") -> Model:
    """A model folder (base/, drpose/, ceiling/, or any folder written the same way) -> Model.

    The weights are a plain diffusers folder (`UNet2DConditionModel.from_pretrained(folder)` loads
    them); the multi-view attention processor is code, not weights, so it is installed here."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    stage = "finetune.py" if folder.name.startswith("drpose") else "pretrain.py"
    made_by = f"python {stage} --run-dir {folder.parent}"
    if not config_path.exists() or not (folder / "config.json").exists():
        raise UserError(f"{folder} is not a model folder (no {CONFIG_NAME} or config.json); "
                        f"make one with `{made_by}`")
    config = read_json(config_path, made_by)
    if not isinstance(config.get("resolution"), int) or config["resolution"] % TOKEN_GRID:
        raise UserError(f"{config_path} lacks a valid resolution ({config.get('resolution')}); re-run `{made_by}`")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder)
    except Exception as err:  # truncated weights, a foreign config.json, missing files: all one thing to a user
        raise UserError(f"{folder}: cannot load the model weights ({type(err).__name__}); re-run `{made_by}`") from None
    codec = load_codec(config)
    if config.get("num_views") != NUM_VIEWS or unet.config.in_channels != codec.channels + IMAGE_CHANNELS:
        raise UserError(f"{folder} was made for {config.get('num_views')} views / {unet.config.in_channels} "
                        f"input channels, its codec and this code give {NUM_VIEWS} / {codec.channels + IMAGE_CHANNELS}")
    check_finite_weights(unet.state_dict().items(), folder, f"re-run `{made_by}` or pass another model")
    set_view_attention(unet, config["num_views"])
    return Model(unet.to(device).eval(), codec.to(device), alphas_cumprod(config).to(device), config)


def weights_sha256(folder: Path) -> str:
    """sha256 of a model folder's weights file: what a resume compares, wherever the folder is."""
    digest = hashlib.sha256()
    with open(Path(folder) / "diffusion_pytorch_model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(folder: Path, unet, config: dict) -> None:
    """Write `unet.save_pretrained(folder)` and our config next to it (folder may be a tmp dir)."""
    unet.save_pretrained(folder, safe_serialization=True)
    write_json(Path(folder) / CONFIG_NAME, config)


def model_record(resolution: int, codec: LatentCodec, args: Args, step: int) -> dict:
    """What model_config.json says about a model besides the U-Net's own config."""
    return dict(
        stage="pretrain", run=provenance(args),
        format="drpose-i2mv", resolution=resolution, num_views=NUM_VIEWS, view_azimuths=list(VIEW_AZIMUTHS),
        codec=codec.config(), latent_channels=codec.channels, latent_downsample=codec.downsample,
        latent_layout="views: cat(colour RGB, normal XYZ) * 2 - 1, normal stored as (n+1)/2 in camera space; "
                      "latents: codec.encode(views)",
        condition="front colour image in [0,1]: channel concat to every view + 8x8 patch tokens via "
                  "encoder_hid_proj; dropped condition = all-white image",
        prediction_type=SCHEDULER["prediction_type"], scheduler=SCHEDULER, token_grid=TOKEN_GRID,
        sampling=dict(sampler="ddim", num_steps=args.ddim_steps, guidance=args.guidance),
        step=step, train_args=jsonable(dataclasses.asdict(args)),
        versions=dict(torch=torch.__version__, diffusers=diffusers.__version__),
    )


# --- data -----------------------------------------------------------------------------------------

def load_multiview(path: Path, run_dir: Path, image_key: str | None = None) -> dict:
    """An npz with six-view GT -> dict(image (N,3,H,W) u8, color, normal (N,V,3,H,W) u8), checked
    against its manifest. The input image is the front colour view unless the file has `image_key`."""
    made_by = f"python prepare_data.py --run-dir {run_dir}"
    arrays = load_split(path, expect_keys=("color", "normal") + ((image_key,) if image_key else ()), made_by=made_by)
    manifest = read_manifest(Path(path).parent, made_by)
    views = tuple(manifest.get("views", ()))
    if views != VIEW_AZIMUTHS:
        raise UserError(f"{Path(path).parent}/manifest.json has views {list(views)}, this code uses "
                        f"{list(VIEW_AZIMUTHS)}; re-run `{made_by}`")
    color, normal = arrays["color"], arrays["normal"]  # (N, V, 3, H, W) u8
    if color.shape[1:3] != (NUM_VIEWS, 3) or color.shape != normal.shape or color.shape[-1] != manifest.get("resolution"):
        raise UserError(f"{path}: colour/normal shapes {color.shape}/{normal.shape} do not match six views at "
                        f"{manifest.get('resolution')} px; re-run `{made_by}`")
    image = arrays[image_key] if image_key else color[:, 0]
    return dict(image=torch.from_numpy(image), color=torch.from_numpy(color), normal=torch.from_numpy(normal),
                resolution=int(manifest["resolution"]))


def batch_latents(data: dict, idx: torch.Tensor, device, codec: LatentCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """-> latents (B, V, C, h, w) (the views encoded by the codec) and image (B, 3, H, W) in [0, 1]."""
    color, normal = from_uint8(data["color"][idx].numpy(), device), from_uint8(data["normal"][idx].numpy(), device)
    with torch.no_grad():
        latents = codec.encode(views_to_latents(color, normal))
    return latents, from_uint8(data["image"][idx].numpy(), device)


# --- training -------------------------------------------------------------------------------------

def diffusion_loss(unet, views: torch.Tensor, image: torch.Tensor, alphas: torch.Tensor,
                   cond_drop: float, generator: torch.Generator) -> torch.Tensor:
    """Standard v-prediction loss on latents `views` (B, V, C, h, w) given image (B, 3, H, W) in [0, 1].
    One timestep per subject (all its views share it, as they are denoised together)."""
    b, device = views.shape[0], views.device
    t = torch.randint(0, len(alphas), (b,), generator=generator)
    noise = torch.randn(views.shape, generator=generator)
    drop = torch.rand(b, generator=generator) < cond_drop
    t, noise, drop = t.to(device), noise.to(device), drop.to(device)
    a = alphas.to(device)[t].float().view(b, 1, 1, 1, 1)
    x_t = a.sqrt() * views + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * views  # v
    image = torch.where(drop.view(b, 1, 1, 1), torch.ones_like(image), image)  # dropped = all background
    return F.mse_loss(model_output(unet, x_t, t, image).float(), target)


def denoising_error(unet, latents: torch.Tensor, image: torch.Tensor, alphas: torch.Tensor,
                    t_range: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """How unlikely the model finds latents (B, V, C, h, w) given image (B, 3, H, W) in [0, 1]: re-noise
    them at t ~ U{t_range} and return the v-prediction's squared error per subject (B,). Differentiable
    in the latents (DrPose's realism penalty, the reward probe's ascent)."""
    b, device = latents.shape[0], latents.device
    t = torch.randint(t_range[0], t_range[1] + 1, (b,), generator=generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    a = alphas.to(device)[t].to(latents.dtype).view(b, 1, 1, 1, 1)
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * latents  # v
    return (model_output(unet, x_t, t, image).float() - target.float()).pow(2).flatten(1).mean(1)


@torch.no_grad()
def validation_loss(unet, val: dict, alphas: torch.Tensor, device, seed: int, codec: LatentCodec,
                    limit: int = 16) -> float:
    """The loss on up to `limit` val subjects with fixed noise and timesteps (comparable over steps)."""
    idx = torch.arange(min(limit, len(val["image"])))
    latents, image = batch_latents(val, idx, device, codec)
    return diffusion_loss(unet, latents, image, alphas, 0.0, torch.Generator().manual_seed(seed + 1)).item()


def train_base(args: Args, hook: Callable[[int], None] | None = None) -> Path:
    """Train (or resume), evaluate and write base/ (or --out). Returns that folder. `hook(step)` runs after
    every step and its checkpoint (tests use it to kill a run). Stopped by --max-minutes: returns the
    checkpoint folder, the model folder is not written."""
    args = args.resolved()
    run_dir = Path(args.run_dir)
    run = TrainingRun("pretrain", args.out or run_dir / "base", args, hook)  # refuses an empty --resume first
    device, world = run.device, run.world

    # --- data: scan-like training subjects; val for the validation loss and the final numbers ---
    train_path = args.train_data or run_dir / "data/scans/train.npz"
    train = load_multiview(train_path, run_dir)
    replay = load_multiview(args.replay_data, run_dir) if args.replay_data is not None else None
    num_replay = round(args.batch_size * args.replay_share) if replay is not None else 0
    val = load_multiview(run_dir / "data/scans/val.npz", run_dir)
    if args.num_eval > 0 and (run_dir / "data/bench/bench.npz").exists():  # refuse a bad bench before training
        load_multiview(run_dir / "data/bench/bench.npz", run_dir, image_key="image")
    resolution = train["resolution"]
    if resolution % TOKEN_GRID or resolution // TOKEN_GRID < 1:
        raise UserError(f"resolution {resolution} must be a multiple of {TOKEN_GRID}")
    if len(train["image"]) < args.batch_size * world:
        raise UserError(f"{train_path} has {len(train['image'])} subjects, fewer than "
                        f"--batch-size x devices = {args.batch_size * world}")

    # --- model and optimizer ---
    torch.manual_seed(args.seed)  # model init is the only user of the global RNG
    if args.init is not None:
        unet, codec, _, init_config = load_model(args.init)
        if init_config["resolution"] != resolution:
            raise UserError(f"{args.init} is a {init_config['resolution']} px model, the data is {resolution} px")
        unet.train()
    else:
        codec = load_codec({"codec": {"name": args.codec}})
        if resolution % codec.downsample:
            raise UserError(f"--codec {args.codec} downsamples by {codec.downsample}, the data is {resolution} px")
        unet = build_unet(unet_config(resolution, args.channels, args.layers_per_block, args.attn_levels,
                                      args.heads, args.token_dim, codec=codec))
    unet.to(device)
    codec.to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=args.ema_decay) if args.ema_decay > 0 else None
    alphas = alphas_cumprod()
    # What must match to resume: the network, the data size, the data order and the devices.
    expect = dict(resolution=resolution, world=world, ema_decay=args.ema_decay, replay_share=args.replay_share,
                  data=dict(seed=args.seed, batch_size=args.batch_size, subjects=len(train["image"])))
    record = dict(model_record(resolution, codec, args, args.steps),
                  trained_on=dict(device=device.type, processes=world))  # what evaluate labels a model with
    generator = torch.Generator().manual_seed(args.seed * 1000 + run.rank)  # noise, t, dropout
    unet, optimizer, step = run.start(unet, optimizer, list(unet.parameters()), generator,
                                      lambda s: warmup_cosine(s, args.steps, args.lr, args.warmup_steps),
                                      expect, record, postfix=("loss", "val_loss"),
                                      extras=dict(ema=ema) if ema is not None else None)

    # --- train ---
    unet.train()
    while step < args.steps:
        row = step_rows(step, len(train["image"]), args.batch_size - num_replay, world, run.rank, args.seed)
        latents, image = batch_latents(train, row, device, codec)  # (B, V, C, h, w), (B, 3, H, W)
        if num_replay:  # the replayed subjects follow their own fixed order (seed + 1)
            latents_r, image_r = batch_latents(replay, step_rows(step, len(replay["image"]), num_replay, world,
                                                                 run.rank, args.seed + 1), device, codec)
            latents, image = torch.cat([latents, latents_r]), torch.cat([image, image_r])
        loss = diffusion_loss(unet, latents, image, alphas, args.cond_drop, generator)
        grad_norm = run.optimise(loss)
        if ema is not None:
            ema.step(unet.parameters())
        step += 1
        if run.end_of_step(step, lambda: dict(loss=round(loss.item(), 5), grad_norm=round(float(grad_norm), 4),
                                              **validation_line(run, step, args, val, alphas, codec))):
            break

    # --- evaluate and write base/ ---
    def save(folder: Path) -> None:
        model = run.accelerator.unwrap_model(unet).eval()
        if ema is not None:  # the model that is saved and evaluated is the average
            ema.copy_to(model.parameters())
        save_model(folder, model, record)
        if args.num_eval > 0:
            with autocast(device):
                results = evaluate_base(model, val, run_dir, args, device, alphas, codec, folder)
            write_json(folder / "val_metrics.json", results)
            print(f"PSNR (dB), DDIM {results['num_steps']} steps, guidance {results['guidance']}:")
            for name in ("val", "bench"):
                r = results[name]
                print(f"  {name:5s} " + (f"n={r['count']:3d}  colour {r['psnr_color']:6.2f}  normal "
                                         f"{r['psnr_normal']:6.2f}" if isinstance(r, dict) else r))
    return run.finish(step, save)


def validation_line(run: TrainingRun, step: int, args: Args, val: dict, alphas, codec) -> dict:
    """The validation loss every --val-every steps (and at the end), for the log line."""
    if step % args.val_every and step != args.steps:
        return {}
    model = run.accelerator.unwrap_model(run.model).eval()
    loss = validation_loss(model, val, alphas, run.device, args.seed, codec)
    model.train()
    return dict(val_loss=round(loss, 5))


# --- evaluation: PSNR against GT renders, contact sheets -------------------------------------------

def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, ...) images in [0, 1] -> (B,) PSNR in dB, one MSE over all pixels of each subject (in float64,
    capped at 100 dB so json never holds Infinity)."""
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


@torch.no_grad()
def generate(unet, data: dict, count: int, args: Args, device, alphas, codec: LatentCodec,
             chunk: int = 8) -> torch.Tensor:
    """Views (count, V, 6, H, W) for the first `count` subjects; noise from its own generator so
    every model sees the same noise and the training RNG is untouched."""
    generator = torch.Generator().manual_seed(args.seed + 12345)
    out = []
    for start in range(0, count, chunk):
        idx = torch.arange(start, min(count, start + chunk))
        image = from_uint8(data["image"][idx].numpy(), device)
        out.append(sample_views(unet, image, args.ddim_steps, args.guidance, generator, alphas=alphas,
                                codec=codec).float().cpu())
    return torch.cat(out)


def evaluate_base(unet, val: dict, run_dir: Path, args: Args, device, alphas, codec: LatentCodec,
                  out_dir: Path) -> dict:
    """PSNR of generated colour and normal views vs GT on val (scan-like) and bench (hard) poses,
    plus a contact sheet for each. Bench is skipped with a note if data/bench/ is absent."""
    sets = {"val": val}
    bench_path = run_dir / "data/bench/bench.npz"
    if bench_path.exists():
        sets["bench"] = load_multiview(bench_path, run_dir, image_key="image")
    results = dict(num_steps=args.ddim_steps, guidance=args.guidance, seed=args.seed + 12345,
                   note="PSNR in dB over all pixels of the six views (white background included), "
                        "mean over subjects; colour and encoded normal ((n+1)/2) separately")
    for name, data in sets.items():
        count = min(args.num_eval, len(data["image"]))
        generated = generate(unet, data, count, args, device, alphas, codec)  # (N, V, 6, H, W)
        gen_color, gen_normal = latents_to_views(generated)
        gt_color, gt_normal = from_uint8(data["color"][:count].numpy()), from_uint8(data["normal"][:count].numpy())
        results[name] = dict(count=count, psnr_color=psnr(gen_color, gt_color).mean().item(),
                             psnr_normal=psnr(gen_normal, gt_normal).mean().item(),
                             psnr_front_color=psnr(gen_color[:, 0], gt_color[:, 0]).mean().item())
        # The sheet: per subject, input | generated colour x6 | normal x6, then blank | GT colour x6 | normal x6.
        k, blank = min(args.sheet_subjects, count), np.full_like(data["image"][:1].numpy(), 255)
        contact_sheet(out_dir / f"samples_{name}.png", [row for i in range(k) for row in (
            np.concatenate([data["image"][i:i + 1].numpy(), to_uint8(gen_color[i]), to_uint8(gen_normal[i])]),
            np.concatenate([blank, data["color"][i].numpy(), data["normal"][i].numpy()]))])
    if "bench" not in sets:
        results["bench"] = f"skipped: {bench_path} not found"
    return results


# --- main -----------------------------------------------------------------------------------------

def main(args: Args) -> None:
    start = time.time()
    out = train_base(args)
    print(f"wrote {out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main, Args)
