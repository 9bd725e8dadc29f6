"""The DrPose chain as it was before the fast CUDA path (finetune.py at 6822870), pinned: the
reference that tests/test_speed.py compares the chain against and that bench/drpose_step.py times
as `plain`. Python-int timesteps (a host-to-device copy at every use on a GPU), every U-Net call
eager, the frozen pass through the same network with its LoRA adapters switched off."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune import ChainPlan, Reference  # noqa: E402
from pretrain import clip_prediction, ddim_step, ddim_timesteps, guided_output, split_v  # noqa: E402


def sample_with_grad_plain(unet, image: torch.Tensor, noise: torch.Tensor, plan: ChainPlan, guidance: float,
                           alphas: torch.Tensor, num_steps: int, reference: Reference) -> tuple[torch.Tensor, torch.Tensor]:
    """finetune.sample_with_grad at 6822870, verbatim but for its name and today's names of the frozen
    model (a finetune.Reference; its network with the adapters off) and of pixel space (no decode).
    Returns (views, KL term (B,))."""
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
            with torch.no_grad(), reference.network() as frozen:
                frozen_out = guided_output(frozen, x.detach(), t, image, guidance)
            # eps = sqrt(a) v + sqrt(1-a) x: the eps difference is sqrt(a) times the v difference.
            a = alphas[t].to(x.dtype)
            kl = kl + (a.sqrt() * (pred.out - frozen_out)).float().pow(2).flatten(1).mean(1) / len(plan.grad_steps)
        pred = clip_prediction(pred, x, t, alphas)
        if i == plan.stop:  # the last executed step (early stop or not): take x0 directly
            return pred.x0.float(), kl
        x = ddim_step(pred.x0.float(), pred.eps.float(), alphas[steps[i + 1]].float())
    raise AssertionError("plan.stop lies beyond the chain")
