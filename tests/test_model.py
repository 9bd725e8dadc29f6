"""The I2MV model, its sampler and pretraining (pretrain.py): tiny configs, CPU, seconds."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

import plumbing
import pretrain
from pretrain import (Args, alphas_cumprod, build_unet, ddim_step, ddim_timesteps, load_model,
                      model_output, predict, sample_views, train_base, set_view_attention, unet_config)
from prepare_data import NUM_VIEWS, VIEW_AZIMUTHS
from plumbing import UserError

RES = 16


class HalfSize(pretrain.LatentCodec):
    """A codec that changes the shape, as a VAE does: views (6, H, W) <-> latents (4, H/2, W/2)
    through a tiny (frozen, seeded) convolution pair."""
    name, channels, downsample, clip_range = "half_size", 4, 2, (-3.0, 3.0)

    def __init__(self, seed: int = 0):
        super().__init__()
        self.down = torch.nn.Conv2d(6, 4, 2, stride=2)
        self.up = torch.nn.ConvTranspose2d(4, 6, 2, stride=2)
        generator = torch.Generator().manual_seed(seed)  # its own weights from its own seed, global RNG untouched
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)

    def encode(self, views):  # (..., 6, H, W) -> (..., 4, H/2, W/2)
        return self.down(views.flatten(0, -4)).unflatten(0, views.shape[:-3])

    def decode(self, latents):  # (..., 4, h, w) -> (..., 6, 2h, 2w) in [-1, 1]
        return torch.tanh(self.up(latents.flatten(0, -4))).unflatten(0, latents.shape[:-3])

    def config(self):
        return {"name": self.name, "seed": 0}


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return build_unet(unet_config(RES, (8, 16), layers_per_block=1, attn_levels=1, heads=2, token_dim=16)).eval()


def make_split(folder, name, count, res=RES, seed=0, bench=False):
    """A tiny npz with the contract's keys: blobs whose width depends on the view (like a body
    seen from different sides), white background, normals stored as (n+1)/2."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res] / res
    color = np.full((count, NUM_VIEWS, 3, res, res), 255, np.uint8)
    normal = np.full_like(color, 255)
    mask = np.zeros((count, NUM_VIEWS, res, res), np.uint8)
    for i in range(count):
        cx, hue = rng.uniform(0.4, 0.6), rng.uniform(0, 1, 3)
        for v, azimuth in enumerate(VIEW_AZIMUTHS):
            width = 0.1 + 0.1 * abs(np.cos(np.radians(azimuth)))
            inside = (np.abs(xx - cx) < width) & (np.abs(yy - 0.5) < 0.35)
            mask[i, v] = inside
            color[i, v][:, inside] = (hue[:, None] * 200).astype(np.uint8)
            normal[i, v][:, inside] = np.array([128, 128, 230], np.uint8)[:, None]
    arrays = dict(color=color, normal=normal, mask=mask, depth=mask.astype(np.float32),
                  joints=rng.normal(size=(count, 55, 3)).astype(np.float32), outfit=np.zeros(count, np.int64))
    if bench:
        arrays["image"] = color[:, 0].copy()
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{name}.npz", **arrays)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else dict(
        views=list(VIEW_AZIMUTHS), resolution=res, seed=0, source="test", preset="test", conventions={}, files={})
    manifest["files"][f"{name}.npz"] = count
    manifest["count"] = sum(manifest["files"].values())
    manifest_path.write_text(json.dumps(manifest))


@pytest.fixture
def run_dir(tmp_path):
    make_split(tmp_path / "data/scans", "train", 8, seed=0)
    make_split(tmp_path / "data/scans", "val", 2, seed=1)
    make_split(tmp_path / "data/bench", "bench", 2, seed=2, bench=True)
    return tmp_path


def tiny_args(run_dir, **kw):
    base = dict(run_dir=run_dir, steps=4, batch_size=2, lr=1e-3, warmup_steps=1, channels=(8, 16), layers_per_block=1,
                attn_levels=1, heads=2, token_dim=16, checkpoint_every=2, log_every=1, val_every=2, num_eval=0,
                ddim_steps=2, device="cpu")
    base.update(kw)
    return Args(**base)


def inputs(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, NUM_VIEWS, 6, RES, RES, generator=g), torch.rand(batch, 3, RES, RES, generator=g)


# --- the model ---------------------------------------------------------------------------------

def test_multiview_attention_mixes_views_and_per_view_does_not():
    unet = tiny_unet()
    x, image = inputs()
    t = torch.tensor([500])
    changed = x.clone()
    changed[:, 3] += 1.0  # only view 3's input changes
    with torch.no_grad():
        before, after = model_output(unet, x, t, image), model_output(unet, changed, t, image)
        assert (after[:, 0] - before[:, 0]).abs().max() > 1e-4  # view 0 sees view 3
        set_view_attention(unet, multi_view=False)
        before, after = model_output(unet, x, t, image), model_output(unet, changed, t, image)
    assert torch.equal(after[:, 0], before[:, 0])  # each view alone: no leak
    assert (after[:, 3] - before[:, 3]).abs().max() > 1e-4
    with torch.no_grad():  # row-wise: views still mix in the whole U-Net (its convolutions widen each row's reach)
        set_view_attention(unet, row_wise=True)
        before, after = model_output(unet, x, t, image), model_output(unet, changed, t, image)
    assert (after[:, 0] - before[:, 0]).abs().max() > 1e-4
    assert isinstance(unet.attn_processors[next(k for k in unet.attn_processors if "attn1" in k)],
                      pretrain.RowWiseMultiViewAttnProcessor)


def test_views_in_a_batch_do_not_mix_across_subjects():
    unet = tiny_unet()
    x, image = inputs(batch=2)
    changed = x.clone()
    changed[1] += 1.0
    t = torch.tensor([500, 500])
    with torch.no_grad():
        assert torch.allclose(model_output(unet, x, t, image)[0], model_output(unet, changed, t, image)[0], atol=1e-6)


def test_guidance_one_is_the_conditional_prediction_and_condition_matters():
    unet = tiny_unet()
    x, image = inputs()
    alphas = alphas_cumprod()
    with torch.no_grad():
        cond = model_output(unet, x, torch.tensor([300]), image)
        uncond = model_output(unet, x, torch.tensor([300]), torch.ones_like(image))
        g1 = predict(unet, x, 300, image, 1.0, alphas)
        g3 = predict(unet, x, 300, image, 3.0, alphas)
    assert torch.equal(g1.out, cond)
    assert (cond - uncond).abs().max() > 1e-4  # the dropped condition changes the output
    assert torch.allclose(g3.out, uncond + 3 * (cond - uncond), atol=1e-5)


def test_prediction_parametrisation_and_ddim_step_are_consistent():
    # With the true v, predict's x0/eps recover the clean sample and noise, and DDIM to t=0 gives x0.
    alphas = alphas_cumprod()
    x0, noise = torch.randn(2, NUM_VIEWS, 6, RES, RES), torch.randn(2, NUM_VIEWS, 6, RES, RES)
    a = alphas[400].float()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    oracle = lambda *args, **kw: type("Out", (), {"sample": v.flatten(0, 1)})()  # noqa: E731
    pred = predict(oracle, x_t, 400, torch.rand(2, 3, RES, RES), 1.0, alphas)
    assert torch.allclose(pred.x0, x0, atol=1e-4) and torch.allclose(pred.eps, noise, atol=1e-4)
    assert torch.allclose(ddim_step(pred.x0, pred.eps, 1.0), x0, atol=1e-4)
    assert ddim_timesteps(20)[0] == 999 and ddim_timesteps(20)[-1] == 49 and len(ddim_timesteps(20)) == 20


def test_sampler_is_deterministic_for_a_fixed_generator():
    unet = tiny_unet()
    _, image = inputs(batch=2)
    one = sample_views(unet, image, 3, 2.0, torch.Generator().manual_seed(7))
    two = sample_views(unet, image, 3, 2.0, torch.Generator().manual_seed(7))
    other = sample_views(unet, image, 3, 2.0, torch.Generator().manual_seed(8))
    assert one.shape == (2, NUM_VIEWS, 6, RES, RES) and one.min() >= -1 and one.max() <= 1
    assert torch.equal(one, two) and not torch.equal(one, other)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    unet = tiny_unet(seed=3)
    pretrain.save_model(tmp_path, unet, dict(num_views=NUM_VIEWS, resolution=RES))
    loaded, codec, alphas, config = load_model(tmp_path)
    assert isinstance(codec, pretrain.LatentCodec) and codec.name == "pixel"  # no codec recorded: pixel space
    assert torch.equal(alphas, alphas_cumprod())
    _, image = inputs()
    a = sample_views(unet, image, 2, 2.0, torch.Generator().manual_seed(0))
    b = sample_views(loaded, image, 2, 2.0, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and config["resolution"] == RES
    # Plain diffusers reloads the weights too (the multi-view processor is code, installed by load_model).
    plain = UNet2DConditionModel.from_pretrained(tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(plain.state_dict().values(), unet.state_dict().values()))


def test_load_model_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(UserError, match="not a model folder"):
        load_model(tmp_path)


# --- pretraining -------------------------------------------------------------------------------

def weights(folder):
    return load_file(folder / "diffusion_pytorch_model.safetensors")


class Killed(Exception):
    pass


def test_killed_and_resumed_pretraining_matches_an_uninterrupted_run(tmp_path, run_dir, monkeypatch):
    other = tmp_path / "other"
    shutil.copytree(run_dir / "data", other / "data")
    straight = train_base(tiny_args(run_dir))

    def kill(step):
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        train_base(tiny_args(other), hook=kill)
    assert (other / "base_ckpt/step_000002/model.safetensors").exists() and not (other / "base").exists()
    loaded, real_load = [], plumbing.load_checkpoint  # the resume goes through the run scaffold both trainers share
    monkeypatch.setattr(plumbing, "load_checkpoint", lambda *a: loaded.append(a[0]) or real_load(*a))
    resumed = train_base(tiny_args(other, resume=True))
    assert [p.name for p in loaded] == ["step_000002"]
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_in.weight"], weights_after_init(run_dir))  # it did train
    # The log has one line per step, no duplicates from the killed run.
    steps = [json.loads(line)["step"] for line in (other / "base/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def weights_after_init(run_dir):
    args = tiny_args(run_dir).resolved()
    torch.manual_seed(args.seed)
    return build_unet(unet_config(RES, args.channels, 1, 1, 2, 16)).state_dict()["conv_in.weight"]


def test_incompatible_or_broken_checkpoint_is_refused(run_dir):
    train_base(tiny_args(run_dir, steps=2))
    with pytest.raises(UserError, match="different network"):
        train_base(tiny_args(run_dir, steps=4, channels=(8, 24), resume=True))
    with pytest.raises(UserError, match="data differs"):
        train_base(tiny_args(run_dir, steps=4, batch_size=4, resume=True))
    (run_dir / "base_ckpt/step_000002/state.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        train_base(tiny_args(run_dir, steps=4, resume=True))


def test_pretrain_writes_base_with_metrics_and_sheets(run_dir):
    base = train_base(tiny_args(run_dir, steps=2, num_eval=2, sheet_subjects=2))
    results = json.loads((base / "val_metrics.json").read_text())
    assert set(results["val"]) >= {"psnr_color", "psnr_normal"} and results["bench"]["count"] == 2
    assert (base / "samples_val.png").exists() and (base / "samples_bench.png").exists()
    config = json.loads((base / "model_config.json").read_text())
    assert config["resolution"] == RES and config["prediction_type"] == "v_prediction"
    assert config["codec"] == {"name": "pixel"} and config["latent_channels"] == 6
    unet = load_model(base).unet
    assert isinstance(unet.attn_processors[next(k for k in unet.attn_processors if "attn1" in k)],
                      pretrain.MultiViewAttnProcessor)


def test_missing_data_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="prepare_data.py"):
        train_base(tiny_args(tmp_path))


def test_the_supervised_ceiling_trains_the_base_further_on_other_data_into_its_own_folder(run_dir, tmp_path):
    """pretrain.py --init base --train-data other.npz --out ceiling: base/ stays as it was, the
    ceiling starts from its weights and learns from the other data (here: a 2-subject split)."""
    base = train_base(tiny_args(run_dir, steps=2))
    before = weights(base)
    make_split(tmp_path / "drpose_gt", "train", 2, seed=5)
    ceiling = train_base(tiny_args(run_dir, init=base, train_data=tmp_path / "drpose_gt/train.npz",
                                   out=tmp_path / "ceiling", steps=2))
    assert ceiling == tmp_path / "ceiling" and (tmp_path / "ceiling_ckpt/step_000002").exists()
    after = weights(base)
    assert all(torch.equal(before[k], after[k]) for k in before)  # base/ untouched
    trained = weights(ceiling)
    assert any(not torch.equal(before[k], trained[k]) for k in before)
    record = json.loads((ceiling / "model_config.json").read_text())
    assert record["train_args"]["train_data"].endswith("drpose_gt/train.npz")
    with pytest.raises(UserError, match="fewer than"):  # 2 subjects cannot fill a batch of 4
        train_base(tiny_args(run_dir, init=base, train_data=tmp_path / "drpose_gt/train.npz",
                             out=tmp_path / "c2", batch_size=4))


# --- the run scaffold (plumbing.TrainingRun), as pretraining meets it ---------------------------------

def test_resume_with_nothing_to_resume_is_refused_before_any_loading_naming_the_real_out(tmp_path):
    """No data at all: a refusal that came after loading would name the missing data instead."""
    with pytest.raises(UserError, match=r"no complete checkpoint under .*ceiling_ckpt; .*replaces .*ceiling when"):
        train_base(tiny_args(tmp_path, out=tmp_path / "ceiling", resume=True))


def test_a_fresh_run_replaces_only_its_own_step_folders(run_dir):
    train_base(tiny_args(run_dir, steps=2))
    ckpt = run_dir / "base_ckpt"
    (ckpt / "step_000002" / "stale").write_text("from the old run")
    (ckpt / "notes.txt").write_text("kept")
    (ckpt / "logs").mkdir()
    train_base(tiny_args(run_dir, steps=2))
    assert not (ckpt / "step_000002" / "stale").exists() and (ckpt / "step_000002" / "state.json").exists()
    assert (ckpt / "notes.txt").read_text() == "kept" and (ckpt / "logs").is_dir()


def test_pretraining_on_a_codec_that_changes_shape(run_dir, monkeypatch):
    """--codec NAME: the base learns the codec's latents (4 x 8 x 8 for 16 px views), names the codec in
    model_config.json, and its evaluation samples and decodes through it."""
    monkeypatch.setitem(pretrain.CODECS, "half_size", HalfSize)
    base = train_base(tiny_args(run_dir, steps=2, codec="half_size", num_eval=2, sheet_subjects=1))
    model = load_model(base)
    assert isinstance(model.codec, HalfSize) and model.unet.config.sample_size == RES // 2
    assert model.unet.config.in_channels == 4 + 3 and model.config["codec"] == {"name": "half_size", "seed": 0}
    assert json.loads((base / "val_metrics.json").read_text())["val"]["count"] == 2
    with pytest.raises(UserError, match="--codec nope is not in pretrain.CODECS"):
        tiny_args(run_dir, codec="nope").resolved()


def test_row_wise_attention_mixes_views_along_rows_only():
    """RowWiseMultiViewAttnProcessor: a token's output changes when the same row of another view changes, and not
    when another row changes (of its own view or another); with one view it is attention within each row."""
    from diffusers.models.attention_processor import Attention
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    processor = pretrain.RowWiseMultiViewAttnProcessor(num_views=3)
    tokens = torch.randn(2 * 3, 4 * 4, 8)  # (B*V, h*w, C): 2 subjects, 3 views, a 4 x 4 grid
    out = processor(attn, tokens)
    assert out.shape == tokens.shape
    grid = lambda x: x.reshape(2, 3, 4, 4, 8)  # noqa: E731  (B, V, h, w, C)
    same_row = grid(tokens.clone())
    same_row[0, 1, 2] += 1.0  # subject 0, view 1, row 2
    changed = grid(processor(attn, same_row.reshape_as(tokens))) - grid(out)
    assert changed[0, 0, 2].abs().max() > 1e-4  # view 0, row 2 sees view 1's row 2
    assert changed[0, :, [0, 1, 3]].abs().max() < 1e-6  # other rows do not
    assert changed[1].abs().max() < 1e-6  # nor the other subject
    with pytest.raises(ValueError, match="square"):
        processor(attn, torch.randn(3, 12, 8))
