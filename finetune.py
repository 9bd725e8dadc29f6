"""Stage 4: DrPose, direct reward fine-tuning of the multi-view model on (pose, single image) pairs.

    python finetune.py --preset demo                   # LoRA on base/, PoseScore reward (CPU, ~3 minutes)
    python finetune.py --preset full                   # one GPU
    python finetune.py --reward keypoints              # any name in posescore.REWARDS
    python finetune.py --resume                        # continue from the newest drpose_ckpt/step_*/
    python finetune.py --resume --max-minutes 8        # one job of a chain of short jobs (bench/gpu_chain.sh)
    accelerate launch finetune.py --preset full        # several GPUs, the same code

One training step: draw a batch of (pose, image) pairs; sample the six views from each image with the
base model's DDIM chain, keeping only part of the chain in the autograd graph; score the views with a
reward (PoseScore: how well g_skel's skeleton maps of the views match the pose); step the LoRA weights
to raise the reward, with a KL term that keeps the noise predictions near the starting model's.

Vocabulary (DRaFT, DRTune, AlignProp), each one flag:
  T  `--num-steps`       DDIM steps of the sampled chain (paper: 20)
  K  `--grad-steps`      steps whose U-Net output stays in the graph (paper: 2); the rest run without grad
  m  `--early-stop-max`  the chain may stop r ~ U{0..m} steps early and take x0 from there (paper: 8 of 20)
  `--method drtune`      DrPose's choice (DRTune): the U-Net input is detached at every step, so the
                         weights get gradients only through the K noise predictions, never through the
                         U-Net's Jacobian along the chain; K steps spread over the executed chain
  `--method draft`       DRaFT-K: the last K steps in the graph, inputs not detached, full chain
  `--method alignprop`   AlignProp: a random number of last steps in the graph, full chain
Loss (written once, `drpose_loss`): (1 - r) + w_KL * ||eps_trained - eps_frozen||^2 at the K steps
[+ w_real * the frozen base's denoising error on the views, `--realism-weight`, not in the paper].
With LoRA the frozen model is the same network with its adapters switched off.

Reads base/ (pretrain.py), posescore/ (posescore.py) and data/drpose/ (poses + single images only:
DrPose never reads multi-view ground truth). Writes drpose/ (merged diffusers U-Net + lora/ adapter +
metrics.jsonl) and drpose_ckpt/step_NNNNNN/ checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import LoraConfig
from tqdm import tqdm

import posescore
from prepare_data import NUM_VIEWS, from_uint8, load_split
from plumbing import (SEED_MAX, UserError, atomic_dir, check_device, check_number, guard_output, provenance, run_cli,
                      run_relative, with_preset)
from pretrain import (LATENT_CHANNELS, MAX_BATCH, MAX_EVAL, MAX_GUIDANCE, MAX_STEPS, SCHEDULER, GraphedOutput,
                      alphas_cumprod, append_log, autocast, batch_latents, check_finite, checkpoint_root,
                      diffusion_loss, load_multiview,
                      clip_prediction, ddim_step, decode, denoising_error, device_timesteps, encode, frozen_bf16,
                      guided_output, jsonable, latest_checkpoint, load_checkpoint, load_model, out_of_time,
                      rng_from_str, rng_to_str, sample_views, save_checkpoint, save_model, split_v, step_rows,
                      truncate_log, weights_sha256)

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
    """a name in posescore.REWARDS (higher is better)"""
    posescore_dir: Path | None = None
    """the reward's g_skel (default: <run-dir>/posescore)"""
    lpips_weights: Path | None = None
    """the paper's second PoseScore term: a local TorchScript LPIPS file (posescore.load_perceptual); off by default"""
    perceptual_weight: float = 1.0
    """weight of that perceptual term in PoseScore"""
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
    realism_weight: float = 0.0
    """weight of the realism penalty, the frozen base's denoising error on the generated views
    (`realism_penalty`; not in the paper: 0 is the paper's method)"""
    realism_t_range: tuple[int, int] = (50, 950)
    """timesteps at which the generated views are re-noised for the realism penalty"""
    anchor_weight: float = 0.0
    """weight of the data anchor: the ordinary diffusion loss on the scans the base was trained on
    (data/scans/train.npz, never the DrPose poses' GT), added to the reward loss as in DDRL and
    ControlNet++, so the generator stays on the manifold it learnt (not in the paper: 0 is the paper's method)"""
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
    """on cuda, replay the chain's no-grad U-Net calls from CUDA graphs (pretrain.GraphedOutput)"""
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
        check_number(self, "num_steps", 1, high=train_steps)
        check_number(self, "grad_steps", 1, high=self.num_steps or train_steps,
                     fix="K steps in the graph cannot exceed the T steps of the chain; lower --grad-steps or raise "
                         "--num-steps")
        check_number(self, "early_stop_max", 0, high=(self.num_steps or train_steps) - 1,
                     fix="the chain stops at most T - 1 steps early; lower --early-stop-max or raise --num-steps")
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
        if self.reward not in posescore.REWARDS:
            raise UserError(f"--reward {self.reward} is not in posescore.REWARDS {sorted(posescore.REWARDS)}; "
                            "pass one of them")
        check_device(self.device, allow_auto=True)
        guard_output(self.outputs[0], "--out", "finetune")
        guard_output(checkpoint_root(self.outputs[0]), "--out", "finetune", own_files=("metrics.jsonl",))
        return self


MAX_LORA_RANK = 1024  # beyond the widest layer a rank adds parameters and nothing else
MAX_LOSS_WEIGHT = 1e6  # kl, perceptual, realism and anchor weights

PRESETS = {
    "demo": dict(lora_rank=8, steps=100, batch_size=4, lr=2e-3, eval_every=50, num_eval=8, checkpoint_every=50),
    "full": dict(lora_rank=16, steps=1500, batch_size=16, lr=5e-4, eval_every=250, num_eval=32, checkpoint_every=500),
}


# --- the method: LoRA, the chain plan, sampling with gradients, the loss -----------------------------
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
                     alphas: torch.Tensor, num_steps: int, frozen: tuple,
                     graphs: tuple = (guided_output, guided_output)) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_views`' DDIM chain under a plan. image (B, 3, H, W) in [0, 1], noise (B, V, 6, H, W).
    Returns the decoded views (B, V, 6, H, W) in [-1, 1] (through the same `decode` seam as
    `sample_views`, so a latent model's reward still reads views), differentiable through the plan's
    grad steps, and the KL term (B,): the squared difference of trained and frozen noise predictions,
    mean over grad steps. `frozen`: (the unwrapped model, None) for LoRA, whose adapters are switched
    off for the frozen pass, or (unused, a frozen copy) for full fine-tuning; see `frozen_model`.
    `graphs`: what runs the no-grad calls of the trained and the frozen model (`GraphedOutput` on cuda)."""
    steps = device_timesteps(num_steps, len(alphas), alphas.device)  # (T,): steps[i:i + 1] needs no host copy
    x = noise
    kl = noise.new_zeros(noise.shape[0])
    for i in range(plan.stop + 1):
        t = steps[i:i + 1]
        in_graph = i in plan.grad_steps
        # Only the U-Net call is in or out of the graph; the DDIM arithmetic always stays in it.
        run = guided_output if in_graph else graphs[0]  # no grad: replayed from a CUDA graph on the fast path
        with torch.set_grad_enabled(in_graph):
            out = run(unet, x.detach() if plan.detach_input else x, t, image, guidance)
        pred = split_v(out, x, t, alphas)
        if in_graph:
            with torch.no_grad(), frozen_model(*frozen) as reference:
                frozen_out = graphs[1](reference, x.detach(), t, image, guidance)
            # eps = sqrt(a) v + sqrt(1-a) x: the eps difference is sqrt(a) times the v difference.
            a = alphas[t].to(x.dtype)
            kl = kl + (a.sqrt() * (pred.out - frozen_out)).float().pow(2).flatten(1).mean(1) / len(plan.grad_steps)
        pred = clip_prediction(pred, x, t, alphas)
        if i == plan.stop:  # the last executed step (early stop or not): take x0 directly
            return decode(pred.x0.float()), kl
        x = ddim_step(pred.x0.float(), pred.eps.float(), alphas[steps[i + 1:i + 2]].float())
    raise AssertionError("plan.stop lies beyond the chain")


def realism_penalty(frozen: tuple, views: torch.Tensor, image: torch.Tensor, alphas: torch.Tensor,
                    t_range: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(B,) the starting model's denoising error on the generated views (`pretrain.denoising_error`).
    Views the base finds unlikely (a reward network's adversarial strokes, blobs) cost more than views
    it could have drawn. The gradient reaches the views only; checkpointing is off for this pass, as
    its recomputation in backward would run with the adapters on again."""
    with frozen_model(*frozen) as reference:
        checkpointing = reference.is_gradient_checkpointing
        reference.disable_gradient_checkpointing()
        try:
            return denoising_error(reference, encode(views), image, alphas, t_range, generator)
        finally:
            if checkpointing:
                reference.enable_gradient_checkpointing()


def drpose_loss(rewards: torch.Tensor, kl: torch.Tensor, kl_weight: float, realism: torch.Tensor | None = None,
                realism_weight: float = 0.0, anchor: torch.Tensor | None = None,
                anchor_weight: float = 0.0) -> torch.Tensor:
    """The one place the sign convention lives: rewards are maximised, so the loss is 1 - r; the KL
    term, the realism penalty and the data anchor's diffusion loss are minimised."""
    loss = (1 - rewards).mean() + kl_weight * kl.mean()
    loss = loss + realism_weight * realism.mean() if realism is not None else loss
    return loss + anchor_weight * anchor if anchor is not None else loss


# --- the training pairs: poses and single images, never multi-view ---------------------------------

def load_pairs(run_dir: Path) -> dict:
    """data/drpose/pairs.npz: (pose, single image) pairs. The only training data DrPose reads."""
    arrays = load_split(run_dir / "data/drpose/pairs.npz", expect_keys=("image", "joints"),
                        made_by=f"python prepare_data.py --run-dir {run_dir}")
    return dict(image=torch.from_numpy(arrays["image"]), joints=torch.from_numpy(arrays["joints"]).float())


def load_eval_inputs(run_dir: Path, count: int) -> dict | None:
    """The first `count` bench inputs: the front image and GT joints only (the multi-view GT in the same
    file is never used). None when data/bench/ is absent."""
    path = run_dir / "data/bench/bench.npz"
    if count <= 0 or not path.exists():
        return None
    arrays = load_split(path, expect_keys=("image", "joints"), made_by=f"python prepare_data.py --run-dir {run_dir}")
    return dict(image=torch.from_numpy(arrays["image"][:count]), joints=torch.from_numpy(arrays["joints"][:count]).float())


@torch.no_grad()
def eval_reward(unet, data: dict, reward_fn, ctx, args: Args, guidance: float, alphas, device) -> float:
    """Mean reward of views sampled from fixed inputs with fixed noise (its own generator, so the
    training RNG is untouched and every call, base or fine-tuned, sees the same noise)."""
    generator = torch.Generator().manual_seed(args.seed + 777)
    image = from_uint8(data["image"].numpy(), device)
    with autocast(device):
        views = sample_views(unet, image, args.num_steps, guidance, generator, alphas=alphas)
    rewards, _ = reward_fn(views.float(), {"joints": data["joints"].to(device)}, ctx)
    return rewards.mean().item()


# --- the loop -------------------------------------------------------------------------------------

def drpose(args: Args, hook: Callable[[int], None] | None = None) -> Path:
    """Fine-tune (or resume), then write <out>/ (merged diffusers U-Net + LoRA adapter + metrics log).
    Stopped by --max-minutes: returns the checkpoint folder, <out>/ is not written."""
    start = time.time()
    args = args.resolved()
    run_dir = Path(args.run_dir)
    if args.resume and latest_checkpoint(Path(str(args.out) + "_ckpt")) is None:  # nothing to continue: refuse
        raise UserError(f"--resume: no complete checkpoint under {args.out}_ckpt; drop --resume to train from step 0 "
                        f"(which replaces {args.out} when done)")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision="bf16" if use_cuda else "no")
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # --- data: (pose, image) pairs; a fixed bench subset for evaluation ---
    pairs = load_pairs(run_dir)
    # The data anchor's six-view scans: the base's own training set, never the DrPose poses' GT.
    anchor_data = load_multiview(run_dir / "data/scans/train.npz", run_dir) if args.anchor_weight > 0 else None
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
    ctx = posescore.load_reward_context(posescore_dir, device, args.lpips_weights, args.perceptual_weight)
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
    args.check()  # --grad-steps and --early-stop-max against the base's number of steps
    alphas = alphas_cumprod(base_config).to(device)
    torch.manual_seed(args.seed)
    frozen_copy = frozen_bf16(unet) if use_cuda else None  # cuda: a bf16 starting model, no adapter toggling
    if args.lora_rank > 0:
        add_lora(unet, args.lora_rank)
    else:  # full fine-tuning keeps one frozen copy: the only way to ask the starting model
        frozen_copy = frozen_copy or copy.deepcopy(unet).requires_grad_(False)
        unet.requires_grad_(True)
    if args.grad_checkpointing or (args.grad_checkpointing is None and use_cuda and unet.num_parameters() > 1e8):
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0, fused=use_cuda or None)
    base_eval = eval_reward(unet.eval(), eval_inputs, reward_fn, ctx, args, guidance, alphas, device) \
        if eval_inputs is not None and accelerator.is_main_process else None
    unet.train()

    ckpt_root = Path(str(args.out) + "_ckpt")
    metrics_path = ckpt_root / "metrics.jsonl"
    # What must match to resume: the starting model (where, relative to the run folder, and its weights), the
    # reward's network, the method and the data order; never how the run folder is spelled.
    expect = dict(world=world, base=run_relative(args.base, run_dir), base_sha256=weights_sha256(args.base),
                  reward_gskel=run_relative(posescore_dir, run_dir), method=args.method, reward=args.reward,
                  lora_rank=args.lora_rank, data=dict(seed=args.seed, batch_size=args.batch_size, pairs=len(pairs["image"])))
    record = dict(base_config, stage="finetune", run=provenance(args), format="drpose-i2mv",
                  drpose=jsonable(dataclasses.asdict(args)),
                  sampling=dict(base_config["sampling"], guidance=guidance, num_steps=args.num_steps))
    step, generator = 0, torch.Generator().manual_seed(args.seed * 1000 + 17 + rank)  # noise + plans
    found = latest_checkpoint(ckpt_root) if args.resume and ckpt_root.exists() else None
    if found is not None:
        step, rng_states = load_checkpoint(found, unet, optimizer, expect)
        generator.set_state(rng_from_str(rng_states[rank]))
        accelerator.print(f"resumed from {found} (step {step})")
    elif ckpt_root.exists() and accelerator.is_main_process:
        shutil.rmtree(ckpt_root)  # a fresh run: stale checkpoints would be resumed by mistake later
    if accelerator.is_main_process:
        truncate_log(metrics_path, step)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    plain = accelerator.unwrap_model(unet)
    frozen = (plain, frozen_copy)
    graphs = GraphedOutput.pair(plain, frozen_copy) if use_cuda and args.cuda_graphs else (guided_output,) * 2

    # --- train: sample with gradients, score, step ---
    bar = tqdm(total=args.steps, initial=step, desc=f"drpose ({args.method})",
               disable=None if accelerator.is_main_process else True)  # None: a bar on a terminal only
    first_step, loop_start = step, time.time()
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
            views, kl = sample_with_grad(unet, image, noise, plan, guidance, alphas, args.num_steps, frozen, graphs)
        rewards, parts = reward_fn(views, batch, ctx)
        realism = realism_penalty(frozen, views, image, alphas, args.realism_t_range, generator) \
            if args.realism_weight > 0 else None  # no draws when off, so the paper's runs keep their noise
        anchor = None
        if anchor_data is not None:  # the ordinary diffusion loss on a batch of scans (their own fixed order)
            scan_views, scan_image = batch_latents(anchor_data, step_rows(step, len(anchor_data["image"]), len(row),
                                                                          world, rank, args.seed + 1), device)
            with autocast(device):
                anchor = diffusion_loss(unet, scan_views, scan_image, alphas, 0.0, generator)
        loss = drpose_loss(rewards, kl, args.kl_weight, realism, args.realism_weight, anchor, args.anchor_weight)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(trainable, args.grad_clip)
        check_finite("drpose", step + 1, loss, grad_norm, ckpt_root)
        optimizer.step()
        step += 1
        bar.update(1)

        if step % args.log_every == 0 or step == args.steps:
            line = dict(step=step, loss=round(loss.item(), 5), reward=round(rewards.mean().item(), 5),
                        kl=round(kl.mean().item(), 6), grad_norm=round(float(grad_norm), 5), lr=lr,
                        grad_steps=list(plan.grad_steps), stop=plan.stop,
                        sec_per_step=round((time.time() - tick) / args.log_every, 3),
                        parts={k: round(v.mean().item(), 5) for k, v in parts.items()})
            if realism is not None:
                line["realism"] = round(realism.mean().item(), 6)
            if anchor is not None:
                line["anchor"] = round(anchor.item(), 6)
            if eval_inputs is not None and accelerator.is_main_process and \
                    (step % args.eval_every == 0 or step == args.steps):
                unet.eval()
                line.update(eval_reward=eval_reward(plain, eval_inputs, reward_fn, ctx, args, guidance, alphas, device),
                            eval_reward_base=base_eval)
                unet.train()
            bar.set_postfix({k: line[k] for k in ("reward", "kl") + (("eval_reward",) if "eval_reward" in line else ())})
            if accelerator.is_main_process:
                append_log(metrics_path, line)
            tick = time.time()
        stop = step < args.steps and out_of_time(start, args.max_minutes, loop_start, step - first_step, accelerator)
        if step % args.checkpoint_every == 0 or step == args.steps or stop:
            rng_states = gather_object([rng_to_str(generator.get_state())])
            if accelerator.is_main_process:  # with LoRA: the adapters + optimizer only, base/ stays where it is
                save_checkpoint(ckpt_root, step, plain, optimizer, rng_states, dict(record, resume_key=expect),
                                args.keep_checkpoints, trainable_only=args.lora_rank > 0)
            accelerator.wait_for_everyone()
        if hook is not None:
            hook(step)
        if stop:
            break
    bar.close()
    if step < args.steps:
        accelerator.print(f"--max-minutes {args.max_minutes}: stopped at step {step}; continue with --resume")
        return ckpt_root / f"step_{step:06d}"

    # --- save: a plain diffusers folder (LoRA merged) + the adapter itself + the metrics log ---
    if accelerator.is_main_process:
        with atomic_dir(args.out) as tmp:
            save_drpose(tmp, plain.eval(), dict(record, step=step, eval_reward_base=base_eval), args.lora_rank > 0)
            if metrics_path.exists():
                shutil.copy(metrics_path, tmp / "metrics.jsonl")
    accelerator.wait_for_everyone()
    return Path(args.out)


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
    out = drpose(args)
    print(f"wrote {out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main, Args)
