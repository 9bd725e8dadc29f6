"""Seconds per DrPose step and peak memory, demo and full presets, on this machine.

    python bench/drpose_step.py                 # CPU: demo (and full model size with --full)
    python bench/drpose_step.py --device cuda --full

Builds a randomly initialised model of each preset's size (no run folder needed), attaches the
preset's LoRA and times `sample_with_grad` + a PoseScore-like reward + backward for a few steps.
Peak memory: torch.cuda.max_memory_allocated on GPU, the process's max RSS on CPU."""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import finetune as ft  # noqa: E402
import pretrain  # noqa: E402
import prepare_data as pd  # noqa: E402


def bench(preset: str, device: str, steps: int) -> None:
    model = pretrain.Args(preset=preset).resolved()
    run = ft.Args(preset=preset).resolved()
    res = pd.PRESETS[preset]["resolution"]
    torch.manual_seed(0)
    unet = pretrain.build_unet(pretrain.unet_config(res, model.channels, model.layers_per_block, model.attn_levels, model.heads,
                                        model.token_dim)).to(device)
    ft.add_lora(unet, run.lora_rank)
    if device.startswith("cuda"):
        unet.enable_gradient_checkpointing()
        torch.cuda.reset_peak_memory_stats()
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=run.lr)
    alphas = pretrain.alphas_cumprod().to(device)
    gen = torch.Generator().manual_seed(0)
    num_steps, times = model.eval_steps, []
    for step in range(steps + 1):  # the first step is a warm-up
        image = torch.rand(run.batch_size, 3, res, res, generator=gen).to(device)
        noise = torch.randn(run.batch_size, pd.NUM_VIEWS, 6, res, res, generator=gen).to(device)
        plan = ft.plan_chain("drtune", num_steps, 2, round(0.4 * num_steps), gen)
        start = time.perf_counter()
        with pretrain.autocast(torch.device(device)):
            views, kl = ft.sample_with_grad(unet, image, noise, plan, model.guidance, alphas, num_steps, (unet, None))
        loss = ft.drpose_loss(views.mean((1, 2, 3, 4)), kl, 0.01)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print(f"{preset:5s} {device:5s} {res} px batch {run.batch_size} T={num_steps} g={model.guidance} "
          f"LoRA r{run.lora_rank}: {sum(times) / len(times):.2f} s/step (mean of {len(times)}), "
          f"peak {'GPU' if device.startswith('cuda') else 'RSS'} {peak:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="also the full preset (slow on a CPU)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench("demo", args.device, args.steps)
    if args.full:
        bench("full", args.device, args.steps)


if __name__ == "__main__":
    main()
