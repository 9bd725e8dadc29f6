"""Stage 4: DrPose, direct reward fine-tuning of the multi-view model on (pose, single image) pairs.

    python finetune.py --preset demo                   # LoRA on base/, PoseScore reward (CPU, ~3 minutes)
    python finetune.py --preset full                   # one GPU
    python finetune.py --reward keypoints              # any name in posescore.REWARDS
    python finetune.py --reward my_rewards.py:mask_iou # a reward function in your own file (README)
    python finetune.py --resume                        # continue from the newest drpose_ckpt/step_*/
    python finetune.py --resume --max-minutes 8        # one job of a chain of short jobs (bench/gpu_chain.sh)
    accelerate launch finetune.py --preset full        # several GPUs, the same code

One training step (`drpose_step`): draw a batch of (pose, image) pairs; sample the six views from each
image with the base model's DDIM chain, keeping only part of the chain in the autograd graph; score the
views with a reward (PoseScore: how well g_skel's skeleton maps of the views match the pose); step the
LoRA weights to raise the reward, with a KL term that keeps the noise predictions near the starting model's.

Vocabulary (DRaFT, DRTune, AlignProp), each one flag:
  T  `--ddim-steps`      DDIM steps of the sampled chain (paper: 20)
  K  `--grad-steps`      steps whose U-Net output stays in the graph (paper: 2); the rest run without grad
  m  `--early-stop-max`  the chain may stop r ~ U{0..m} steps early and take x0 from there (paper: 8 of 20)
  `--method drtune`      DrPose's choice (DRTune): the U-Net input is detached at every step, so the
                         weights get gradients only through the K noise predictions, never through the
                         U-Net's Jacobian along the chain; K steps spread over the executed chain
  `--method draft`       DRaFT-K: the last K steps in the graph, inputs not detached, full chain
  `--method alignprop`   AlignProp: a random number of last steps in the graph, full chain
Loss (written once, `drpose_loss`): (1 - r) + w_KL * ||eps_trained - eps_frozen||^2 at the K steps
[+ w_real * the frozen base's denoising error on the views, `--realism-weight`, not in the paper]
[+ w_anchor * the diffusion loss on the base's own scans, `--anchor-weight`, not in the paper].
The frozen starting model (`Reference`) is, on CUDA, a bf16 copy made before training (LoRA included:
no adapter toggling inside the chain); on the CPU, with LoRA, the same network with its adapters
switched off; full fine-tuning on the CPU keeps a float32 copy.

Reads base/ (pretrain.py), posescore/ (posescore.py) and data/drpose/ (poses + single images only:
DrPose never reads multi-view ground truth). Writes drpose/ (merged diffusers U-Net + lora/ adapter +
metrics.jsonl) and drpose_ckpt/step_NNNNNN/ checkpoints (the run scaffold: plumbing.TrainingRun).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import torch
from peft import LoraConfig

import posescore
from plumbing import (SEED_MAX, GraphedCall, TrainingRun, UserError, autocast, check_device, check_number,
                      checkpoint_root, frozen_bf16, guard_output, jsonable, provenance, run_cli, run_relative, step_rows,
                      with_preset)
from prepare_data import load_split
from pretrain import (MAX_BATCH, MAX_EVAL, MAX_GUIDANCE, MAX_STEPS, SCHEDULER, LatentCodec, batch_latents,
                      clip_prediction, ddim_step, denoising_error, device_timesteps, diffusion_loss, guided_output,
                      load_model, load_multiview, sample_views, save_model, split_v, weights_sha256)


@dataclass
class Args:
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
    """a name in posescore.REWARDS, or module:function / path/to/file.py:function (higher is better)"""
    reward_dir: Path | None = None
    """the reward's network, a g_skel folder (default: <run-dir>/posescore)"""
    lpips_weights: Path | None = None
    """the paper's second PoseScore term: a local TorchScript LPIPS file (posescore.load_perceptual); off by default"""
    perceptual_weight: float = 1.0
    """weight of that perceptual term in PoseScore"""
    method: Literal["drtune", "draft", "alignprop"] = "drtune"
    """drtune: detached inputs, K spread steps, early stop (DrPose); draft: last K steps;
    alignprop: a random number of last steps"""
    ddim_steps: int | None = None
    """T: DDIM steps of the sampled chain (default: the base model's inference setting; paper: 20)"""
    grad_steps: int = 2
    """K: steps whose U-Net output stays in the graph (paper: 2)"""
    early_stop_max: int | None = None
    """m: the chain stops after T - r steps, r ~ U{0..m}, taking x0 from there (drtune only;
    default 0.4 T, the paper's 8 of 20)"""
    kl_weight: float = 0.01
    """w_KL on the squared noise-prediction difference to the frozen model at the K steps (paper: 0.01)"""
    realism_weight: float = 0.0
    """weight of the realism penalty, the frozen base's denoising error on the generated views
    (`realism_penalty`; not in the paper: 0 is the paper's method)"""
    realism_t_range: tuple[int, int] = (50, 950)
    """timesteps at which the generated views are re-noised for the realism penalty"""
    anchor_weight: float = 0.0
    """weight of the data anchor: the diffusion loss on the scans the base learnt (data/scans/train.npz, never
    the DrPose poses' GT), as in DDRL and ControlNet++: the generator stays on its manifold (not in the paper)"""
    guidance: float | None = None
    """classifier-free guidance while sampling for the reward (default: the base model's inference value)"""
    lora_rank: int | None = None
    """LoRA rank through peft; 0 fine-tunes the whole U-Net with a frozen copy for the KL term (demo 8, full 16)"""
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
    """recompute U-Net activations in the backward pass (default: on for cuda and U-Nets over 100 M parameters)"""
    cuda_graphs: bool = True
    """on cuda, replay the chain's no-grad U-Net calls from CUDA graphs (plumbing.GraphedCall)"""
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
    max_minutes: float | None = None
    """wall-clock budget of this job: stop with a checkpoint before it runs out; --resume continues"""
    log_every: int = 5
    """steps between log lines (tqdm postfix + metrics.jsonl)"""
    seed: int = 0
    """seeds LoRA init, data order, sampling noise and the chain plans; evaluation noise has its own"""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda; bf16 autocast on cuda"""

    def resolved(self) -> "Args":
        table = PRESETS[self.preset]
        args = with_preset(self, table)
        return dataclasses.replace(args, base=args.base or args.run_dir / "base",
                                   out=args.out or args.run_dir / "drpose").check()

    @property
    def outputs(self) -> tuple[Path, ...]:
        """The model folder this stage writes (and replaces when re-run); checkpoints go next to it."""
        return (self.out or self.run_dir / "drpose",)

    def check(self) -> "Args":
        """Every flag, before any work (one line and exit status 2 for the first bad one)."""
        check_number(self, "steps", 1, high=MAX_STEPS,
                     fix=f"DrPose with no steps would only copy the base model; pass --steps from 1 to {MAX_STEPS}")
        check_number(self, "lora_rank", 0, high=MAX_LORA_RANK,
                     fix=f"pass a LoRA rank from 1 to {MAX_LORA_RANK}, or 0 to fine-tune every weight of the U-Net")
        check_number(self, "batch_size", 1, high=MAX_BATCH)
        train_steps = SCHEDULER["num_train_timesteps"]
        check_number(self, "ddim_steps", 1, high=train_steps)
        check_number(self, "grad_steps", 1, high=self.ddim_steps or train_steps,
                     fix="K steps in the graph cannot exceed the T steps of the chain; lower --grad-steps or raise "
                         "--ddim-steps")
        check_number(self, "early_stop_max", 0, high=(self.ddim_steps or train_steps) - 1,
                     fix="the chain stops at most T - 1 steps early; lower --early-stop-max or raise --ddim-steps")
        check_number(self, "warmup_steps", 1, high=MAX_STEPS)
        for name in ("eval_every", "checkpoint_every", "log_every"):
            check_number(self, name, 1)
        check_number(self, "keep_checkpoints", 1, high=1000)
        check_number(self, "num_eval", 0, high=MAX_EVAL)
        for name in ("kl_weight", "perceptual_weight", "realism_weight", "anchor_weight"):
            check_number(self, name, 0, high=MAX_LOSS_WEIGHT)
        check_number(self, "guidance", 0, high=MAX_GUIDANCE)
        check_number(self, "seed", 0, high=SEED_MAX)
        check_number(self, "lr", 0, above=True, high=1)
        check_number(self, "grad_clip", 0, above=True, high=1e6)
        check_number(self, "max_minutes", 0, above=True, high=1e6,
                     fix="pass the job's wall-clock budget in minutes, > 0, or leave --max-minutes out")
        low, high = self.realism_t_range
        if not 0 <= low <= high < train_steps:
            raise UserError(f"--realism-t-range {low} {high} is not an ordered range of timesteps: it must be "
                            f"0 <= low <= high <= {train_steps - 1}; pass e.g. --realism-t-range 50 950")
        posescore.resolve_reward(self.reward)
        check_device(self.device, allow_auto=True)
        guard_output(self.outputs[0], "--out", "finetune")
        guard_output(checkpoint_root(self.outputs[0]), "--out", "finetune", whole=False)
        return self


MAX_LORA_RANK = 1024  # beyond the widest layer a rank adds parameters and nothing else
MAX_LOSS_WEIGHT = 1e6  # kl, perceptual, realism and anchor weights

PRESETS = {
    "demo": dict(lora_rank=8, steps=100, batch_size=4, lr=2e-3, eval_every=50, num_eval=8, checkpoint_every=50),
    "full": dict(lora_rank=16, steps=1500, batch_size=16, lr=5e-4, eval_every=250, num_eval=32, checkpoint_every=500),
}


# --- the method: LoRA, the chain plan, the frozen reference, sampling with gradients, the loss --------
# LoRA on attention projections and on the resnet convolutions: at demo size most of the U-Net is
# convolutions (attention sits only at the deepest level), and pose lives in their weights too.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def add_lora(unet, rank: int):
    """Attach a peft LoRA adapter (B initialised to zero, so the model starts exactly at base)."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=LORA_TARGETS))
    return unet


class ChainPlan(NamedTuple):
    """The random choices of one training step, drawn once per step and logged."""
    stop: int  # index of the last executed DDIM step; its x0 prediction is the sample
    grad_steps: tuple[int, ...]  # step indices whose U-Net output stays in the graph
    detach_input: bool  # the U-Net sees x.detach() at every step (DRTune) or x itself


def plan_chain(method: str, ddim_steps: int, grad_steps: int, early_stop_max: int,
               generator: torch.Generator) -> ChainPlan:
    """drtune: run T - r steps, r ~ U{0..m}; K grad steps evenly spaced with a random offset over
    the executed steps, early ones included; every U-Net input detached, so the weights get
    gradients only through those K outputs, never through the U-Net's Jacobian along the chain.
    draft: the full chain, the last K steps in the graph, inputs not detached (DRaFT-K).
    alignprop: the full chain, the last k ~ U{1..T} steps in the graph, not detached (AlignProp)."""
    def draw(high: int) -> int:  # uniform integer in [0, high)
        return int(torch.randint(high, (1,), generator=generator))

    if method == "drtune":
        executed = ddim_steps - draw(min(early_stop_max, ddim_steps - 1) + 1)
        k = min(grad_steps, executed)
        spacing = executed // k
        offset = draw(spacing)
        return ChainPlan(executed - 1, tuple(offset + j * spacing for j in range(k)), True)
    k = min(grad_steps, ddim_steps) if method == "draft" else 1 + draw(ddim_steps)
    return ChainPlan(ddim_steps - 1, tuple(range(ddim_steps - k, ddim_steps)), False)


class Reference:
    """The starting model, frozen: what the KL term and the realism penalty ask. `frozen_copy`: a copy
    made before the first update (on CUDA always, a bf16 one, LoRA included; for full fine-tuning on
    the CPU a float32 one); without one (LoRA on the CPU) it is `trained` with its adapters switched
    off. `call` runs its U-Net calls in the chain (a plumbing.GraphedCall on the CUDA fast path)."""

    def __init__(self, trained, frozen_copy=None, call: Callable = guided_output):
        self.trained, self.frozen_copy, self.call = trained, frozen_copy, call

    @contextmanager
    def network(self):
        """The frozen network, for the length of the block."""
        if self.frozen_copy is not None:
            yield self.frozen_copy
            return
        self.trained.disable_adapters()
        try:
            yield self.trained
        finally:
            self.trained.enable_adapters()

    @torch.no_grad()
    def output(self, x_t: torch.Tensor, t: torch.Tensor, image: torch.Tensor, guidance: float) -> torch.Tensor:
        """The frozen model's guided output v at x_t (see `pretrain.guided_output`)."""
        with self.network() as network:
            return self.call(network, x_t, t, image, guidance)


def sample_with_grad(unet, image: torch.Tensor, noise: torch.Tensor, plan: ChainPlan, guidance: float,
                     alphas: torch.Tensor, ddim_steps: int, codec: LatentCodec, *, reference: Reference,
                     nograd_call: Callable = guided_output) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`sample_views`' DDIM chain under a plan. image (B, 3, H, W) in [0, 1], noise (B, V, C, h, w).
    Returns the views (B, V, 6, H, W) in [-1, 1], decoded by the model's codec as in `sample_views`,
    differentiable through the plan's grad steps; and at each grad step eps_trained - eps_frozen
    (B, V, C, h, w), `reference` asked at the same input: what the loss's KL term is made of.
    `nograd_call` runs the trained model's no-grad calls (a plumbing.GraphedCall on the CUDA fast path)."""
    steps = device_timesteps(ddim_steps, len(alphas), alphas.device)  # (T,): steps[i:i + 1] needs no host copy
    x, eps_gaps = noise, []
    for i in range(plan.stop + 1):
        t = steps[i:i + 1]
        in_graph = i in plan.grad_steps
        # Only the U-Net call is in or out of the graph; the DDIM arithmetic always stays in it.
        with torch.set_grad_enabled(in_graph):
            out = (guided_output if in_graph else nograd_call)(unet, x.detach() if plan.detach_input else x,
                                                               t, image, guidance)
        pred = split_v(out, x, t, alphas)
        if in_graph:
            frozen_out = reference.output(x.detach(), t, image, guidance)
            # eps = sqrt(a) v + sqrt(1-a) x: the eps difference is sqrt(a) times the v difference.
            eps_gaps.append(alphas[t].to(x.dtype).sqrt() * (pred.out - frozen_out))
        pred = clip_prediction(pred, x, t, alphas, codec.clip_range)
        if i == plan.stop:  # the last executed step (early stop or not): take x0 directly
            return codec.decode(pred.x0.float()), eps_gaps
        x = ddim_step(pred.x0.float(), pred.eps.float(), alphas[steps[i + 1:i + 2]].float())
    raise AssertionError("plan.stop lies beyond the chain")


def realism_penalty(reference: Reference, codec: LatentCodec, views: torch.Tensor, image: torch.Tensor,
                    alphas: torch.Tensor, t_range: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(B,) the starting model's denoising error on the generated views (`pretrain.denoising_error`).
    Views the base finds unlikely (a reward network's adversarial strokes, blobs) cost more than views
    it could have drawn. The gradient reaches the views only; checkpointing is off for this pass, as
    its recomputation in backward would run with the adapters on again. On CUDA it runs under bf16 autocast,
    as every other U-Net call does: the frozen copy there is bf16, and float32 views must meet it cast."""
    with reference.network() as network, autocast(views.device):
        checkpointing = network.is_gradient_checkpointing
        network.disable_gradient_checkpointing()
        try:
            return denoising_error(network, codec.encode(views), image, alphas, t_range, generator)
        finally:
            if checkpointing:
                network.enable_gradient_checkpointing()


def kl_term(eps_gaps: list[torch.Tensor]) -> torch.Tensor:
    """(B,) the KL term: ||eps_trained - eps_frozen||^2 (mean over views and pixels), mean over the K steps."""
    kl = eps_gaps[0].new_zeros(eps_gaps[0].shape[0], dtype=torch.float32)
    for gap in eps_gaps:
        kl = kl + gap.float().pow(2).flatten(1).mean(1) / len(eps_gaps)
    return kl


def drpose_loss(rewards: torch.Tensor, kl: torch.Tensor, kl_weight: float, realism: torch.Tensor | None = None,
                realism_weight: float = 0.0, anchor: torch.Tensor | None = None,
                anchor_weight: float = 0.0) -> torch.Tensor:
    """The one place the sign convention lives: rewards are maximised, so the loss is 1 - r; the KL
    term (`kl_term`), the realism penalty and the data anchor's diffusion loss are minimised."""
    loss = (1 - rewards).mean() + kl_weight * kl.mean()
    loss = loss + realism_weight * realism.mean() if realism is not None else loss
    return loss + anchor_weight * anchor if anchor is not None else loss


def drpose_step(batch: dict, unet, reference: Reference, codec: LatentCodec, alphas: torch.Tensor,
                reward_fn: Callable, reward_ctx, args: Args, generator: torch.Generator,
                optimise: Callable[[torch.Tensor], torch.Tensor], nograd_call: Callable = guided_output,
                anchor_batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """One DrPose step on a batch of (pose, image) pair rows (posescore.reward_batch): noise, plan,
    chain, reward, KL, loss, optimiser step (`optimise(loss)`, which returns the gradient norm).
    `anchor_batch`: scan latents and images for the data anchor (--anchor-weight). Returns what the log
    line reports."""
    image = batch["image"]  # (B, 3, H, W) in [0, 1]: all the sampler sees of the pair
    noise = torch.randn(codec.latent_shape(len(image), image.shape[-1]), generator=generator).to(image.device)
    plan = plan_chain(args.method, args.ddim_steps, args.grad_steps, args.early_stop_max, generator)
    with autocast(image.device):
        views, eps_gaps = sample_with_grad(unet, image, noise, plan, args.guidance, alphas, args.ddim_steps, codec,
                                           reference=reference, nograd_call=nograd_call)  # (B, V, 6, H, W)
    rewards, parts = reward_fn(views, batch, reward_ctx)  # (B,), higher is better
    kl = kl_term(eps_gaps)  # (B,)
    realism = realism_penalty(reference, codec, views, image, alphas, args.realism_t_range, generator) \
        if args.realism_weight > 0 else None  # no draws when off, so the paper's runs keep their noise
    with autocast(image.device):  # the data anchor: the ordinary diffusion loss on a batch of the base's scans
        anchor = diffusion_loss(unet, *anchor_batch, alphas, 0.0, generator) if anchor_batch is not None else None
    loss = drpose_loss(rewards, kl, args.kl_weight, realism, args.realism_weight, anchor, args.anchor_weight)
    grad_norm = optimise(loss)
    return dict(loss=loss, rewards=rewards, kl=kl, realism=realism, anchor=anchor, parts=parts, plan=plan,
                grad_norm=grad_norm)


# --- the training pairs: poses and single images, never multi-view ---------------------------------

def load_pairs(run_dir: Path) -> dict:
    """data/drpose/pairs.npz: (pose, single image) pairs, every array. The only training data DrPose reads."""
    return load_split(run_dir / "data/drpose/pairs.npz", expect_keys=("image", "joints"),
                      made_by=f"python prepare_data.py --run-dir {run_dir}")


def load_eval_inputs(run_dir: Path, count: int, device) -> dict | None:
    """The first `count` bench subjects as pair rows (front image, joints, pose, front mask; the
    multi-view GT in the same file is never used). None when data/bench/ is absent."""
    path = run_dir / "data/bench/bench.npz"
    if count <= 0 or not path.exists():
        return None
    arrays = load_split(path, expect_keys=("image", "joints"), made_by=f"python prepare_data.py --run-dir {run_dir}")
    return posescore.reward_batch(arrays, slice(0, count), device)


@torch.no_grad()
def eval_reward(unet, batch: dict, codec: LatentCodec, alphas, reward_fn, reward_ctx, args: Args) -> float:
    """Mean reward of views sampled from fixed inputs with fixed noise (its own generator: the training RNG
    is untouched and every model sees the same noise), in eval mode (the model's mode is restored after)."""
    generator = torch.Generator().manual_seed(args.seed + 777)
    training = unet.training
    unet.eval()
    with autocast(alphas.device):
        views = sample_views(unet, batch["image"], args.ddim_steps, args.guidance, generator, alphas=alphas,
                             codec=codec)
    unet.train(training)
    rewards, _ = reward_fn(views.float(), batch, reward_ctx)
    return rewards.mean().item()


def log_line(out: dict, step: int, args: Args, evaluate: Callable[[], dict] | None) -> dict:
    """The numbers of one log line (the run scaffold adds step, lr and seconds per step)."""
    line = dict(loss=round(out["loss"].item(), 5), reward=round(out["rewards"].mean().item(), 5),
                kl=round(out["kl"].mean().item(), 6), grad_norm=round(float(out["grad_norm"]), 5),
                grad_steps=list(out["plan"].grad_steps), stop=out["plan"].stop,
                parts={k: round(v.mean().item(), 5) for k, v in out["parts"].items()})
    line |= {k: round(out[k].mean().item(), 6) for k in ("realism", "anchor") if out[k] is not None}
    if evaluate is not None and (step % args.eval_every == 0 or step == args.steps):
        line.update(evaluate())
    return line


# --- the loop -------------------------------------------------------------------------------------

def drpose(args: Args, hook: Callable[[int], None] | None = None) -> Path:
    """Fine-tune (or resume), then write <out>/ (merged diffusers U-Net + LoRA adapter + metrics log).
    Stopped by --max-minutes: returns the checkpoint folder, <out>/ is not written."""
    args = args.resolved()
    run_dir = Path(args.run_dir)
    run = TrainingRun("drpose", args.out, args, hook, desc=f"drpose ({args.method})")  # an empty --resume: refused
    device, world = run.device, run.world

    # --- data: (pose, image) pairs; a fixed bench subset for evaluation ---
    pairs = load_pairs(run_dir)
    # The data anchor's six-view scans: the base's own training set, never the DrPose poses' GT.
    anchor_data = load_multiview(run_dir / "data/scans/train.npz", run_dir) if args.anchor_weight > 0 else None
    eval_inputs = load_eval_inputs(run_dir, args.num_eval, device)
    if len(pairs["image"]) < args.batch_size * world:
        raise UserError(f"{run_dir}/data/drpose/pairs.npz has {len(pairs['image'])} pairs, fewer than "
                        f"--batch-size x devices = {args.batch_size * world}")

    # --- models: the base U-Net (LoRA or all weights trainable), its codec and schedule, the frozen reward ---
    unet, codec, alphas, base_config = load_model(args.base, device)
    if base_config["resolution"] != pairs["image"].shape[-1]:
        raise UserError(f"{args.base} is a {base_config['resolution']} px model but data/drpose is "
                        f"{pairs['image'].shape[-1]} px; make both with the same --preset")
    reward_dir = args.reward_dir or run_dir / "posescore"
    reward_ctx = posescore.load_reward_context(reward_dir, device, args.lpips_weights, args.perceptual_weight)
    if reward_ctx.resolution != base_config["resolution"]:
        raise UserError(f"{reward_dir} was trained at {reward_ctx.resolution} px, the model is "
                        f"{base_config['resolution']} px; retrain it with `python posescore.py train --run-dir {run_dir}`")
    reward_fn = posescore.resolve_reward(args.reward)
    # Sample as inference does (the base's DDIM steps and guidance) unless told otherwise.
    sampling = base_config["sampling"]
    ddim_steps = args.ddim_steps or sampling["num_steps"]
    # checked again: --grad-steps and --early-stop-max against the base's number of steps
    args = dataclasses.replace(
        args, ddim_steps=ddim_steps, guidance=sampling["guidance"] if args.guidance is None else args.guidance,
        early_stop_max=round(0.4 * ddim_steps) if args.early_stop_max is None else args.early_stop_max).check()
    # The reward's first call, on the base's views of the first pairs (noise of their own): a malformed or
    # detached reward stops here in one line (posescore.check_reward), before the base evaluation and training.
    first = posescore.reward_batch(pairs, slice(0, args.batch_size), device)
    with torch.no_grad(), autocast(device):
        views = sample_views(unet, first["image"], args.ddim_steps, args.guidance, torch.Generator().manual_seed(
            args.seed), alphas=alphas, codec=codec)
    posescore.check_reward(reward_fn, args.reward, views.float().requires_grad_(True), first, reward_ctx)
    torch.manual_seed(args.seed)
    frozen_copy = frozen_bf16(unet) if run.use_cuda else None  # cuda: a bf16 starting model, no adapter toggling
    if args.lora_rank > 0:
        add_lora(unet, args.lora_rank)
    else:  # full fine-tuning keeps one frozen copy: the only way to ask the starting model
        frozen_copy = frozen_copy or copy.deepcopy(unet).requires_grad_(False)
        unet.requires_grad_(True)
    if args.grad_checkpointing or (args.grad_checkpointing is None and run.use_cuda and unet.num_parameters() > 1e8):
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0, fused=run.use_cuda or None)
    base_eval = eval_reward(unet, eval_inputs, codec, alphas, reward_fn, reward_ctx, args) \
        if eval_inputs is not None and run.is_main else None

    # What must match to resume: the starting model (where, relative to the run folder, and its weights), the
    # reward's network, the method and the data order; never how the run folder is spelled.
    expect = dict(world=world, base=run_relative(args.base, run_dir), base_sha256=weights_sha256(args.base),
                  reward_gskel=run_relative(reward_dir, run_dir), method=args.method, reward=args.reward,
                  lora_rank=args.lora_rank, data=dict(seed=args.seed, batch_size=args.batch_size, pairs=len(pairs["image"])))
    record = dict(base_config, stage="finetune", run=provenance(args), format="drpose-i2mv",
                  trained_on=dict(device=device.type, processes=world), drpose=jsonable(dataclasses.asdict(args)),
                  sampling=dict(sampling, guidance=args.guidance, num_steps=args.ddim_steps))
    generator = torch.Generator().manual_seed(args.seed * 1000 + 17 + run.rank)  # noise, plans, realism draws
    unet, optimizer, step = run.start(unet, optimizer, trainable, generator,
                                      lambda s: args.lr * min(1.0, (s + 1) / args.warmup_steps), expect, record,
                                      trainable_only=args.lora_rank > 0, postfix=("reward", "kl", "eval_reward"))
    trained = run.accelerator.unwrap_model(unet)  # the network itself (DDP wraps it on several GPUs)
    graphed = run.use_cuda and args.cuda_graphs
    pool = torch.cuda.graph_pool_handle() if graphed else None  # one memory pool: the two graphs never run at once
    reference = Reference(trained, frozen_copy, GraphedCall(guided_output, frozen_copy, pool) if graphed
                          else guided_output)
    nograd_call = GraphedCall(guided_output, trained, pool) if graphed else guided_output
    evaluate = (lambda: dict(eval_reward=eval_reward(trained, eval_inputs, codec, alphas, reward_fn, reward_ctx, args),
                             eval_reward_base=base_eval)) if base_eval is not None else None

    # --- train: sample with gradients, score, step ---
    while step < args.steps:
        rows = step_rows(step, len(pairs["image"]), args.batch_size, world, run.rank, args.seed)
        batch = posescore.reward_batch(pairs, rows, device)  # the pair rows: image (B, 3, H, W), joints, mask, ...
        anchor_batch = None if anchor_data is None else batch_latents(anchor_data, step_rows(  # own fixed order
            step, len(anchor_data["image"]), args.batch_size, world, run.rank, args.seed + 1), device, codec)
        out = drpose_step(batch, unet, reference, codec, alphas, reward_fn, reward_ctx, args, generator,
                          run.optimise, nograd_call, anchor_batch)
        step += 1
        if run.end_of_step(step, lambda: log_line(out, step, args, evaluate)):
            break

    # --- save: a plain diffusers folder (LoRA merged) + the adapter itself + the metrics log ---
    record = dict(record, step=step, eval_reward_base=base_eval)
    return run.finish(step, lambda folder: save_drpose(folder, trained.eval(), record, args.lora_rank > 0))


# --- saving: the fine-tuned model and its adapter ------------------------------------------------------

def save_drpose(folder: Path, unet, record: dict, has_lora: bool) -> None:
    """`folder/` loads with `UNet2DConditionModel.from_pretrained(folder)` (adapters merged into
    the weights); `folder/lora/` holds the adapter alone: on top of base/,
    `unet.load_lora_adapter("drpose/lora", prefix=None, weight_name="pytorch_lora_weights.safetensors")`."""
    if has_lora:
        for config in unet.peft_config.values():  # peft keeps a set: sorted, the file does not vary with the hash seed
            config.target_modules = sorted(config.target_modules)
        unet.save_lora_adapter(folder / "lora")
        unet = copy.deepcopy(unet)
        unet.fuse_lora()
        unet.unload_lora()
    save_model(folder, unet, record)


# --- main -----------------------------------------------------------------------------------------

def main(args: Args) -> None:
    start = time.time()
    print(f"wrote {drpose(args)} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main, Args)
