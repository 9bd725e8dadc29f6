"""Seconds per DrPose step, plain loop vs the fast CUDA path, lever by lever, in one run.

    python bench/drpose_step.py                                      # CPU, demo, plain vs default path
    python bench/drpose_step.py --device cuda --presets demo full --levers --steps 20 \
        --json bench/results/drpose_step_h200.json                   # the table in the README
    python bench/drpose_step.py --device cuda --presets paper --steps 20   # the paper's workload (random weights)
    python bench/drpose_step.py --device cuda --presets paper_per_view     # the same with per-view attention

Builds randomly initialised models of each preset's size (no run folder needed): the base U-Net with
the preset's LoRA, a g_skel of the reward preset's size and PoseScore against random joints (the
paper workload: an SD2.1-size U-Net, 866 M parameters, 2 subjects x 12 latents (6 views x colour and
normal) of 4 x 96 x 96 with row-wise multi-view self-attention (pretrain.RowWiseMultiViewAttnProcessor; the
`paper_per_view` preset gives each latent its own attention, as this workload was measured before), T 20, the
chain stopped after 16 steps, K 2, KL, a mean-value reward: the paper's g_skel reads decoded images, and no VAE
decoder is in this workload yet). Every
configuration starts from the same weights and runs the same plans and noise: a few warm-up steps
(capture and compile happen there; their time is reported), then `--steps` timed steps. A step is
what finetune.py's loop does: sample with grad, reward, loss, backward, clip, AdamW.

The step's model FLOPs are counted by torch.utils.flop_counter over one eager step of each plan length (gradient
checkpointing off, so no recomputation is counted: the model's FLOPs, not the hardware's); each configuration's
line then prints its TFLOP/s (the timed steps' FLOPs over their time) and its MFU, that rate as a share of
`--peak-tflops` (default: the GPU's dense bf16 peak where known, 989 on an H100 or H200; none on a CPU). The
paper preset's step, which does not fit without checkpointing, is counted on one subject and multiplied by the
batch.

Configurations: the levers, each added to the ones before it (`--levers` runs them all), and `fast`:
  plain           bench/plain_chain.py (the loop before the fast path): eager, int timesteps, frozen
                  pass = adapters off, gradient checkpointing on (the old cuda default), foreach AdamW
  no_ckpt         + gradient checkpointing off (every lever below keeps it off)
  bf16_frozen     + finetune.sample_with_grad: device timesteps, frozen pass = plumbing.frozen_bf16 copy
  graphs          + CUDA graphs of the no-grad U-Net calls (plumbing.GraphedCall)
  fused_adamw     + AdamW(fused=True)
  cudnn_benchmark + torch.backends.cudnn.benchmark
  channels_last   + channels_last weights
  compile         + torch.compile of the trained U-Net, the frozen copy and g_skel (`--compile`)
  fast            finetune.py's default cuda path: bf16_frozen + graphs + fused_adamw, gradient
                  checkpointing only for U-Nets over 100 M parameters (the paper's; full peaks at 60 GiB)
"""

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import finetune as ft  # noqa: E402
import plumbing  # noqa: E402
import posescore  # noqa: E402
import prepare_data as pd  # noqa: E402
import pretrain  # noqa: E402
from plain_chain import sample_with_grad_plain  # noqa: E402

CHECKPOINT_ABOVE = 1e8  # U-Nets over this many parameters always train with gradient checkpointing (the paper's)
DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense (no sparsity) peaks, by GPU name

LEVERS = ["plain", "no_ckpt", "bf16_frozen", "graphs", "fused_adamw", "cudnn_benchmark", "channels_last", "compile"]

# SD 2.1's U-Net (866 M parameters) with our conditioning: image concatenated (4 + 3 channels),
# 8 x 8 image patches as cross-attention tokens through encoder_hid_proj, views as class labels.
PAPER_UNET = dict(sample_size=96, in_channels=4 + 3, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2,
                  attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                  norm_num_groups=32, encoder_hid_dim=3 * 12 * 12 + pretrain.POS_DIM, encoder_hid_dim_type="text_proj",
                  num_class_embeds=12)


def workload(preset: str, device: str, batch: int) -> dict:
    """Models, data and sampling settings of one preset, on `device`."""
    torch.manual_seed(0)
    if preset in ("paper", "paper_per_view"):
        with torch.device(device):
            unet = pretrain.UNet2DConditionModel(**PAPER_UNET)
        # paper: multi-view attention in the row-wise form (each token attends to its row in all 12 latents, as
        # PSHuman and Era3D do: attention over all 12 x 9216 tokens would not fit); paper_per_view: each latent alone
        pretrain.set_view_attention(unet, 12, multi_view=preset == "paper", row_wise=True)
        return dict(unet=unet, ctx=None, reward=lambda views, batch, ctx: (views.float().mean((1, 2, 3, 4)), {}),
                    lora_rank=16, lr=5e-4, ddim_steps=20, guidance=1.0, early_stop_max=4, fixed_stop=15,
                    batch=2, views=12, channels=4, res=96)
    model, run = pretrain.Args(preset=preset).resolved(), ft.Args(preset=preset).resolved()
    res = pd.PRESETS[preset]["resolution"]
    unet = pretrain.build_unet(pretrain.unet_config(res, model.channels, model.layers_per_block, model.attn_levels,
                                                    model.heads, model.token_dim)).to(device)
    gskel = posescore.build_gskel(res, posescore.PRESETS[preset]["channels"]).to(device).eval().requires_grad_(False)
    width = posescore.PRESETS[preset]["width"]
    ctx = posescore.RewardContext(gskel=gskel, resolution=res, width=width, device=torch.device(device))
    return dict(unet=unet, ctx=ctx, reward=posescore.posescore_reward, lora_rank=run.lora_rank, lr=run.lr,
                ddim_steps=model.ddim_steps, guidance=model.guidance, early_stop_max=round(0.4 * model.ddim_steps),
                fixed_stop=None, batch=batch, views=pd.NUM_VIEWS, channels=pretrain.LatentCodec.channels, res=res)


def inputs(w: dict, count: int, device: str) -> list:
    """`count` steps of (image, joints, noise, plan), the same for every configuration."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        image = torch.rand(w["batch"], 3, w["res"], w["res"], generator=gen).to(device)
        joints = (torch.randn(w["batch"], 55, 3, generator=gen) * 0.3).to(device)
        noise = torch.randn(w["batch"], w["views"], w["channels"], w["res"], w["res"], generator=gen).to(device)
        plan = ft.plan_chain("drtune", w["ddim_steps"], 2, w["early_stop_max"], gen)
        if w["fixed_stop"] is not None:  # the paper workload: always 16 executed steps, K = 2 spread over them
            offset = int(torch.randint(8, (1,), generator=gen))
            plan = ft.ChainPlan(w["fixed_stop"], (offset, offset + 8), True)
        out.append((image, {"image": image, "joints": joints}, noise, plan))
    return out


def step_flops(w: dict, step: tuple, device: str) -> int:
    """Model FLOPs of one DrPose step (sample with grad, reward, backward) as torch.utils.flop_counter counts them
    over one eager step without gradient checkpointing: matmuls, convolutions and attention, forward and backward,
    no recomputation. A U-Net over CHECKPOINT_ABOVE parameters (the paper's) is counted on the step's first subject
    and the count multiplied by the batch: every term is per subject, and the whole batch would not fit."""
    image, batch, noise, plan = step
    scale = 1
    if w["unet"].num_parameters() > CHECKPOINT_ABOVE and len(image) > 1:
        scale, image, noise = len(image), image[:1], noise[:1]
        batch = {k: v[:1] for k, v in batch.items()}
    torch.manual_seed(0)
    unet = ft.add_lora(copy.deepcopy(w["unet"]), w["lora_rank"]).train()
    alphas, codec = pretrain.alphas_cumprod().to(device), pretrain.LatentCodec()
    with FlopCounterMode(display=False) as counter:
        with plumbing.autocast(torch.device(device)):
            views, eps_gaps = ft.sample_with_grad(unet, image, noise, plan, w["guidance"], alphas, w["ddim_steps"],
                                                  codec, reference=ft.Reference(unet))
        rewards, _ = w["reward"](views, batch, w["ctx"])
        ft.drpose_loss(rewards, ft.kl_term(eps_gaps), 0.01).backward()
    del unet
    return counter.get_total_flops() * scale


def plan_flops(w: dict, steps: list, device: str) -> list[int]:
    """step_flops of every step, counted once per distinct plan length (the chain's stop and its grad steps'
    count: the DrTune plan detaches each grad step's input, so where they lie does not change the count)."""
    length = lambda plan: (plan.stop, len(plan.grad_steps), plan.detach_input)  # noqa: E731
    counted = {}
    for step in steps:
        if length(step[3]) not in counted:
            counted[length(step[3])] = step_flops(w, step, device)
    return [counted[length(step[3])] for step in steps]


def run_config(name: str, w: dict, steps: list, warmup: int, device: str, write, profile=False,
               flops: list | None = None, peak_tflops: float | None = None) -> dict:
    cuda = device == "cuda"
    if name == "fast":  # finetune.py's default on cuda
        on = set(LEVERS[:LEVERS.index("fused_adamw") + 1])
        checkpointing = cuda and w["unet"].num_parameters() > CHECKPOINT_ABOVE
    else:
        on = set(LEVERS[:LEVERS.index(name) + 1])
        checkpointing = (name == "plain" and cuda) or w["unet"].num_parameters() > CHECKPOINT_ABOVE  # SD-size needs it
    base = copy.deepcopy(w["unet"])
    ctx = copy.copy(w["ctx"])
    frozen_copy = plumbing.frozen_bf16(base) if "bf16_frozen" in on and cuda else None
    torch.manual_seed(0)
    unet = ft.add_lora(base, w["lora_rank"])
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    torch.backends.cudnn.benchmark = "cudnn_benchmark" in on
    if "channels_last" in on:
        for module in (unet, frozen_copy or unet) + ((ctx.gskel,) if ctx else ()):
            module.to(memory_format=torch.channels_last)
    if "compile" in on:
        unet.compile()
        frozen_copy.compile()
        if ctx:
            ctx.gskel = torch.compile(ctx.gskel)
    reference, nograd_call = ft.Reference(unet, frozen_copy), pretrain.guided_output
    if "graphs" in on and cuda:  # as finetune.drpose builds them: two graphs, one memory pool
        pool = torch.cuda.graph_pool_handle()
        reference = ft.Reference(unet, frozen_copy, plumbing.GraphedCall(pretrain.guided_output, frozen_copy, pool))
        nograd_call = plumbing.GraphedCall(pretrain.guided_output, unet, pool)
    codec = pretrain.LatentCodec()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=w["lr"], weight_decay=0.0, fused=("fused_adamw" in on and cuda) or None)
    alphas = pretrain.alphas_cumprod().to(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    def one_step(image, batch, noise, plan) -> torch.Tensor:
        """finetune.py's loop body: sample with grad, reward, loss, backward, clip, AdamW."""
        with plumbing.autocast(torch.device(device)):
            if "bf16_frozen" in on:
                views, eps_gaps = ft.sample_with_grad(unet, image, noise, plan, w["guidance"], alphas, w["ddim_steps"],
                                                      codec, reference=reference, nograd_call=nograd_call)
                kl = ft.kl_term(eps_gaps)
            else:
                views, kl = sample_with_grad_plain(unet, image, noise, plan, w["guidance"], alphas, w["ddim_steps"],
                                                   reference)
        rewards, _ = w["reward"](views, batch, ctx)
        loss = ft.drpose_loss(rewards, kl, 0.01)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        return loss

    times, losses = [], []
    for image, batch, noise, plan in steps:
        start = time.perf_counter()
        loss = one_step(image, batch, noise, plan)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    if profile and cuda:  # where the GPU time of one more step goes
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            one_step(*steps[-1])
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    timed = times[warmup:]
    median = statistics.median(timed)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    result = dict(s_per_step=round(median, 4), samples_per_s=round(w["batch"] / median, 2),
                  spread=[round(min(timed), 4), round(max(timed), 4)], steps_timed=len(timed),
                  warmup_s=round(sum(times[:warmup]), 2), peak_gib=round(peak, 2) if peak else None,
                  first_losses=[round(x, 5) for x in losses[:3]])
    if flops:  # the timed steps' FLOPs over their time: plans differ in length from step to step
        result["tflops_per_s"] = round(sum(flops[warmup:len(times)]) / sum(timed) / 1e12, 3)
        result["mfu"] = round(result["tflops_per_s"] / peak_tflops, 4) if peak_tflops else None
    write(result)
    rate = (f"  {result['tflops_per_s']:7.2f} TFLOP/s" + (f" MFU {result['mfu']:.1%}" if result.get("mfu") else "")
            if flops else "")
    print(f"  {name:14s} {median:8.4f} s/step  {w['batch'] / median:8.1f} samples/s  peak "
          f"{peak or 0:6.2f} GiB{rate}  warm-up {result['warmup_s']:6.1f} s  losses {result['first_losses']}", flush=True)
    del unet, frozen_copy, reference, nograd_call, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--presets", nargs="+", default=["demo"], choices=["demo", "full", "paper", "paper_per_view"])
    parser.add_argument("--batch", type=int, default=16, help="subjects per step (demo/full; paper: 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lever-steps", type=int, help="timed steps for every configuration but fast")
    parser.add_argument("--levers", action="store_true", help="every lever in turn, else plain and fast")
    parser.add_argument("--compile", action="store_true", help="also the torch.compile lever")
    parser.add_argument("--configs", nargs="*", help="these configurations only (names in LEVERS)")
    parser.add_argument("--profile", nargs="*", default=[], help="print the top GPU kernels of these configurations")
    parser.add_argument("--json", type=Path, help="append the results to this json file")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak for MFU (default: known GPUs' peak; none on a CPU)")
    parser.add_argument("--no-flops", action="store_true", help="skip counting the step's FLOPs")
    args = parser.parse_args()
    names = args.configs or (LEVERS[:7] + (["compile"] if args.compile else []) + ["fast"] if args.levers
                             else ["plain", "fast"])
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    head = dict(gpu=gpu, torch=torch.__version__, diffusers=pretrain.diffusers.__version__,
                command="python " + " ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M"),
                commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                      cwd=REPO).stdout.strip() if (REPO / ".git").exists() else "not a git checkout")
    peak_tflops = args.peak_tflops or next((v for k, v in DENSE_BF16_TFLOPS.items() if k in gpu), None)
    print(f"{gpu}, torch {torch.__version__}, threads {torch.get_num_threads()}"
          + (f", dense bf16 peak {peak_tflops:g} TFLOP/s" if peak_tflops else ""))
    head["peak_tflops"] = peak_tflops
    results = dict(head, presets={})
    for preset in args.presets:
        w = workload(preset, args.device, args.batch)
        steps = inputs(w, args.warmup + args.steps, args.device)
        table = results["presets"].setdefault(preset, {})
        flops = None if args.no_flops else plan_flops(w, steps, args.device)  # (steps,) one per step
        mean_flops = statistics.mean(flops[args.warmup:]) if flops else None
        results.setdefault("step_tflop", {})[preset] = round(mean_flops / 1e12, 4) if flops else None
        print(f"{preset}: batch {w['batch']} x {w['views']} views, {w['res']} px, T {w['ddim_steps']}, guidance "
              f"{w['guidance']}, LoRA r{w['lora_rank']}, U-Net {w['unet'].num_parameters() / 1e6:.1f} M"
              + (f", {mean_flops / 1e12:.3f} TFLOP a timed step (mean over their plans)" if flops else ""), flush=True)
        for name in names:
            def write(result, name=name):  # after every configuration: a killed run keeps what it measured
                table[name] = result
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(results, indent=1))
            count = args.steps if args.lever_steps is None or name == "fast" else args.lever_steps
            try:
                run_config(name, w, steps[:args.warmup + count], args.warmup, args.device, write, name in args.profile,
                           flops, peak_tflops)
            except Exception as err:  # one failing lever must not lose the others' numbers
                print(f"  {name:14s} FAILED: {type(err).__name__}: {str(err)[:300]}", flush=True)
                write(dict(error=f"{type(err).__name__}: {str(err)[:300]}"))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
