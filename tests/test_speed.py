"""The fast DrPose step and long runs across short jobs: the CPU chain is the pinned plain loop's,
bit for bit; on a GPU the fast chain (bf16 frozen copy, CUDA graphs, device timesteps) gives the plain
loop's loss and gradients within bf16 tolerance and syncs with the host nowhere; --max-minutes stops
with a checkpoint and --resume in a new process ends with the weights of a straight run."""

import copy
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

import finetune as ft
import plumbing
import pretrain
import prepare_data as pd
from test_drpose import brightness, lora_model, one_batch, run  # noqa: F401  (run is a fixture)
from test_model import make_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from plain_chain import sample_with_grad_plain  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def fast_chain(unet, image, noise, plan, guidance, alphas, ddim_steps, reference, nograd_call=pretrain.guided_output):
    """finetune's chain, with the KL term assembled from its eps gaps as drpose_step does."""
    views, eps_gaps = ft.sample_with_grad(unet, image, noise, plan, guidance, alphas, ddim_steps, pretrain.LatentCodec(),
                                          reference=reference, nograd_call=nograd_call)
    return views, ft.kl_term(eps_gaps)


def graphed(unet, frozen_copy):
    """The CUDA fast path's reference and no-grad caller, as finetune.drpose builds them."""
    pool = torch.cuda.graph_pool_handle()
    return (ft.Reference(unet, frozen_copy, plumbing.GraphedCall(pretrain.guided_output, frozen_copy, pool)),
            plumbing.GraphedCall(pretrain.guided_output, unet, pool))


def loss_and_grads(chain, unet, plan, reference, *extra, guidance=1.5, device="cpu", seed=0, kl_weight=0.5):
    image, noise = (x.to(device) for x in one_batch(seed))
    alphas = pretrain.alphas_cumprod().to(device)
    unet.zero_grad(set_to_none=True)
    with plumbing.autocast(torch.device(device)):
        views, kl = chain(unet, image, noise, plan, guidance, alphas, 4, reference, *extra)
    loss = ft.drpose_loss(brightness(views, {}, None)[0], kl, kl_weight)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}, kl.detach()


def moved_lora(unet, seed=1):
    """Adapters off zero, so that the KL term and the grads of A are not trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return unet


@pytest.mark.parametrize("plan", [ft.ChainPlan(3, (0, 2), True), ft.ChainPlan(2, (1,), True),
                                  ft.ChainPlan(3, (2, 3), False)])
def test_cpu_chain_is_the_pinned_plain_loop_bit_for_bit(run, plan):
    unet, _ = lora_model(run)
    moved_lora(unet)
    loss_a, grads_a, kl_a = loss_and_grads(sample_with_grad_plain, unet, plan, ft.Reference(unet))
    loss_b, grads_b, kl_b = loss_and_grads(fast_chain, unet, plan, ft.Reference(unet))
    assert kl_a.abs().sum() > 0 and grads_a
    assert torch.equal(loss_a, loss_b) and torch.equal(kl_a, kl_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_cuda_chain_matches_the_plain_loop_and_never_syncs(run):
    unet, _ = lora_model(run)
    unet = moved_lora(unet).cuda().train()
    frozen_copy = plumbing.frozen_bf16(pretrain.load_model(run / "base", "cuda").unet)
    # The bf16 starting model gives the adapters-off outputs (autocast casts to the same bf16 weights).
    image, noise = (x.cuda() for x in one_batch(7))
    t = torch.tensor([700], device="cuda")
    with torch.no_grad(), plumbing.autocast(torch.device("cuda")):
        with ft.Reference(unet).network() as off:
            expect = pretrain.guided_output(off, noise, t, image, 1.5)
        got = pretrain.guided_output(frozen_copy, noise, t, image, 1.5)
    assert relative_error(got, expect) < 1e-2
    reference, nograd_call = graphed(unet, frozen_copy)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, fused=True)
    plan = ft.ChainPlan(3, (0, 2), True)
    for step in range(3):  # the graphs must see the weights each optimizer step writes in place
        kw = dict(device="cuda", seed=step, kl_weight=0.01)  # the paper's w_KL
        loss_a, grads_a, kl_a = loss_and_grads(sample_with_grad_plain, unet, plan, ft.Reference(unet), **kw)
        loss_e, grads_e, kl_e = loss_and_grads(fast_chain, unet, plan, ft.Reference(unet, frozen_copy), **kw)
        loss_b, grads_b, kl_b = loss_and_grads(fast_chain, unet, plan, reference, nograd_call, **kw)
        assert grads_a.keys() == grads_b.keys() == grads_e.keys()
        flat = {name: torch.cat([g[k].flatten() for k in grads_a]) for name, g in
                (("plain", grads_a), ("eager", grads_e), ("graphs", grads_b))}
        # Graph replays run the eager chain's kernels: the same numbers up to rounding (H200: 1.9e-3 on grads).
        assert relative_error(loss_b, loss_e) < 1e-4 and relative_error(kl_b, kl_e) < 1e-3
        assert relative_error(flat["graphs"], flat["eager"]) < 5e-3
        # Against the plain loop (frozen pass with adapters off, fp32 weights cast by autocast): bf16 tolerance.
        errors = (relative_error(loss_b, loss_a), relative_error(kl_b, kl_a), relative_error(flat["graphs"], flat["plain"]))
        assert errors[0] < 1e-2 and errors[1] < 5e-2 and errors[2] < 2e-2, (step, errors)
        optimizer.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_cuda_chain_never_syncs_with_the_host(run):
    unet, _ = lora_model(run)
    unet = moved_lora(unet).cuda().train()
    frozen_copy = plumbing.frozen_bf16(pretrain.load_model(run / "base", "cuda").unet)
    reference, nograd_call = graphed(unet, frozen_copy)
    plan = ft.ChainPlan(3, (0, 2), True)
    loss_and_grads(fast_chain, unet, plan, reference, nograd_call, device="cuda")  # captures
    # After capture the chain has no host sync: every timestep and coefficient stays on the device.
    image, noise = (x.cuda() for x in one_batch(5))
    alphas = pretrain.alphas_cumprod().cuda()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught, plumbing.autocast(torch.device("cuda")):
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            views, kl = fast_chain(unet, image, noise, plan, 1.5, alphas, 4, reference, nograd_call)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert not syncs, syncs
    assert torch.isfinite(views).all() and torch.isfinite(kl).all()


# --- long runs across short jobs: --max-minutes, then --resume in a new process ---------------------

DRIVER = """
import json, sys
from pathlib import Path
from types import SimpleNamespace
sys.path.insert(0, {repo!r})
import finetune, posescore, pretrain
posescore.REWARDS["brightness"] = lambda views, batch, ctx: (views[:, :, 3:].mean((1, 2, 3, 4)), {{}})
posescore.load_reward_context = lambda *a, **k: SimpleNamespace(resolution=16)
kw = json.loads(sys.argv[2])
for key in ("run_dir", "out"):
    if key in kw:
        kw[key] = Path(kw[key])
stage = finetune.drpose if sys.argv[1] == "drpose" else pretrain.train_base
print("RESULT", stage((finetune.Args if sys.argv[1] == "drpose" else pretrain.Args)(**kw)))
"""


def job(stage: str, **kw) -> str:
    """One job in a fresh process (its own hash seed, as a new job on a cluster has)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="random")
    done = subprocess.run([sys.executable, "-c", DRIVER.format(repo=str(REPO)), stage, json.dumps(kw, default=str)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_drpose_max_minutes_then_resume_in_new_processes_matches_a_straight_run(run, tmp_path):
    common = dict(run_dir=str(run), reward="brightness", steps=4, batch_size=2, lr=1e-2, warmup_steps=1, lora_rank=4,
                  ddim_steps=4, grad_steps=2, early_stop_max=2, log_every=1, eval_every=100, num_eval=0,
                  checkpoint_every=100, device="cpu")
    job("drpose", **common, out=str(tmp_path / "straight"))
    chained = tmp_path / "chained"
    log = job("drpose", **common, out=str(chained), max_minutes=1e-6)  # a budget that ends after one step
    assert "stopped at step 1" in log and not chained.exists()
    ckpt = chained.parent / "chained_ckpt/step_000001"
    state = json.loads((ckpt / "state.json").read_text())
    weights = load_file(ckpt / "model.safetensors")
    # LoRA checkpoints hold the adapters (and the optimizer), not the frozen base.
    assert state["weights"] == "trainable" and weights and all("lora_" in k for k in weights)
    unet, _ = lora_model(run)
    assert set(weights) == plumbing.trainable_names(unet)
    assert "stopped at step 2" in job("drpose", **common, out=str(chained), max_minutes=1e-6, resume=True)
    job("drpose", **common, out=str(chained), resume=True)
    a = load_file(tmp_path / "straight/diffusion_pytorch_model.safetensors")
    b = load_file(chained / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in (chained / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]


def test_pretrain_max_minutes_then_resume_in_a_new_process_matches_a_straight_run(tmp_path):
    runs = {}
    for name in ("straight", "chained"):
        make_split(tmp_path / name / "data/scans", "train", 8, seed=0)
        make_split(tmp_path / name / "data/scans", "val", 2, seed=1)
        runs[name] = dict(run_dir=str(tmp_path / name), steps=4, batch_size=2, lr=1e-3, warmup_steps=1,
                          channels=[8, 16], layers_per_block=1, attn_levels=1, heads=2, token_dim=16,
                          checkpoint_every=100, log_every=1, val_every=2, num_eval=0, ddim_steps=2, device="cpu")
    job("pretrain", **runs["straight"])
    assert "stopped at step 1" in job("pretrain", **runs["chained"], max_minutes=1e-6)
    assert (tmp_path / "chained/base_ckpt/step_000001/state.json").exists()
    job("pretrain", **runs["chained"], resume=True)
    a = load_file(tmp_path / "straight/base/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "chained/base/diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_checkpoint_of_another_rank_is_refused(run, tmp_path):
    args = dict(run_dir=run, reward="brightness", steps=2, batch_size=2, lr=1e-2, warmup_steps=1, lora_rank=4,
                ddim_steps=4, grad_steps=2, early_stop_max=2, log_every=1, eval_every=100, num_eval=0,
                checkpoint_every=1, device="cpu", out=tmp_path / "d")
    ft.drpose(ft.Args(**args))
    with pytest.raises(pd.UserError, match="incompatible|other trainable"):
        ft.drpose(ft.Args(**(args | dict(lora_rank=2, steps=3, resume=True))))


def test_step_flops_count_each_unet_call_and_scale_with_the_batch(monkeypatch):
    """bench/drpose_step.py's model FLOPs: two more executed chain steps add exactly two no-grad U-Net forwards (the
    base with its adapters), and the count per subject times the batch is the whole batch's count, as the paper
    preset's is taken."""
    spec = importlib.util.spec_from_file_location("drpose_step", Path(__file__).parents[1] / "bench" / "drpose_step.py")
    ds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ds)
    w = ds.workload("demo", "cpu", 2)
    image, batch, noise, _ = ds.inputs(w, 1, "cpu")[0]
    short, long = (image, batch, noise, ft.ChainPlan(3, (0, 2), True)), (image, batch, noise, ft.ChainPlan(5, (0, 2), True))
    lora = ft.add_lora(copy.deepcopy(w["unet"]), w["lora_rank"])
    with FlopCounterMode(display=False) as one, torch.no_grad():
        pretrain.guided_output(lora, noise, torch.tensor(500), image, w["guidance"])
    whole = ds.step_flops(w, long, "cpu")
    assert whole - ds.step_flops(w, short, "cpu") == 2 * one.get_total_flops()
    monkeypatch.setattr(ds, "CHECKPOINT_ABOVE", 0)  # this small U-Net counted as the paper's is: one subject x 2
    assert ds.step_flops(w, long, "cpu") == whole
