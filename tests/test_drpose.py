"""DrPose fine-tuning (finetune.py): where gradients go, which U-Net calls are in the graph,
the KL term, that the loop optimises a reward, and exact resume. Tiny models at 16 px on the CPU."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

import finetune as ft
import plumbing
import pretrain
import posescore
import prepare_data as pd
from test_model import HalfSize, make_split

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
                ddim_steps=4, grad_steps=2, early_stop_max=2, log_every=1, eval_every=100, num_eval=0,
                checkpoint_every=2, device="cpu")
    return ft.Args(**(base | kw))


def lora_model(run):
    unet, _, _, config = pretrain.load_model(run / "base")
    ft.add_lora(unet, 4)
    return unet, config


def chain(unet, image, noise, plan, guidance, alphas, ddim_steps, codec=None):
    """The training chain with the LoRA model's own adapters-off reference: (views, KL term (B,))."""
    views, eps_gaps = ft.sample_with_grad(unet, image, noise, plan, guidance, alphas, ddim_steps,
                                          codec or pretrain.LatentCodec(), reference=ft.Reference(unet))
    return views, ft.kl_term(eps_gaps)


def one_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, RES, RES, generator=gen), torch.randn(2, pd.NUM_VIEWS, 6, RES, RES, generator=gen)


def test_gradients_reach_exactly_the_lora_parameters(run):
    unet, config = lora_model(run)
    unet.train()
    image, noise = one_batch()
    alphas = pretrain.alphas_cumprod(config)
    plan = ft.ChainPlan(stop=3, grad_steps=(0, 2), detach_input=True)
    views, kl = chain(unet, image, noise, plan, 1.5, alphas, 4)
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
    chain(unet, image, noise, plan, 1.5, pretrain.alphas_cumprod(config), 10)
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
    chain(unet, image, noise, plan, 1.0, pretrain.alphas_cumprod(config), 6)
    handle.remove()
    steps = pretrain.ddim_timesteps(6)
    assert [c["t"] for c in calls if c["grad"]] == steps[-2:]


def test_kl_is_zero_before_the_first_update_and_positive_after(run):
    unet, config = lora_model(run)
    image, noise = one_batch()
    alphas = pretrain.alphas_cumprod(config)
    plan = ft.ChainPlan(stop=3, grad_steps=(1, 3), detach_input=True)
    _, kl = chain(unet, image, noise, plan, 1.5, alphas, 4)
    assert torch.equal(kl, torch.zeros(2))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
    _, kl = chain(unet, image, noise, plan, 1.5, alphas, 4)
    assert (kl > 0).all()


def fixed_brightness(folder, config_run):
    unet, codec, alphas, _ = pretrain.load_model(folder)
    image, noise = one_batch(seed=9)
    views = pretrain.sample_views(unet, image, 4, 1.5, noise=noise, alphas=alphas, codec=codec)
    return brightness(views, {}, None)[0].mean().item()


def test_toy_reward_rises_within_20_steps_and_drpose_folder_loads(run):
    out = ft.drpose(tiny_args(run, steps=20, checkpoint_every=20))
    before, after = fixed_brightness(run / "base", run), fixed_brightness(out, run)
    assert after > before + 0.05, (before, after)
    # drpose/ is a plain diffusers folder (LoRA merged) plus the adapter on its own
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


def test_resumed_run_ends_with_the_same_weights(run, tmp_path, monkeypatch):
    straight = ft.drpose(tiny_args(run, out=tmp_path / "straight"))

    class Killed(Exception):
        pass

    def kill_after_checkpoint(step):
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        ft.drpose(tiny_args(run, out=tmp_path / "resumed"), hook=kill_after_checkpoint)
    loaded, real_load = [], plumbing.load_checkpoint  # the resume goes through the run scaffold both trainers share
    monkeypatch.setattr(plumbing, "load_checkpoint", lambda *a: loaded.append(a[0]) or real_load(*a))
    resumed = ft.drpose(tiny_args(run, out=tmp_path / "resumed", resume=True))
    assert [p.name for p in loaded] == ["step_000002"]
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


class ScaledFlip(pretrain.LatentCodec):
    """A shape-keeping, non-identity codec: latents are the views halved and flipped."""
    name, clip_range = "scaled_flip", (-0.5, 0.5)

    def encode(self, views):
        return views.flip(-1) * 0.5

    def decode(self, latents):
        return latents.flip(-1) * 2


def test_one_latent_seam_on_both_sampling_paths(run):
    """The training chain hands the reward views decoded by the model's codec exactly as `sample_views`
    does (the full chain, no early stop, gives the same views)."""
    unet, config = lora_model(run)
    image, noise = one_batch(seed=3)
    alphas = pretrain.alphas_cumprod(config)
    with torch.no_grad():
        expect = pretrain.sample_views(unet, image, 4, 1.5, noise=noise, alphas=alphas, codec=ScaledFlip())
        plan = ft.ChainPlan(stop=3, grad_steps=(3,), detach_input=True)
        views, _ = chain(unet, image, noise, plan, 1.5, alphas, 4, ScaledFlip())
        plain = pretrain.sample_views(unet, image, 4, 1.5, noise=noise, alphas=alphas)
    assert torch.allclose(views, expect, atol=1e-5)
    assert not torch.allclose(views, plain, atol=1e-3)  # the decode really ran


def test_a_codec_that_changes_shape_runs_the_sampler_a_drpose_step_and_the_realism_penalty():
    """6 x 32 x 32 views <-> 4 x 16 x 16 latents: the U-Net is built on the codec's latents, the sampler's
    noise and clip come from it, and DrPose's chain, reward and realism penalty see decoded views."""
    res, codec = 32, HalfSize().requires_grad_(False)
    torch.manual_seed(0)
    unet = pretrain.build_unet(pretrain.unet_config(res, (16, 32), 1, 1, 2, 16, codec=codec))
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (4 + 3, 4, 16)
    alphas = pretrain.alphas_cumprod()
    image = torch.rand(2, 3, res, res, generator=torch.Generator().manual_seed(1))
    views = pretrain.sample_views(unet, image, 3, 1.5, torch.Generator().manual_seed(2), alphas=alphas, codec=codec)
    assert views.shape == (2, pd.NUM_VIEWS, 6, res, res) and views.abs().max() <= 1

    ft.add_lora(unet, 4)
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    before = [p.detach().clone() for p in trainable]
    args = ft.Args(method="drtune", ddim_steps=3, grad_steps=2, early_stop_max=1, guidance=1.5, realism_weight=0.5)
    seen = {}

    def reward(views, batch, ctx):  # the views the reward reads are decoded ones, at the image size
        seen["shape"] = tuple(views.shape)
        return brightness(views, batch, ctx)

    def optimise(loss):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return torch.tensor(0.0)

    out = ft.drpose_step({"image": image}, unet, ft.Reference(unet), codec, alphas, reward, None, args,
                         torch.Generator().manual_seed(3), optimise)
    assert seen["shape"] == (2, pd.NUM_VIEWS, 6, res, res)
    assert out["realism"].shape == (2,) and (out["realism"] > 0).all() and torch.isfinite(out["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable))  # the adapters took the step

    # the realism penalty alone: re-encodes the views, its gradient reaches them
    views = views.clone().requires_grad_(True)
    penalty = ft.realism_penalty(ft.Reference(unet), codec, views, image, alphas, (100, 900), torch.Generator())
    penalty.sum().backward()
    assert penalty.shape == (2,) and views.grad.abs().sum() > 0


def test_the_codec_is_stored_in_the_model_folder_and_used_by_drpose(run, tmp_path, monkeypatch):
    """A base trained on a codec's latents names it in model_config.json; load_model rebuilds it from
    CODECS and finetune.py samples, scores and trains through it (16 px views <-> 4 x 8 x 8 latents)."""
    monkeypatch.setitem(pretrain.CODECS, "half_size", HalfSize)
    torch.manual_seed(0)
    unet = pretrain.build_unet(pretrain.unet_config(RES, (16, 32), 1, 1, 2, 16, codec=HalfSize()))
    record = dict(resolution=RES, num_views=pd.NUM_VIEWS, scheduler=pretrain.SCHEDULER, codec=HalfSize().config(),
                  sampling=dict(sampler="ddim", num_steps=4, guidance=1.5))
    pretrain.save_model(tmp_path / "latent_base", unet, record)
    model = pretrain.load_model(tmp_path / "latent_base")
    assert isinstance(model.codec, HalfSize) and model.codec.channels == 4
    out = ft.drpose(tiny_args(run, base=tmp_path / "latent_base", out=tmp_path / "latent_drpose", steps=2,
                              realism_weight=0.3))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(x["loss"]) and x["realism"] > 0 for x in lines)
    assert json.loads((out / "model_config.json").read_text())["codec"] == {"name": "half_size", "seed": 0}
    monkeypatch.delitem(pretrain.CODECS, "half_size")
    with pytest.raises(pd.UserError, match="codec 'half_size' is not in pretrain.CODECS"):
        pretrain.load_model(out)


MASK_REWARD = """
import torch

SEEN = []


def mask_agreement(views, batch, ctx):
    # Higher where the front normal view is bright on the pair's mask: reads batch["mask"] (B, H, W).
    SEEN.append({k: v.detach().clone() for k, v in batch.items()})
    mask = batch["mask"]
    front = views[:, 0, 3:].mean(1)  # (B, H, W)
    rewards = (front * mask).mean((1, 2))
    return rewards, {"mask_share": mask.mean((1, 2))}
"""


def test_a_reward_from_the_users_own_file_reads_the_whole_pair_row(run, tmp_path):
    """`--reward path/to/file.py:function` registers a reward from the user's file; it gets the whole
    pair row as its batch (image, mask, joints, pose, ...), the rows of the step, never multi-view GT."""
    pairs = dict(np.load(run / "data/drpose/pairs.npz"))
    rng = np.random.default_rng(1)
    pairs["mask"] = rng.integers(0, 2, pairs["mask"].shape).astype(np.uint8)
    pairs["body_pose"] = rng.normal(0, 0.3, (len(pairs["image"]), 21, 3)).astype(np.float32)
    pd.save_npz(run / "data/drpose/pairs.npz", **pairs)
    (tmp_path / "my_rewards.py").write_text(MASK_REWARD)
    spec = f"{tmp_path / 'my_rewards.py'}:mask_agreement"
    out = ft.drpose(tiny_args(run, reward=spec, steps=1))
    seen = posescore.resolve_reward(spec).__globals__["SEEN"]
    rows = plumbing.step_rows(0, len(pairs["image"]), 2, 1, 0, 0)
    assert len(seen) == 2  # the start-up check of the reward's output (posescore.check_reward), then step 1
    batch = seen[1]
    assert {"image", "mask", "joints", "body_pose"} <= set(batch) and not {"color", "normal"} & set(batch)
    assert torch.equal(batch["mask"], torch.from_numpy(pairs["mask"][rows.numpy()]).float())
    assert torch.equal(batch["image"], torch.from_numpy(pairs["image"][rows.numpy()]).float() / 255)
    assert torch.equal(batch["joints"], torch.from_numpy(pairs["joints"][rows.numpy()]))
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert line["parts"]["mask_share"] == pytest.approx(batch["mask"].mean().item(), abs=1e-5)
    assert json.loads((out / "model_config.json").read_text())["drpose"]["reward"] == spec


def test_reward_specs_resolve_or_are_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "user_rewards.py").write_text(MASK_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert posescore.resolve_reward("posescore") is posescore.posescore_reward
    assert posescore.resolve_reward("user_rewards:mask_agreement").__name__ == "mask_agreement"
    for spec, message in [("nope", "not in posescore.REWARDS"), ("user_rewards:nope", "has no function nope"),
                          ("no_such_module_here:f", "importing no_such_module_here failed"),
                          (f"{tmp_path}/missing.py:f", "missing.py does not exist")]:
        with pytest.raises(pd.UserError, match=message):
            posescore.resolve_reward(spec)


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
    penalty = ft.realism_penalty(ft.Reference(unet), pretrain.LatentCodec(), views, image, alphas, (100, 900),
                                 torch.Generator().manual_seed(0))
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
    with torch.no_grad(), ft.Reference(unet).network() as reference:
        out = pretrain.model_output(reference, x_t, t, image)
    expect = (out - (a.sqrt() * eps - (1 - a).sqrt() * views.detach())).pow(2).flatten(1).mean(1)
    assert torch.allclose(penalty.detach(), expect, atol=1e-5)


def test_realism_weight_trains_and_logs_the_penalty_and_zero_changes_nothing(run, tmp_path):
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


# --- the run scaffold (plumbing.TrainingRun), as DrPose meets it --------------------------------------

def test_resume_with_nothing_to_resume_is_refused_before_any_loading_naming_the_real_out(run, tmp_path):
    (run / "data/drpose/pairs.npz").unlink()  # a refusal that came after loading would name the pairs
    with pytest.raises(pd.UserError, match=r"no complete checkpoint under .*elsewhere_ckpt; .*replaces .*elsewhere when"):
        ft.drpose(tiny_args(run, out=tmp_path / "elsewhere", resume=True))


def test_a_fresh_run_replaces_only_its_own_step_folders(run):
    ft.drpose(tiny_args(run, steps=2))
    ckpt = run / "drpose_ckpt"
    (ckpt / "step_000002" / "stale").write_text("from the old run")
    (ckpt / "notes.txt").write_text("kept")
    ft.drpose(tiny_args(run, steps=2))
    assert not (ckpt / "step_000002" / "stale").exists() and (ckpt / "step_000002" / "state.json").exists()
    assert (ckpt / "notes.txt").read_text() == "kept"
