"""Stages 3 and 4 of DrPose: the image-to-multi-view (I2MV) diffusion model and its training.

    python finetune.py pretrain --preset demo          # base model on data/scans/ (CPU, ~3 minutes)
    python finetune.py pretrain --preset full          # 64 px, bigger net (one GPU, ~10 minutes)
    python finetune.py pretrain --resume               # continue from the newest base_ckpt/step_*/
    accelerate launch finetune.py pretrain --preset full   # several GPUs, the same code
    python finetune.py drpose ...                      # DrPose reward fine-tuning (issue 6)

The model (PSHuman's shape, learned from scratch at low resolution): a stock diffusers
`UNet2DConditionModel` that denoises the six views of one person at once.
  - input per view: the noisy view latent (colour + normal, 6 channels) concatenated with the
    conditioning front image (3 channels); which view it is enters as a class embedding;
  - the image also enters as cross-attention tokens: 8 x 8 patches projected by the U-Net's own
    `encoder_hid_proj` (PSHuman uses a CLIP image embedding; ours is learned and lives in the U-Net);
  - self-attention spans all six views of a subject (`MultiViewAttnProcessor`, installed with
    `set_attn_processor`; the diffusers blocks stay stock);
  - v-prediction, DDPM noise for training, DDIM (`sample_views`) for sampling, classifier-free
    guidance with the all-background image as the dropped condition.

Writes, under the run folder: base/ (`unet.save_pretrained` + drpose_config.json + val_metrics.json
+ contact sheets + metrics.jsonl) and base_ckpt/step_NNNNNN/ checkpoints.

Public functions later stages call: load_model, sample_views, predict, ddim_step, ddim_timesteps,
alphas_cumprod, model_output, encode, decode, contact_sheet.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal, NamedTuple, Union

import numpy as np
import torch
import torch.nn.functional as F
import tyro

from prepare_data import (NUM_VIEWS, VIEW_AZIMUTHS, UserError, atomic_dir, atomic_write, from_uint8, latents_to_views,
                          load_split, read_manifest, run_cli, views_to_latents, write_json, with_preset)


@dataclass
class PretrainArgs:
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
    init: Path | None = None
    """start from the weights of this model folder (any base/-like folder) instead of random init"""
    resume: bool = False
    """continue from the newest complete base_ckpt/step_*/ folder"""
    checkpoint_every: int | None = None
    """steps between checkpoints (demo 150, full 1000)"""
    keep_checkpoints: int = 2
    """how many newest checkpoints to keep"""
    log_every: int = 25
    """steps between log lines (tqdm postfix + metrics.jsonl)"""
    val_every: int = 100
    """steps between validation losses (fixed noise on val.npz)"""
    eval_steps: int | None = None
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

    def resolved(self) -> "PretrainArgs":
        """The preset's values for every field left unset (an explicit flag always wins)."""
        table = PRESETS[self.preset]
        return with_preset(self, table)


@dataclass
class DrposeArgs:
    """DrPose: fine-tune base/ to raise a reward (PoseScore) of views sampled from single images."""

    preset: Literal["demo", "full"] = "demo"
    """demo: CPU minutes; full: one GPU (fields left unset take the preset's value)"""
    run_dir: Path = Path("runs/demo")
    """the run folder: reads base/, posescore/, data/drpose/ (poses + single images); writes drpose/"""
    base: Path | None = None
    """the model to fine-tune (default: <run-dir>/base)"""
    out: Path | None = None
    """where the fine-tuned model goes (default: <run-dir>/drpose); checkpoints go to <out>_ckpt/"""
    reward: str = "posescore"
    """a name in posescore.REWARDS (higher is better)"""
    posescore_dir: Path | None = None
    """the reward's g_skel (default: <run-dir>/posescore)"""
    method: Literal["drtune", "draft", "alignprop"] = "drtune"
    """drtune: detached inputs, K spread steps, early stop (DrPose); draft: last K steps;
    alignprop: a random number of last steps"""
    num_steps: int | None = None
    """T: DDIM steps of the sampled chain (default: the base model's inference setting; paper: 20)"""
    grad_steps: int = 2
    """K: steps whose U-Net output stays in the graph (paper: 2)"""
    early_stop_max: int | None = None
    """m: the chain stops after T - r steps, r ~ U{0..m}, taking x0 from there (drtune only;
    default 0.4 T, the paper's 8 of 20)"""
    kl_weight: float = 0.01
    """w_KL on the squared noise-prediction difference to the frozen model at the K steps (paper: 0.01)"""
    guidance: float | None = None
    """classifier-free guidance while sampling for the reward (default: the base model's inference value)"""
    lora_rank: int | None = None
    """LoRA rank through peft; 0 fine-tunes the whole U-Net (demo 8, full 16)"""
    steps: int | None = None
    """optimizer steps (demo 100, full 1500)"""
    batch_size: int | None = None
    """(pose, image) pairs per step and device (demo 4, full 16)"""
    lr: float | None = None
    """AdamW learning rate, constant after a short warmup (demo 2e-3, full 5e-4)"""
    warmup_steps: int = 10
    """learning-rate warmup steps"""
    grad_clip: float = 1.0
    """gradient norm clip"""
    grad_checkpointing: bool | None = None
    """recompute U-Net activations in the backward pass (saves memory for K > 2 or alignprop; default on for cuda)"""
    eval_every: int | None = None
    """steps between evaluations of the reward on fixed bench inputs with fixed noise (demo 50, full 250)"""
    num_eval: int | None = None
    """bench inputs in that evaluation (demo 8, full 32)"""
    checkpoint_every: int | None = None
    """steps between checkpoints (demo 50, full 500)"""
    keep_checkpoints: int = 2
    """how many newest checkpoints to keep"""
    resume: bool = False
    """continue from the newest complete <out>_ckpt/step_*/ folder"""
    log_every: int = 5
    """steps between log lines (tqdm postfix + metrics.jsonl)"""
    seed: int = 0
    """seeds LoRA init, data order, sampling noise and the chain plans; evaluation noise has its own"""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda; bf16 autocast on cuda"""

    def resolved(self) -> "DrposeArgs":
        table = DRPOSE_PRESETS[self.preset]
        args = with_preset(self, table)
        return dataclasses.replace(args, base=args.base or args.run_dir / "base", out=args.out or args.run_dir / "drpose")


DRPOSE_PRESETS = {
    "demo": dict(lora_rank=8, steps=100, batch_size=4, lr=2e-3, eval_every=50, num_eval=8, checkpoint_every=50),
    "full": dict(lora_rank=16, steps=1500, batch_size=16, lr=5e-4, eval_every=250, num_eval=32, checkpoint_every=500),
}

PRESETS = {
    # demo: ~0.4 s/step on 2 idle cores, so 300 steps + a 16-subject evaluation fit in 3 minutes.
    "demo": dict(steps=300, batch_size=6, lr=2e-3, channels=(32, 64, 96), layers_per_block=1, attn_levels=1,
                 token_dim=64, checkpoint_every=150, num_eval=8, eval_steps=10, guidance=1.0),
    "full": dict(steps=4000, batch_size=16, lr=4e-4, channels=(64, 128, 192, 256), layers_per_block=2,
                 attn_levels=3, token_dim=256, checkpoint_every=1000, num_eval=200, eval_steps=20, guidance=1.5),
}

Command = Union[
    Annotated[PretrainArgs, tyro.conf.subcommand("pretrain")],
    Annotated[DrposeArgs, tyro.conf.subcommand("drpose")],
]

LATENT_CHANNELS = 6  # colour RGB + normal XYZ per view (prepare_data.views_to_latents)
IMAGE_CHANNELS = 3  # the conditioning front image
TOKEN_GRID = 8  # the input image becomes 8 x 8 patch tokens at any resolution
POS_FREQS = 4  # sin/cos frequencies per axis appended to each patch (tokens need a position)
POS_DIM = 4 * POS_FREQS
# Cosine schedule: at 32-64 px in pixel space a linear schedule wastes most steps on near-clean
# images; the cosine one (Nichol & Dhariwal) also ends at almost zero SNR, so sampling from pure
# noise at t = T matches training.
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


# --- the latent seam -----------------------------------------------------------------------------
# In the embedded default the diffusion runs on the views themselves. A latent-diffusion model
# (PSHuman: SD 2.1's VAE) would encode here and decode there; nothing else changes.

def encode(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (..., C, H, W) -> latents. Identity in pixel space."""
    return images


def decode(latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1]. Identity in pixel space."""
    return latents


# --- the model: stock U-Net + a multi-view self-attention processor -------------------------------

class MultiViewAttnProcessor:
    """Self-attention over all views of one subject: tokens (B*V, N, C) attend as (B, V*N, C).

    This is the only change to the stock U-Net (PSHuman/Era3D do the same with their "multi-view
    attention"). Everything but the token reshaping is diffusers' own `AttnProcessor2_0`, so peft
    LoRA on to_q/to_k/to_v/to_out still applies."""

    def __init__(self, num_views: int = NUM_VIEWS):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.num_views = num_views
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("MultiViewAttnProcessor is for unmasked self-attention on (B*V, N, C) tokens")
        bv, n, c = hidden_states.shape  # (B*V, N, C)
        joint = hidden_states.reshape(bv // self.num_views, self.num_views * n, c)  # (B, V*N, C)
        out = self.inner(attn, joint, None, None, temb)
        return out.reshape(bv, n, c)  # (B*V, N, C)


def set_view_attention(unet, num_views: int = NUM_VIEWS, multi_view: bool = True):
    """Install the multi-view processor on every self-attention (attn1); cross-attention (attn2)
    keeps the stock one. multi_view=False gives each view its own attention (for tests/ablation)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = {name: (MultiViewAttnProcessor(num_views) if multi_view and name.endswith("attn1.processor")
                         else AttnProcessor2_0()) for name in unet.attn_processors}
    unet.set_attn_processor(processors)
    return unet


def unet_config(resolution: int, channels, layers_per_block: int, attn_levels: int, heads: int,
                token_dim: int, num_views: int = NUM_VIEWS) -> dict:
    """The diffusers config of our U-Net. Attention only at the deepest `attn_levels` levels: at full
    resolution six views of H*W tokens would make self-attention the whole cost."""
    levels = len(channels)
    patch = resolution // TOKEN_GRID
    has_attn = [i >= levels - attn_levels for i in range(levels)]
    groups = math.gcd(*channels, 32)  # GroupNorm groups must divide every width
    return dict(
        sample_size=resolution,
        in_channels=LATENT_CHANNELS + IMAGE_CHANNELS,
        out_channels=LATENT_CHANNELS,
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
    from diffusers import UNet2DConditionModel

    return set_view_attention(UNet2DConditionModel(**config), num_views)


def image_tokens(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) image in [-1, 1] -> (B, 64, 3*p*p + POS_DIM) patch tokens with a fixed
    sin/cos position, so cross-attention knows where each patch is. No parameters: the learned
    projection is the U-Net's encoder_hid_proj."""
    b, _, h, w = image.shape
    patch = h // TOKEN_GRID
    patches = F.unfold(image, kernel_size=patch, stride=patch).transpose(1, 2)  # (B, 64, 3*p*p)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, TOKEN_GRID), torch.linspace(-1, 1, TOKEN_GRID), indexing="ij")
    freqs = math.pi * 2.0 ** torch.arange(POS_FREQS)  # (F,)
    angles = torch.cat([ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs], dim=1)  # (64, 2F)
    pos = torch.cat([angles.sin(), angles.cos()], dim=1).to(image)  # (64, POS_DIM)
    return torch.cat([patches, pos.expand(b, -1, -1)], dim=2)


def model_output(unet, x_t: torch.Tensor, t: torch.Tensor, cond_image: torch.Tensor) -> torch.Tensor:
    """One U-Net call on all views: x_t (B, V, 6, H, W), t (B,) long, cond_image (B, 3, H, W) in
    [0, 1] -> v-prediction (B, V, 6, H, W). Uses only `unet(...)`, so a DDP/peft wrapper works."""
    b, v, c, h, w = x_t.shape
    image = cond_image * 2 - 1
    z_image = encode(image)[:, None].expand(b, v, -1, h, w)  # (B, V, 3, H, W): every view sees it
    sample = torch.cat([x_t, z_image.to(x_t.dtype)], dim=2).reshape(b * v, c + IMAGE_CHANNELS, h, w)
    tokens = image_tokens(image).repeat_interleave(v, dim=0)  # (B*V, 64, D)
    views = torch.arange(v, device=x_t.device).repeat(b)  # (B*V,) view index = class label
    out = unet(sample, t.repeat_interleave(v), encoder_hidden_states=tokens, class_labels=views).sample
    return out.reshape(b, v, c, h, w)


# --- one denoising step: predict, then a DDIM update ---------------------------------------------
# DrPose's loop calls these same two functions with its own gradient control (detached inputs,
# K steps in the graph, early stop taking x0 directly), so sampling is written exactly once.

class Prediction(NamedTuple):
    out: torch.Tensor  # (B, V, 6, H, W) the (guided) model output, v
    x0: torch.Tensor  # (B, V, 6, H, W) predicted clean latents
    eps: torch.Tensor  # (B, V, 6, H, W) predicted noise


def alphas_cumprod(config: dict | None = None) -> torch.Tensor:
    """(T,) float64 cumulative alphas of the training noise schedule (ours, or a model's config)."""
    from diffusers import DDPMScheduler

    scheduler_config = (config or {}).get("scheduler", SCHEDULER)
    return DDPMScheduler.from_config(scheduler_config).alphas_cumprod.double()


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Descending DDIM timesteps with "trailing" spacing, so the first step is t = T - 1 (pure noise)."""
    return [int(t) for t in np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1]


def guided_output(unet, x_t: torch.Tensor, t: torch.Tensor | int, cond_image: torch.Tensor,
                  guidance: float) -> torch.Tensor:
    """The guided model output v at x_t (B, V, 6, H, W), timestep t, image (B, 3, H, W) in [0, 1].
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


def clip_prediction(pred: Prediction, x_t: torch.Tensor, t, alphas: torch.Tensor) -> Prediction:
    """Clamp x0 to the data range [-1, 1] and recompute eps to match (diffusers' clip_sample)."""
    a = alphas.to(x_t.device)[torch.as_tensor(t, device=x_t.device).long()].to(x_t.dtype)
    a = a.view(-1, 1, 1, 1, 1) if a.ndim else a  # per-sample t (B,) or one shared t
    x0 = pred.x0.clamp(-1, 1)
    return Prediction(pred.out, x0, (x_t - a.sqrt() * x0) / (1 - a).sqrt())


@torch.no_grad()
def sample_views(unet, cond_image: torch.Tensor, num_steps: int = 20, guidance: float = 1.5,
                 generator: torch.Generator | None = None, *, alphas: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, clip: bool = True, num_views: int = NUM_VIEWS,
                 progress: bool = False) -> torch.Tensor:
    """Six views from one image: cond_image (B, 3, H, W) in [0, 1] -> (B, V, 6, H, W) in [-1, 1].

    DDIM with `num_steps` steps and classifier-free `guidance`. All randomness is the starting
    noise, drawn from `generator` (or passed as `noise`), so a fixed generator gives fixed views and
    the caller's global RNG is untouched. `alphas`: the model's schedule (default: ours)."""
    alphas = alphas_cumprod() if alphas is None else alphas
    b, _, h, w = cond_image.shape
    if noise is None:
        gen_device = generator.device if generator is not None else "cpu"
        noise = torch.randn((b, num_views, LATENT_CHANNELS, h, w), generator=generator, device=gen_device)
    x = noise.to(cond_image.device, cond_image.dtype)  # (B, V, 6, H, W)
    steps = ddim_timesteps(num_steps, len(alphas))
    for i, t in enumerate(tqdm_if(steps, progress, "sampling")):
        pred = predict(unet, x, t, cond_image, guidance, alphas)
        if clip:
            pred = clip_prediction(pred, x, t, alphas)
        alpha_prev = alphas[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0, dtype=alphas.dtype)
        x = ddim_step(pred.x0.float(), pred.eps.float(), alpha_prev.float())
    return decode(x).clamp(-1, 1)


def tqdm_if(items, show: bool, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False) if show else items


# --- loading and saving models --------------------------------------------------------------------

CONFIG_NAME = "drpose_config.json"


def load_model(folder: Path, device="cpu"):
    """A model folder (base/, or any folder written the same way) -> (unet in eval mode, config dict).

    The weights are a plain diffusers folder (`UNet2DConditionModel.from_pretrained(folder)` loads
    them); the multi-view attention processor is code, not weights, so it is installed here."""
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.exists() or not (folder / "config.json").exists():
        raise UserError(f"{folder} is not a model folder (no {CONFIG_NAME} or config.json); "
                        f"make one with `python finetune.py pretrain --run-dir {folder.parent}`")
    try:
        config = json.loads(config_path.read_text())
        unet = UNet2DConditionModel.from_pretrained(folder)
    except Exception as err:
        raise UserError(f"{folder}: cannot load the model ({type(err).__name__}: {err}); re-run "
                        f"`python finetune.py pretrain --run-dir {folder.parent}`") from None
    if config.get("num_views") != NUM_VIEWS or unet.config.in_channels != LATENT_CHANNELS + IMAGE_CHANNELS:
        raise UserError(f"{folder} was made for {config.get('num_views')} views / {unet.config.in_channels} "
                        f"input channels, this code uses {NUM_VIEWS} / {LATENT_CHANNELS + IMAGE_CHANNELS}")
    set_view_attention(unet, config["num_views"])
    return unet.to(device).eval(), config


def save_model(folder: Path, unet, config: dict) -> None:
    """Write `unet.save_pretrained(folder)` and our config next to it (folder may be a tmp dir)."""
    unet.save_pretrained(folder, safe_serialization=True)
    write_json(Path(folder) / CONFIG_NAME, config)


def model_record(resolution: int, args: PretrainArgs, step: int) -> dict:
    """What drpose_config.json says about a model besides the U-Net's own config."""
    import diffusers

    return dict(
        format="drpose-i2mv", resolution=resolution, num_views=NUM_VIEWS, view_azimuths=list(VIEW_AZIMUTHS),
        latent_channels=LATENT_CHANNELS, latent_space="pixel (encode/decode are identity)",
        latent_layout="cat(colour RGB, normal XYZ) * 2 - 1, normal stored as (n+1)/2 in camera space",
        condition="front colour image in [0,1]: channel concat to every view + 8x8 patch tokens via "
                  "encoder_hid_proj; dropped condition = all-white image",
        prediction_type=SCHEDULER["prediction_type"], scheduler=SCHEDULER, token_grid=TOKEN_GRID,
        sampling=dict(sampler="ddim", num_steps=args.eval_steps, guidance=args.guidance),
        step=step, train_args=_jsonable(dataclasses.asdict(args)),
        versions=dict(torch=torch.__version__, diffusers=diffusers.__version__),
    )


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


# --- data -----------------------------------------------------------------------------------------

def load_views(path: Path, run_dir: Path, image_key: str | None = None) -> dict:
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


def batch_latents(data: dict, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> views (B, V, 6, H, W) in [-1, 1] (encoded) and image (B, 3, H, W) in [0, 1]."""
    color, normal = from_uint8(data["color"][idx].numpy(), device), from_uint8(data["normal"][idx].numpy(), device)
    return encode(views_to_latents(color, normal)), from_uint8(data["image"][idx].numpy(), device)


def epoch_batches(num: int, batch: int, epoch: int, seed: int) -> torch.Tensor:
    """(steps_per_epoch, batch) subject indices. A pure function of (seed, epoch), so resuming
    at any step replays exactly the same data order without saving a data-loader state."""
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    steps = num // batch
    return perm[: steps * batch].reshape(steps, batch)


def step_rows(step: int, num: int, batch: int, world: int, rank: int, seed: int) -> torch.Tensor:
    """(batch,) subject indices this process trains on at `step`: its slice of the global batch of
    the step's epoch permutation (a pure function, so resume replays the same order)."""
    batches = epoch_batches(num, batch * world, step // (num // (batch * world)), seed)
    return batches[step % len(batches)].view(world, batch)[rank]


# --- checkpoints -----------------------------------------------------------------------------------

STEP_DIR = re.compile(r"^step_(\d{6})$")


def _rng_to_str(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _rng_from_str(text: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def save_checkpoint(root: Path, step: int, unet, optimizer, rng_states: list[str], record: dict, keep: int) -> Path:
    """base_ckpt/step_NNNNNN/: model.safetensors, optimizer.pt, state.json (step, RNG, args,
    versions, model config). Written as step_NNNNNN.tmp/ and renamed when complete."""
    from safetensors.torch import save_file

    folder = Path(root) / f"step_{step:06d}"
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in unet.state_dict().items()}, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        write_json(tmp / "state.json", dict(record, step=step, rng=rng_states, unet_config=dict(unet.config)))
    for old in sorted(p for p in Path(root).iterdir() if STEP_DIR.match(p.name))[:-keep]:
        shutil.rmtree(old)
    return folder


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete step_*/ folder (a .tmp folder from a killed write is ignored)."""
    done = [p for p in Path(root).glob("step_*") if STEP_DIR.match(p.name) and (p / "state.json").exists()]
    return max(done, key=lambda p: p.name) if done else None


def load_checkpoint(folder: Path, unet, optimizer, expect: dict) -> tuple[int, list[str]]:
    """Restore weights and optimizer in place; return (step, RNG states). A checkpoint made with a
    different model, resolution or world size is refused in one line."""
    from safetensors.torch import load_file

    fix = f"delete {folder.parent} or use another --run-dir"
    try:
        state = json.loads((folder / "state.json").read_text())
        weights = load_file(folder / "model.safetensors")
        opt_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{folder} is unreadable ({type(err).__name__}); {fix}") from None
    if _jsonable(state.get("unet_config")) != _jsonable(dict(unet.config)):
        raise UserError(f"{folder} is incompatible: it holds a different network (unet_config); {fix}")
    for key, want in _jsonable(expect).items():
        if _jsonable(state.get("resume_key", {})).get(key) != want:
            raise UserError(f"{folder} is incompatible: its {key} differs from this run's; {fix}")
    try:
        unet.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(opt_state)
    except Exception as err:
        raise UserError(f"{folder} does not fit this model ({type(err).__name__}); {fix}") from None
    return int(state["step"]), state["rng"]


# --- training -------------------------------------------------------------------------------------

def learning_rate(step: int, args: PretrainArgs) -> float:
    """Linear warmup then cosine to zero; a function of the step, so resume needs no scheduler state."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def diffusion_loss(unet, views: torch.Tensor, image: torch.Tensor, alphas: torch.Tensor,
                   cond_drop: float, generator: torch.Generator) -> torch.Tensor:
    """Standard v-prediction loss on views (B, V, 6, H, W) given image (B, 3, H, W) in [0, 1].
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


@torch.no_grad()
def validation_loss(unet, val: dict, alphas: torch.Tensor, device, seed: int, limit: int = 16) -> float:
    """The loss on up to `limit` val subjects with fixed noise and timesteps (comparable over steps)."""
    idx = torch.arange(min(limit, len(val["image"])))
    views, image = batch_latents(val, idx, device)
    return diffusion_loss(unet, views, image, alphas, 0.0, torch.Generator().manual_seed(seed + 1)).item()


def autocast(device: torch.device):
    """bf16 autocast on CUDA (for the parts accelerate does not wrap, e.g. sampling); none on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def pretrain(args: PretrainArgs, hook: Callable[[int], None] | None = None) -> Path:
    """Train (or resume), evaluate and write base/. Returns the base/ folder. `hook(step)` runs after
    every step and its checkpoint (tests use it to kill a run)."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm import tqdm

    args = args.resolved()
    run_dir = Path(args.run_dir)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision="bf16" if use_cuda else "no")
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # --- data: scan-like training subjects; val for the validation loss and the final numbers ---
    train = load_views(run_dir / "data/scans/train.npz", run_dir)
    val = load_views(run_dir / "data/scans/val.npz", run_dir)
    resolution = train["resolution"]
    if resolution % TOKEN_GRID or resolution // TOKEN_GRID < 1:
        raise UserError(f"resolution {resolution} must be a multiple of {TOKEN_GRID}")
    if len(train["image"]) < args.batch_size * world:
        raise UserError(f"{run_dir}/data/scans/train.npz has {len(train['image'])} subjects, fewer than "
                        f"--batch-size x devices = {args.batch_size * world}")

    # --- model and optimizer ---
    torch.manual_seed(args.seed)  # model init is the only user of the global RNG
    if args.init is not None:
        unet, init_config = load_model(args.init)
        if init_config["resolution"] != resolution:
            raise UserError(f"{args.init} is a {init_config['resolution']} px model, the data is {resolution} px")
        unet.train()
    else:
        unet = build_unet(unet_config(resolution, args.channels, args.layers_per_block, args.attn_levels,
                                      args.heads, args.token_dim))
    unet.to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    alphas = alphas_cumprod()
    record = model_record(resolution, args, args.steps)
    # What must match to resume: the network, the data size, the data order and the devices.
    expect = dict(resolution=resolution, world=world,
                  data=dict(seed=args.seed, batch_size=args.batch_size, subjects=len(train["image"])))

    ckpt_root = run_dir / "base_ckpt"
    metrics_path = ckpt_root / "metrics.jsonl"
    step, generator = 0, torch.Generator().manual_seed(args.seed * 1000 + rank)  # noise, t, dropout
    found = latest_checkpoint(ckpt_root) if args.resume and ckpt_root.exists() else None
    if found is not None:
        step, rng_states = load_checkpoint(found, unet, optimizer, expect)
        if step > args.steps:
            raise UserError(f"{found} is past --steps {args.steps}; raise --steps or use another --run-dir")
        generator.set_state(_rng_from_str(rng_states[rank]))
        accelerator.print(f"resumed from {found} (step {step})")
    elif args.resume:
        accelerator.print(f"no checkpoint under {ckpt_root}; starting from step 0")
    if accelerator.is_main_process and found is None and ckpt_root.exists():
        # A fresh run replaces an old run's checkpoints, so a later --resume cannot mix the two.
        for old in (p for p in ckpt_root.glob("step_*") if p.is_dir()):
            shutil.rmtree(old)
    if accelerator.is_main_process:
        _truncate_log(metrics_path, step)  # drop lines a killed run logged after its last checkpoint
    unet, optimizer = accelerator.prepare(unet, optimizer)

    # --- train ---
    unet.train()
    bar = tqdm(total=args.steps, initial=step, desc="pretrain", disable=not accelerator.is_main_process)
    tick = time.time()
    while step < args.steps:
        row = step_rows(step, len(train["image"]), args.batch_size, world, rank, args.seed)
        views, image = batch_latents(train, row, device)  # (B, V, 6, H, W), (B, 3, H, W)
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = diffusion_loss(unet, views, image, alphas, args.cond_drop, generator)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(unet.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        bar.update(1)

        if step % args.log_every == 0 or step == args.steps:
            line = dict(step=step, loss=round(loss.item(), 5), lr=lr, grad_norm=round(float(grad_norm), 4),
                        sec_per_step=round((time.time() - tick) / args.log_every, 4))
            if step % args.val_every == 0 or step == args.steps:
                unet.eval()
                line["val_loss"] = round(validation_loss(accelerator.unwrap_model(unet), val, alphas, device, args.seed), 5)
                unet.train()
            bar.set_postfix({k: v for k, v in line.items() if k in ("loss", "val_loss")})
            if accelerator.is_main_process:
                _append_log(metrics_path, line)
            tick = time.time()
        if step % args.checkpoint_every == 0 or step == args.steps:
            rng_states = gather_object([_rng_to_str(generator.get_state())])
            if accelerator.is_main_process:
                save_checkpoint(ckpt_root, step, accelerator.unwrap_model(unet), optimizer, rng_states,
                                dict(record, resume_key=expect),
                                args.keep_checkpoints)
            accelerator.wait_for_everyone()
        if hook is not None:
            hook(step)
    bar.close()

    # --- evaluate and write base/ ---
    unet = accelerator.unwrap_model(unet).eval()
    base = run_dir / "base"
    if accelerator.is_main_process:
        with atomic_dir(base) as tmp:
            save_model(tmp, unet, record)
            if metrics_path.exists():
                shutil.copy(metrics_path, tmp / "metrics.jsonl")
            if args.num_eval > 0:
                with autocast(device):
                    results = evaluate_base(unet, val, run_dir, args, device, alphas, tmp)
                write_json(tmp / "val_metrics.json", results)
                print_metrics(results)
    accelerator.wait_for_everyone()
    return base




def _append_log(path: Path, line: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(line) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


# --- evaluation: PSNR against GT renders, contact sheets -------------------------------------------

def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, ...) images in [0, 1] -> (B,) PSNR in dB over all pixels of each subject."""
    mse = (pred - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


@torch.no_grad()
def generate(unet, data: dict, count: int, args: PretrainArgs, device, alphas, chunk: int = 8) -> torch.Tensor:
    """Views (count, V, 6, H, W) for the first `count` subjects; noise from its own generator so
    every model sees the same noise and the training RNG is untouched."""
    generator = torch.Generator().manual_seed(args.seed + 12345)
    out = []
    for start in range(0, count, chunk):
        idx = torch.arange(start, min(count, start + chunk))
        image = from_uint8(data["image"][idx].numpy(), device)
        out.append(sample_views(unet, image, args.eval_steps, args.guidance, generator, alphas=alphas).float().cpu())
    return torch.cat(out)


def evaluate_base(unet, val: dict, run_dir: Path, args: PretrainArgs, device, alphas, out_dir: Path) -> dict:
    """PSNR of generated colour and normal views vs GT on val (scan-like) and bench (hard) poses,
    plus a contact sheet for each. Bench is skipped with a note if data/bench/ is absent."""
    sets = {"val": val}
    bench_path = run_dir / "data/bench/bench.npz"
    if bench_path.exists():
        sets["bench"] = load_views(bench_path, run_dir, image_key="image")
    results = dict(num_steps=args.eval_steps, guidance=args.guidance, seed=args.seed + 12345,
                   note="PSNR in dB over all pixels of the six views (white background included), "
                        "mean over subjects; colour and encoded normal ((n+1)/2) separately")
    for name, data in sets.items():
        count = min(args.num_eval, len(data["image"]))
        generated = generate(unet, data, count, args, device, alphas)  # (N, V, 6, H, W)
        gen_color, gen_normal = latents_to_views(generated)
        gt_color, gt_normal = from_uint8(data["color"][:count].numpy()), from_uint8(data["normal"][:count].numpy())
        results[name] = dict(count=count, psnr_color=psnr(gen_color, gt_color).mean().item(),
                             psnr_normal=psnr(gen_normal, gt_normal).mean().item(),
                             psnr_front_color=psnr(gen_color[:, 0], gt_color[:, 0]).mean().item())
        gt = views_to_latents(gt_color, gt_normal)
        k = min(args.sheet_subjects, count)
        contact_sheet(from_uint8(data["image"][:k].numpy()), generated[:k], gt[:k], out_dir / f"samples_{name}.png")
    if "bench" not in sets:
        results["bench"] = f"skipped: {bench_path} not found"
    return results


def print_metrics(results: dict) -> None:
    print(f"PSNR (dB), DDIM {results['num_steps']} steps, guidance {results['guidance']}:")
    for name in ("val", "bench"):
        r = results.get(name)
        if isinstance(r, dict):
            print(f"  {name:5s} n={r['count']:3d}  colour {r['psnr_color']:6.2f}  normal {r['psnr_normal']:6.2f}")
        else:
            print(f"  {name:5s} {r}")


def contact_sheet(image: torch.Tensor, generated: torch.Tensor, gt: torch.Tensor | None, path: Path,
                  scale: int = 3) -> None:
    """A png per subject: row 1 input | generated colour x6 | generated normal x6; row 2 (when gt is
    given) blank | GT colour x6 | GT normal x6. image (B, 3, H, W) in [0, 1]; views (B, V, 6, H, W) in [-1, 1]."""
    from PIL import Image

    def strip(views):  # (V, 6, H, W) -> (3, H, 2V*W): colour views then normal views
        color, normal = latents_to_views(views[None])
        return torch.cat([*color[0], *normal[0]], dim=2)

    b, _, h, w = image.shape
    gap = torch.full((3, h, 2), 0.5)
    rows = []
    for i in range(b):
        rows.append(torch.cat([image[i].cpu(), gap, strip(generated[i].cpu())], dim=2))
        if gt is not None:
            rows.append(torch.cat([torch.full_like(image[i].cpu(), 0.5), gap, strip(gt[i].cpu())], dim=2))
        rows.append(torch.full((3, 2, rows[-1].shape[2]), 0.5))
    sheet = torch.cat(rows, dim=1)
    pixels = (sheet.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)
    with atomic_write(Path(path)) as tmp:
        picture.save(tmp, format="png")


# --- DrPose: reward fine-tuning through the sampler ------------------------------------------------
# Vocabulary (DRaFT / DRTune): T DDIM steps; K "grad steps" whose U-Net output stays in the autograd
# graph; an early stop r ~ U{0..m} steps before the end that takes x0 directly. The reward r is
# maximised; the loss, written once (`drpose_loss`), is (1 - r) + w_KL * ||eps - eps_frozen||^2.

# LoRA on attention projections and on the resnet convolutions: at demo size most of the U-Net is
# convolutions (attention sits only at the deepest level), and pose lives in their weights too.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


class ChainPlan(NamedTuple):
    """The random choices of one training step, drawn once per step and logged."""
    stop: int  # index of the last executed DDIM step; its x0 prediction is the sample
    grad_steps: tuple[int, ...]  # step indices whose U-Net output stays in the graph
    detach_input: bool  # the U-Net sees x.detach() at every step (DRTune) or x itself


def plan_chain(method: str, num_steps: int, grad_steps: int, early_stop_max: int,
               generator: torch.Generator) -> ChainPlan:
    """drtune: run T - r steps, r ~ U{0..m}; K grad steps evenly spaced with a random offset over
    the executed steps, early ones included; every U-Net input detached, so the weights get
    gradients only through those K outputs, never through the U-Net's Jacobian along the chain.
    draft: the full chain, the last K steps in the graph, inputs not detached (DRaFT-K).
    alignprop: the full chain, the last k ~ U{1..T} steps in the graph, not detached (AlignProp)."""
    def draw(high: int) -> int:  # uniform integer in [0, high)
        return int(torch.randint(high, (1,), generator=generator))

    if method == "drtune":
        executed = num_steps - draw(min(early_stop_max, num_steps - 1) + 1)
        k = min(grad_steps, executed)
        spacing = executed // k
        offset = draw(spacing)
        return ChainPlan(executed - 1, tuple(offset + j * spacing for j in range(k)), True)
    k = min(grad_steps, num_steps) if method == "draft" else 1 + draw(num_steps)
    return ChainPlan(num_steps - 1, tuple(range(num_steps - k, num_steps)), False)


@contextmanager
def frozen_model(unet, frozen_copy=None):
    """The starting model: the same network with its LoRA adapters off, or for full fine-tuning
    the frozen copy made before the first update."""
    if frozen_copy is not None:
        yield frozen_copy
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def sample_with_grad(unet, image: torch.Tensor, noise: torch.Tensor, plan: ChainPlan, guidance: float,
                     alphas: torch.Tensor, num_steps: int, frozen=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_views`' DDIM chain under a plan. image (B, 3, H, W) in [0, 1], noise (B, V, 6, H, W).
    Returns x0 (B, V, 6, H, W) in [-1, 1], differentiable through the plan's grad steps, and the KL
    term (B,): the squared difference of trained and frozen noise predictions, mean over grad steps.
    `frozen`: the unwrapped model (LoRA: adapters are switched off on it) or a frozen copy."""
    steps = ddim_timesteps(num_steps, len(alphas))
    x = noise
    kl = noise.new_zeros(noise.shape[0])
    for i in range(plan.stop + 1):
        t = steps[i]
        in_graph = i in plan.grad_steps
        # Only the U-Net call is in or out of the graph; the DDIM arithmetic always stays in it.
        with torch.set_grad_enabled(in_graph):
            out = guided_output(unet, x.detach() if plan.detach_input else x, t, image, guidance)
        pred = split_v(out, x, t, alphas)
        if in_graph:
            with torch.no_grad(), frozen_model(*frozen) as reference:
                frozen_out = guided_output(reference, x.detach(), t, image, guidance)
            # eps = sqrt(a) v + sqrt(1-a) x: the eps difference is sqrt(a) times the v difference.
            a = alphas[t].to(x.dtype)
            kl = kl + (a.sqrt() * (pred.out - frozen_out)).float().pow(2).flatten(1).mean(1) / len(plan.grad_steps)
        pred = clip_prediction(pred, x, t, alphas)
        if i == plan.stop:  # the last executed step (early stop or not): take x0 directly
            return pred.x0.float(), kl
        x = ddim_step(pred.x0.float(), pred.eps.float(), alphas[steps[i + 1]].float())
    raise AssertionError("plan.stop lies beyond the chain")


def drpose_loss(rewards: torch.Tensor, kl: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """The one place the sign convention lives: rewards are maximised, so the loss is 1 - r."""
    return (1 - rewards).mean() + kl_weight * kl.mean()


def load_pairs(run_dir: Path) -> dict:
    """data/drpose/pairs.npz: (pose, single image) pairs. The only training data DrPose reads."""
    arrays = load_split(run_dir / "data/drpose/pairs.npz", expect_keys=("image", "joints"),
                        made_by=f"python prepare_data.py --run-dir {run_dir}")
    return dict(image=torch.from_numpy(arrays["image"]), joints=torch.from_numpy(arrays["joints"]).float())


def load_eval_inputs(run_dir: Path, count: int) -> dict | None:
    """The first `count` bench inputs (front image + GT joints only; the multi-view GT in the same
    file is never read). None when data/bench/ is absent."""
    path = run_dir / "data/bench/bench.npz"
    if count <= 0 or not path.exists():
        return None
    read_manifest(path.parent, f"python prepare_data.py --run-dir {run_dir}")
    with np.load(path, allow_pickle=False) as npz:  # npz members load lazily, key by key
        return dict(image=torch.from_numpy(npz["image"][:count]), joints=torch.from_numpy(npz["joints"][:count]).float())


def add_lora(unet, rank: int):
    """Attach a peft LoRA adapter (B initialised to zero, so the model starts exactly at base)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=LORA_TARGETS))
    return unet


@torch.no_grad()
def eval_reward(unet, data: dict, reward_fn, ctx, args: DrposeArgs, guidance: float, alphas, device) -> float:
    """Mean reward of views sampled from fixed inputs with fixed noise (its own generator, so the
    training RNG is untouched and every call, base or fine-tuned, sees the same noise)."""
    generator = torch.Generator().manual_seed(args.seed + 777)
    image = from_uint8(data["image"].numpy(), device)
    with autocast(device):
        views = sample_views(unet, image, args.num_steps, guidance, generator, alphas=alphas)
    rewards, _ = reward_fn(views.float(), {"joints": data["joints"].to(device)}, ctx)
    return rewards.mean().item()


def drpose(args: DrposeArgs, hook: Callable[[int], None] | None = None) -> Path:
    """Fine-tune (or resume), then write <out>/ (merged diffusers U-Net + LoRA adapter + log + curve)."""
    import copy

    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm import tqdm

    import posescore

    args = args.resolved()
    run_dir = Path(args.run_dir)
    if args.reward not in posescore.REWARDS:
        raise UserError(f"--reward {args.reward} is not in posescore.REWARDS {sorted(posescore.REWARDS)}")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision="bf16" if use_cuda else "no")
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # --- data: (pose, image) pairs; a fixed bench subset for evaluation ---
    pairs = load_pairs(run_dir)
    eval_inputs = load_eval_inputs(run_dir, args.num_eval)
    if len(pairs["image"]) < args.batch_size * world:
        raise UserError(f"{run_dir}/data/drpose/pairs.npz has {len(pairs['image'])} pairs, fewer than "
                        f"--batch-size x devices = {args.batch_size * world}")

    # --- models: the base U-Net with LoRA (or all weights) trainable, the frozen reward ---
    unet, base_config = load_model(args.base, device)
    if base_config["resolution"] != pairs["image"].shape[-1]:
        raise UserError(f"{args.base} is a {base_config['resolution']} px model but data/drpose is "
                        f"{pairs['image'].shape[-1]} px; make both with the same --preset")
    posescore_dir = args.posescore_dir or run_dir / "posescore"
    ctx = posescore.load_reward_context(posescore_dir, device)
    if ctx.resolution != base_config["resolution"]:
        raise UserError(f"{posescore_dir} was trained at {ctx.resolution} px, the model is "
                        f"{base_config['resolution']} px; retrain it with `python posescore.py train --run-dir {run_dir}`")
    reward_fn = posescore.REWARDS[args.reward]
    # Sample as inference does (the base's DDIM steps and guidance) unless told otherwise.
    guidance = base_config["sampling"]["guidance"] if args.guidance is None else args.guidance
    if args.num_steps is None:
        args = dataclasses.replace(args, num_steps=base_config["sampling"]["num_steps"])
    if args.early_stop_max is None:
        args = dataclasses.replace(args, early_stop_max=round(0.4 * args.num_steps))
    alphas = alphas_cumprod(base_config).to(device)
    torch.manual_seed(args.seed)
    frozen_copy = None
    if args.lora_rank > 0:
        add_lora(unet, args.lora_rank)
    else:  # full fine-tuning keeps one frozen copy: the only way to ask the starting model
        frozen_copy = copy.deepcopy(unet).requires_grad_(False)
        unet.requires_grad_(True)
    if args.grad_checkpointing or (args.grad_checkpointing is None and use_cuda):
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    base_eval = eval_reward(unet.eval(), eval_inputs, reward_fn, ctx, args, guidance, alphas, device) \
        if eval_inputs is not None and accelerator.is_main_process else None
    unet.train()

    ckpt_root = Path(str(args.out) + "_ckpt")
    metrics_path = ckpt_root / "metrics.jsonl"
    expect = dict(world=world, base=str(args.base), method=args.method, reward=args.reward, lora_rank=args.lora_rank,
                  data=dict(seed=args.seed, batch_size=args.batch_size, pairs=len(pairs["image"])))
    record = dict(base_config, format="drpose-i2mv", drpose=_jsonable(dataclasses.asdict(args)),
                  sampling=dict(base_config["sampling"], guidance=guidance, num_steps=args.num_steps))
    step, generator = 0, torch.Generator().manual_seed(args.seed * 1000 + 17 + rank)  # noise + plans
    found = latest_checkpoint(ckpt_root) if args.resume and ckpt_root.exists() else None
    if found is not None:
        step, rng_states = load_checkpoint(found, unet, optimizer, expect)
        generator.set_state(_rng_from_str(rng_states[rank]))
        accelerator.print(f"resumed from {found} (step {step})")
    elif ckpt_root.exists() and accelerator.is_main_process:
        shutil.rmtree(ckpt_root)  # a fresh run: stale checkpoints would be resumed by mistake later
    if accelerator.is_main_process:
        _truncate_log(metrics_path, step)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    plain = accelerator.unwrap_model(unet)
    frozen = (plain, frozen_copy)

    # --- train: sample with gradients, score, step ---
    bar = tqdm(total=args.steps, initial=step, desc=f"drpose ({args.method})", disable=not accelerator.is_main_process)
    tick = time.time()
    while step < args.steps:
        row = step_rows(step, len(pairs["image"]), args.batch_size, world, rank, args.seed)
        image = from_uint8(pairs["image"][row].numpy(), device)  # (B, 3, H, W)
        batch = {"joints": pairs["joints"][row].to(device)}  # (B, 55, 3)
        res = image.shape[-1]
        noise = torch.randn((len(row), NUM_VIEWS, LATENT_CHANNELS, res, res), generator=generator).to(device)
        plan = plan_chain(args.method, args.num_steps, args.grad_steps, args.early_stop_max, generator)
        lr = args.lr * min(1.0, (step + 1) / args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device):
            views, kl = sample_with_grad(unet, image, noise, plan, guidance, alphas, args.num_steps, frozen)
        rewards, parts = reward_fn(views, batch, ctx)
        loss = drpose_loss(rewards, kl, args.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(trainable, args.grad_clip)
        optimizer.step()
        step += 1
        bar.update(1)

        if step % args.log_every == 0 or step == args.steps:
            line = dict(step=step, loss=round(loss.item(), 5), reward=round(rewards.mean().item(), 5),
                        kl=round(kl.mean().item(), 6), grad_norm=round(float(grad_norm), 5), lr=lr,
                        grad_steps=list(plan.grad_steps), stop=plan.stop,
                        sec_per_step=round((time.time() - tick) / args.log_every, 3),
                        parts={k: round(v.mean().item(), 5) for k, v in parts.items()})
            if eval_inputs is not None and accelerator.is_main_process and \
                    (step % args.eval_every == 0 or step == args.steps):
                unet.eval()
                line.update(eval_reward=eval_reward(plain, eval_inputs, reward_fn, ctx, args, guidance, alphas, device),
                            eval_reward_base=base_eval)
                unet.train()
            bar.set_postfix({k: line[k] for k in ("reward", "kl") + (("eval_reward",) if "eval_reward" in line else ())})
            if accelerator.is_main_process:
                _append_log(metrics_path, line)
            tick = time.time()
        if step % args.checkpoint_every == 0 or step == args.steps:
            rng_states = gather_object([_rng_to_str(generator.get_state())])
            if accelerator.is_main_process:
                save_checkpoint(ckpt_root, step, plain, optimizer, rng_states, dict(record, resume_key=expect),
                                args.keep_checkpoints)
            accelerator.wait_for_everyone()
        if hook is not None:
            hook(step)
    bar.close()

    # --- save: a plain diffusers folder (LoRA merged) + the adapter itself + log + curve ---
    if accelerator.is_main_process:
        with atomic_dir(args.out) as tmp:
            save_drpose(tmp, plain.eval(), dict(record, step=step, eval_reward_base=base_eval), args.lora_rank > 0)
            if metrics_path.exists():
                shutil.copy(metrics_path, tmp / "metrics.jsonl")
                reward_curve(metrics_path, tmp / "reward_curve.png")
    accelerator.wait_for_everyone()
    return Path(args.out)


def save_drpose(folder: Path, unet, record: dict, has_lora: bool) -> None:
    """`folder/` loads with `UNet2DConditionModel.from_pretrained(folder)` (adapters merged into
    the weights); `folder/lora/` holds the adapter alone: on top of base/,
    `unet.load_lora_adapter("drpose/lora", prefix=None, weight_name="pytorch_lora_weights.safetensors")`."""
    import copy

    if has_lora:
        unet.save_lora_adapter(folder / "lora")
        unet = copy.deepcopy(unet)
        unet.fuse_lora()
        unet.unload_lora()
    save_model(folder, unet, record)


def reward_curve(metrics_path: Path, png: Path) -> None:
    """Training reward per logged step, and the fixed-input evaluation reward against the base's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([x["step"] for x in lines], [x["reward"] for x in lines], label="training batch reward", alpha=0.6)
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
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------------

def main(args: PretrainArgs | DrposeArgs) -> None:
    start = time.time()
    out = drpose(args) if isinstance(args, DrposeArgs) else pretrain(args)
    print(f"wrote {out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main, Command)
