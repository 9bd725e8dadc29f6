"""DrPose fine-tuning (finetune.py): where gradients go, which U-Net calls are in the graph,
the KL term, that the loop optimises a reward, and exact resume. Tiny models at 16 px on the CPU."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import finetune as ft
import pretrain
import posescore
import prepare_data as pd

RES = 16


def brightness(views, batch, ctx):
    """A toy differentiable reward: how bright the generated normal maps are (higher is better)."""
    rewards = views[:, :, 3:].mean((1, 2, 3, 4))
    return rewards, {"normal_mean": rewards.detach()}


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A run folder with data/drpose/ only (no scans, no bench) and a tiny random base model."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "run"
    count = 8
    pd.save_npz(folder / "data/drpose/pairs.npz", image=rng.integers(0, 256, (count, 3, RES, RES), dtype=np.uint8),
                joints=rng.normal(0, 0.3, (count, 55, 3)).astype(np.float32),
                mask=np.ones((count, RES, RES), np.uint8))
    pd.write_json(folder / "data/drpose/manifest.json", {"files": {"pairs.npz": count}, "resolution": RES,
                                                        "views": list(pd.VIEW_AZIMUTHS)})
    torch.manual_seed(0)
    unet = pretrain.build_unet(pretrain.unet_config(RES, (16, 32), 1, 1, 2, 16))
    record = dict(resolution=RES, num_views=pd.NUM_VIEWS, scheduler=pretrain.SCHEDULER,
                  sampling=dict(sampler="ddim", num_steps=4, guidance=1.5))
    pretrain.save_model(folder / "base", unet, record)
    monkeypatch.setitem(posescore.REWARDS, "brightness", brightness)
    monkeypatch.setattr(posescore, "load_reward_context", lambda path, device="cpu", *extra: SimpleNamespace(resolution=RES))
    return folder


def tiny_args(run, **kw):
    base = dict(run_dir=run, reward="brightness", steps=4, batch_size=2, lr=1e-2, warmup_steps=1, lora_rank=4,
                num_steps=4, grad_steps=2, early_stop_max=2, log_every=1, eval_every=100, num_eval=0,
                checkpoint_every=2, device="cpu")
    return ft.Args(**(base | kw))


def lora_model(run):
    unet, config = pretrain.load_model(run / "base")
    ft.add_lora(unet, 4)
    return unet, config


def one_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, RES, RES, generator=gen), torch.randn(2, pd.NUM_VIEWS, 6, RES, RES, generator=gen)


def test_gradients_reach_exactly_the_lora_parameters(run):
    unet, config = lora_model(run)
    unet.train()
    image, noise = one_batch()
    alphas = pretrain.alphas_cumprod(config)
    plan = ft.ChainPlan(stop=3, grad_steps=(0, 2), detach_input=True)
    views, kl = ft.sample_with_grad(unet, image, noise, plan, 1.5, alphas, 4, (unet, None))
    rewards, _ = brightness(views, {}, None)
    ft.drpose_loss(rewards, kl, 0.01).backward()
    for name, param in unet.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and param.grad is not None, name
        else:
            assert not param.requires_grad and param.grad is None, name
    # B starts at zero, so the first gradient lands on B (A's is exactly zero until B moves).
    assert sum(p.grad.abs().sum() for n, p in unet.named_parameters() if "lora_B" in n) > 0


def count_unet_calls(unet):
    calls = []

    def hook(module, inputs, output):
        sample, timestep = inputs[0], inputs[1]
        calls.append(dict(grad=torch.is_grad_enabled(), input_requires_grad=sample.requires_grad,
                          t=int(timestep.reshape(-1)[0]), adapters=not getattr(module, "_disable_adapters", False)))
    return calls, unet.register_forward_hook(hook)


def test_drtune_keeps_exactly_k_unet_calls_in_the_graph_with_detached_inputs(run):
    unet, config = lora_model(run)
    calls, handle = count_unet_calls(unet)
    image, noise = one_batch()
    gen = torch.Generator().manual_seed(3)
    plan = ft.plan_chain("drtune", 10, 3, 4, gen)
    ft.sample_with_grad(unet, image, noise, plan, 1.5, pretrain.alphas_cumprod(config), 10, (unet, None))
    handle.remove()
    in_graph = [c for c in calls if c["grad"]]
    assert len(in_graph) == 3 == len(plan.grad_steps)
    assert not any(c["input_requires_grad"] for c in calls)  # every U-Net input is detached
    # executed steps + one frozen (no-grad) call per grad step for the KL term
    assert len(calls) == plan.stop + 1 + len(plan.grad_steps)
    steps = pretrain.ddim_timesteps(10)
    assert [c["t"] for c in in_graph] == [steps[i] for i in plan.grad_steps]


def test_plans_follow_their_method():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        plan = ft.plan_chain("drtune", 20, 2, 8, gen)
        assert 11 <= plan.stop <= 19 and len(plan.grad_steps) == 2 and plan.detach_input
        assert all(0 <= i <= plan.stop for i in plan.grad_steps)
        assert plan.grad_steps[1] - plan.grad_steps[0] == (plan.stop + 1) // 2  # spread over the chain
        draft = ft.plan_chain("draft", 20, 2, 8, gen)
        assert draft == ft.ChainPlan(19, (18, 19), False)
        align = ft.plan_chain("alignprop", 20, 2, 8, gen)
        assert align.stop == 19 and align.grad_steps == tuple(range(20 - len(align.grad_steps), 20))


def test_draft_keeps_only_the_last_k_steps(run):
    unet, config = lora_model(run)
    calls, handle = count_unet_calls(unet)
    image, noise = one_batch()
    plan = ft.plan_chain("draft", 6, 2, 0, torch.Generator())
    ft.sample_with_grad(unet, image, noise, plan, 1.0, pretrain.alphas_cumprod(config), 6, (unet, None))
    handle.remove()
    steps = pretrain.ddim_timesteps(6)
    assert [c["t"] for c in calls if c["grad"]] == steps[-2:]


def test_kl_is_zero_before_the_first_update_and_positive_after(run):
    unet, config = lora_model(run)
    image, noise = one_batch()
    alphas = pretrain.alphas_cumprod(config)
    plan = ft.ChainPlan(stop=3, grad_steps=(1, 3), detach_input=True)
    _, kl = ft.sample_with_grad(unet, image, noise, plan, 1.5, alphas, 4, (unet, None))
    assert torch.equal(kl, torch.zeros(2))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
    _, kl = ft.sample_with_grad(unet, image, noise, plan, 1.5, alphas, 4, (unet, None))
    assert (kl > 0).all()


def fixed_brightness(folder, config_run):
    unet, config = pretrain.load_model(folder)
    image, noise = one_batch(seed=9)
    views = pretrain.sample_views(unet, image, 4, 1.5, noise=noise, alphas=pretrain.alphas_cumprod(config))
    return brightness(views, {}, None)[0].mean().item()


def test_toy_reward_rises_within_20_steps_and_drpose_folder_loads(run):
    out = ft.drpose(tiny_args(run, steps=20, checkpoint_every=20))
    before, after = fixed_brightness(run / "base", run), fixed_brightness(out, run)
    assert after > before + 0.05, (before, after)
    # drpose/ is a plain diffusers folder (LoRA merged) plus the adapter on its own
    from diffusers import UNet2DConditionModel

    merged = UNet2DConditionModel.from_pretrained(out)
    base = UNet2DConditionModel.from_pretrained(run / "base")
    base.load_lora_adapter(str(out / "lora"), prefix=None, weight_name="pytorch_lora_weights.safetensors")
    x, t = torch.randn(6, 9, RES, RES), torch.full((6,), 500)
    tokens = torch.randn(6, 64, merged.config.encoder_hid_dim)
    labels = torch.arange(6)
    with torch.no_grad():
        a = merged(x, t, encoder_hidden_states=tokens, class_labels=labels).sample
        b = base(x, t, encoder_hidden_states=tokens, class_labels=labels).sample
    assert torch.allclose(a, b, atol=1e-4)
    assert (out / "metrics.jsonl").exists()  # evaluate.py plots it (eval/reward_curve.png)


def test_resumed_run_ends_with_the_same_weights(run, tmp_path):
    from safetensors.torch import load_file

    straight = ft.drpose(tiny_args(run, out=tmp_path / "straight"))

    class Killed(Exception):
        pass

    def kill_after_checkpoint(step):
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        ft.drpose(tiny_args(run, out=tmp_path / "resumed"), hook=kill_after_checkpoint)
    resumed = ft.drpose(tiny_args(run, out=tmp_path / "resumed", resume=True))
    a = load_file(straight / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_finetuning_and_incompatible_resume_refused(run, tmp_path):
    ft.drpose(tiny_args(run, out=tmp_path / "full", lora_rank=0, steps=2))
    with pytest.raises(pd.UserError, match="incompatible"):
        ft.drpose(tiny_args(run, out=tmp_path / "full", lora_rank=4, steps=4, resume=True))


def test_drpose_reads_no_multiview_data(run):
    # data/scans/ and data/bench/ do not exist in this run folder: the stage runs on pairs alone.
    assert not (run / "data/scans").exists() and not (run / "data/bench").exists()
    pairs = np.load(run / "data/drpose/pairs.npz")
    assert not {"color", "normal", "depth"} & set(pairs.files)
    ft.drpose(tiny_args(run, steps=1))


def test_unknown_reward_and_missing_pairs_are_refused(run):
    with pytest.raises(pd.UserError, match="not in posescore.REWARDS"):
        ft.drpose(tiny_args(run, reward="nope"))
    (run / "data/drpose/pairs.npz").unlink()
    with pytest.raises(pd.UserError, match="pairs.npz is missing"):
        ft.drpose(tiny_args(run))


def test_one_latent_seam_on_both_sampling_paths(run, monkeypatch):
    """A latent-space fork changes encode/decode only: then the training chain must hand the reward
    decoded views exactly as `sample_views` does (the full chain, no early stop, gives the same views)."""
    monkeypatch.setattr(pretrain, "encode", lambda images: images * 0.5)  # non-identity seam
    monkeypatch.setattr(pretrain, "decode", lambda latents: latents.flip(-1) * 0.8)
    monkeypatch.setattr(ft, "decode", pretrain.decode)  # finetune imported the name; the fork edits both
    unet, config = lora_model(run)
    image, noise = one_batch(seed=3)
    alphas = pretrain.alphas_cumprod(config)
    with torch.no_grad():
        expect = pretrain.sample_views(unet, image, 4, 1.5, noise=noise, alphas=alphas)
        plan = ft.ChainPlan(stop=3, grad_steps=(3,), detach_input=True)
        views, _ = ft.sample_with_grad(unet, image, noise, plan, 1.5, alphas, 4, (unet, None))
    assert torch.allclose(views, expect, atol=1e-5)
    assert not torch.allclose(views, expect.flip(-1) / 0.8, atol=1e-3)  # the decode really ran


def test_perceptual_flags_reach_the_reward_context(run, monkeypatch):
    seen = {}

    def context(path, device="cpu", lpips_weights=None, perceptual_weight=1.0):
        seen.update(lpips_weights=lpips_weights, perceptual_weight=perceptual_weight)
        return SimpleNamespace(resolution=RES)

    monkeypatch.setattr(posescore, "load_reward_context", context)
    ft.drpose(tiny_args(run, steps=1, lpips_weights=run / "lpips.pt", perceptual_weight=0.3))
    assert seen == dict(lpips_weights=run / "lpips.pt", perceptual_weight=0.3)


def test_realism_penalty_is_the_base_denoising_error_and_trains_nothing_but_the_views(run):
    """Its gradient reaches the views, never the base weights or the adapters (they are off for the
    pass, and back on after it), also with gradient checkpointing on; its value is the v-prediction
    error of the frozen model at the drawn timesteps."""
    unet, config = lora_model(run)
    unet.enable_gradient_checkpointing()
    unet.train()
    alphas = pretrain.alphas_cumprod(config)
    image, noise = one_batch(seed=4)
    views = (noise * 0.3).clamp(-1, 1).requires_grad_(True)
    penalty = ft.realism_penalty((unet, None), views, image, alphas, (100, 900), torch.Generator().manual_seed(0))
    penalty.sum().backward()
    assert penalty.shape == (2,) and views.grad is not None and views.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in unet.parameters())
    assert unet.is_gradient_checkpointing and any(m.active_adapters for m in unet.modules() if hasattr(m, "active_adapters"))
    # the same number by hand: re-noise with the same draws, ask the model with adapters off
    generator = torch.Generator().manual_seed(0)
    t = torch.randint(100, 901, (2,), generator=generator)
    eps = torch.randn(views.shape, generator=generator)
    a = alphas[t].float().view(2, 1, 1, 1, 1)
    x_t = a.sqrt() * views.detach() + (1 - a).sqrt() * eps
    with torch.no_grad(), ft.frozen_model(unet) as reference:
        out = pretrain.model_output(reference, x_t, t, image)
    expect = (out - (a.sqrt() * eps - (1 - a).sqrt() * views.detach())).pow(2).flatten(1).mean(1)
    assert torch.allclose(penalty.detach(), expect, atol=1e-5)


def test_realism_weight_trains_and_logs_the_penalty_and_zero_changes_nothing(run, tmp_path):
    from safetensors.torch import load_file

    plain = ft.drpose(tiny_args(run, out=tmp_path / "plain", steps=2))
    zero = ft.drpose(tiny_args(run, out=tmp_path / "zero", steps=2, realism_weight=0.0))
    a, b = (load_file(f / "diffusion_pytorch_model.safetensors") for f in (plain, zero))
    assert all(torch.equal(a[k], b[k]) for k in a)  # off draws nothing: the paper's runs keep their noise
    with_realism = ft.drpose(tiny_args(run, out=tmp_path / "real", steps=2, realism_weight=0.3))
    lines = [json.loads(x) for x in (with_realism / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["realism"]) and x["realism"] > 0 for x in lines)
    c = load_file(with_realism / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_data_anchor_adds_the_diffusion_loss_on_scans_and_never_reads_the_drpose_gt(run, tmp_path):
    """--anchor-weight: the ordinary diffusion loss on data/scans/train.npz joins the loss; data/drpose_gt/
    (the ceiling's six-view GT of the DrPose poses) is never opened, even when it is there."""
    from safetensors.torch import load_file
    from test_model import make_split

    make_split(run / "data/scans", "train", 4, res=RES, seed=3)
    (run / "data/drpose_gt").mkdir()
    (run / "data/drpose_gt/train.npz").write_bytes(b"not an npz: reading it would fail")
    plain = ft.drpose(tiny_args(run, out=tmp_path / "plain", steps=2))
    anchored = ft.drpose(tiny_args(run, out=tmp_path / "anchored", steps=2, anchor_weight=1.0))
    lines = [json.loads(x) for x in (anchored / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["anchor"]) and x["anchor"] > 0 for x in lines)
    a, b = (load_file(f / "diffusion_pytorch_model.safetensors") for f in (plain, anchored))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    rewards, kl, anchor = torch.tensor([0.2, 0.4]), torch.tensor([1.0, 3.0]), torch.tensor(0.5)
    assert ft.drpose_loss(rewards, kl, 0.1, anchor=anchor, anchor_weight=2.0).item() == pytest.approx(0.7 + 0.2 + 1.0)
