"""posescore.py: skeleton maps, g_skel training, PoseScore's behaviour and the reward registry.

One toy run folder (body model, scans, bench; 16 px renders made by prepare_data's renderer) is
built once; g_skel is trained on it through the real `train` path in about 15 s on 2 CPU cores.
"""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune
import prepare_data as pd
import posescore as ps
import pretrain

RES = 16  # small enough to train in seconds, large enough that a 0.1 rad pose change shows


# --- fixtures: a toy run folder and a g_skel trained on it ------------------------------------------

def _render(body, params: dict, res: int, rng: np.random.Generator, held_out=False) -> dict:
    """Six-view renders of poses through prepare_data's own path, as dataset arrays."""
    outfits = pd.sample_outfits(len(params["body_pose"]), rng, held_out)
    out = pd.render_subjects(body, params, outfits, res, "cpu")
    return dict({k: params[k] for k in pd.POSE_KEYS}, transl=out["transl"].numpy(), joints=out["joints"].numpy(),
                color=pd.to_uint8(out["color"]), normal=pd.to_uint8(out["normal"]))


def _write_split(folder: Path, name: str, arrays: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / name, **arrays)
    manifest = folder / "manifest.json"
    files = json.loads(manifest.read_text())["files"] if manifest.exists() else {}
    files[name] = len(arrays["joints"])
    pd.write_json(manifest, dict(count=sum(files.values()), resolution=RES, files=files))


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small renders: threads only contend with other jobs
    pd.export_mannequin_smplx(root / "body" / "SMPLX_NEUTRAL.npz")
    body = pd.load_body_model(root / "body")
    rng = np.random.default_rng(0)
    _write_split(root / "data" / "scans", "train.npz", _render(body, pd.generate_poses("scan", 48, rng), RES, rng))
    _write_split(root / "data" / "scans", "val.npz", _render(body, pd.generate_poses("scan", 12, rng), RES, rng))
    _write_split(root / "data" / "bench", "bench.npz", _render(body, pd.generate_poses("hard", 6, rng), RES, rng, True))
    torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="session")
def trained(run_dir):
    """g_skel trained through the CLI's own path; returns (ctx, validation.json)."""
    args = ps.TrainArgs(run_dir=run_dir, steps=400, batch_size=32, channels=(16, 32), width=1.0, log_every=100,
                          threads=1)  # one thread: far faster when other jobs share the two cores
    ps.train(args)
    folder = run_dir / "posescore"
    return ps.load_reward_context(folder), json.loads((folder / "validation.json").read_text())


@pytest.fixture(scope="session")
def val(run_dir):
    return ps.load_view_latents(run_dir / "data" / "scans" / "val.npz")


def _tiny_ctx(res=8, dtype=torch.float32):
    torch.manual_seed(0)
    gskel = ps.build_gskel(res, (8, 8)).to(dtype).eval().requires_grad_(False)
    return ps.RewardContext(gskel=gskel, resolution=res, width=1.0, device=torch.device("cpu"))


# --- skeleton maps -------------------------------------------------------------------------------

def test_skeleton_maps_land_on_the_projected_bones(val):
    joints = val["joints_t"][:3]
    maps = ps.skeleton_maps(joints, RES, width=1.0)
    assert maps.shape == (3, pd.NUM_VIEWS, len(pd.BONES), RES, RES)
    assert maps.min() >= 0 and maps.max() <= 1
    pix = ps.project_joints(joints, RES)  # (B, V, 22, 2)
    for k, (parent, child) in enumerate(pd.BONES):
        mid = (pix[:, :, parent] + pix[:, :, child]) / 2  # (B, V, 2) as (u, v)
        col, row = mid[..., 0].floor().long(), mid[..., 1].floor().long()
        on_bone = maps[:, :, k][torch.arange(3)[:, None], torch.arange(pd.NUM_VIEWS), row, col]
        # a pixel centre is at most 0.71 px from the midpoint: exp(-0.5 / 2) = 0.78
        assert (on_bone > 0.75).all(), k
    # far from every bone nothing is drawn: the top-left corner is empty at 16 px
    assert maps[..., 0, 0].max() < 1e-3
    # joints read back off exact maps land on the projected joints
    assert (ps.joints_from_maps(maps) - pix).norm(dim=-1).mean() < 0.3


def test_skeleton_maps_are_differentiable_in_joints(val):
    joints = val["joints_t"][:1].double().requires_grad_(True)
    maps = ps.skeleton_maps(joints, 12, width=1.0)
    weights = torch.rand(maps.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (maps * weights).sum().backward()
    assert torch.isfinite(joints.grad).all() and joints.grad[:, :22].abs().sum() > 0
    assert joints.grad[:, 22:].abs().sum() == 0  # hands and face do not enter the maps
    direction = torch.randn(joints.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        plus = (ps.skeleton_maps(joints + eps * direction, 12) * weights).sum()
        minus = (ps.skeleton_maps(joints - eps * direction, 12) * weights).sum()
    assert torch.allclose((plus - minus) / (2 * eps), (joints.grad * direction).sum(), rtol=1e-4)


# --- PoseScore on a trained g_skel ----------------------------------------------------------------

def test_train_writes_a_loadable_folder(trained, run_dir):
    ctx, validation = trained
    folder = run_dir / "posescore"
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "posescore_config.json",
                 "validation.json", "metrics.jsonl", "maps.png"):
        assert (folder / name).exists(), name
    assert ctx.resolution == RES and not any(p.requires_grad for p in ctx.gskel.parameters())
    for split in ("val", "bench"):
        assert {"map_psnr", "map_ssim", "joint_error_px", "true_vs_perturbed_posescore"} <= validation[split].keys()
    # g_skel learned something: better maps than predicting nothing (all-zero maps score about 12 dB)
    assert validation["val"]["map_psnr"] > 15


def test_posescore_prefers_the_true_pose_and_falls_with_perturbation(trained, val, run_dir):
    ctx, validation = trained
    body = pd.load_body_model(run_dir / "body")
    levels = (0.1, 0.2, 0.3, 0.4, 0.5)
    results = [ps.true_vs_perturbed(ps.posescore_reward, val["latents"], {"joints": val["joints_t"]},
                                    ps.perturbed_joints(body, val, levels, seed=seed), levels, ctx)
               for seed in (1, 2)]  # two fresh perturbation directions per subject: 120 pairs
    print("toy val, true vs perturbed:", results)
    assert np.mean([r["accuracy"] for r in results]) >= 0.95
    assert all(r["spearman_mean"] <= -0.8 for r in results)


def test_batched_over_views_equals_a_loop(trained, val):
    ctx, _ = trained
    views, joints = val["latents"][:3], val["joints_t"][:3]
    rewards, parts = ps.posescore_reward(views, {"joints": joints}, ctx)
    target = ps.skeleton_maps(joints, RES, ctx.width)
    per_view = []
    for v, azimuth in enumerate(pd.VIEW_AZIMUTHS):
        for b in range(len(views)):  # one view of one subject at a time
            logits = ps.gskel_apply(ctx.gskel, views[b:b + 1, v], torch.tensor([v]))
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target[b:b + 1, v])
            assert torch.allclose(-bce, parts[f"view_{azimuth:03d}"][b], atol=1e-5)
            per_view.append(-bce)
    assert torch.allclose(torch.stack(per_view).view(pd.NUM_VIEWS, -1).mean(0), rewards, atol=1e-5)
    # bone-group parts weight each group by its bone count and add back up to the reward
    groups = sum(parts[f"bones_{n}"] * len(b) for n, b in pd.BONE_GROUPS.items()) / len(pd.BONES)
    assert torch.allclose(groups, rewards, atol=1e-5)


def test_gradients_wrt_views_are_finite_nonzero_and_match_finite_differences(val):
    ctx = _tiny_ctx(res=8, dtype=torch.float64)
    torch.manual_seed(0)
    views = (torch.rand(2, pd.NUM_VIEWS, 6, 8, 8, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    batch = {"joints": val["joints_t"][:2].double()}
    for name, fn in ps.REWARDS.items():
        rewards, parts = fn(views, batch, ctx)
        assert rewards.shape == (2,) and all(p.shape == (2,) for p in parts.values())
        (grad,) = torch.autograd.grad(rewards.sum(), views)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        direction = torch.randn(views.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        eps = 1e-6
        with torch.no_grad():
            plus = fn(views + eps * direction, batch, ctx)[0].sum()
            minus = fn(views - eps * direction, batch, ctx)[0].sum()
        assert torch.allclose((plus - minus) / (2 * eps), (grad * direction).sum(), rtol=1e-4), name


def test_keypoint_reward_shares_the_signature_and_prefers_the_true_pose(trained, val, run_dir):
    ctx, validation = trained
    assert set(ps.REWARDS) >= {"posescore", "keypoints"}
    body = pd.load_body_model(run_dir / "body")
    moved = ps.perturbed_joints(body, val, (0.5,), seed=1)
    true_r, parts = ps.keypoints_reward(val["latents"], {"joints": val["joints_t"]}, ctx)
    moved_r, _ = ps.keypoints_reward(val["latents"], {"joints": moved[0]}, ctx)
    assert set(parts) == {f"view_{a:03d}" for a in pd.VIEW_AZIMUTHS}
    assert (true_r > moved_r).float().mean() >= 0.8
    # evaluate's view joint error is its own function (pixels), which the reward only rescales
    error = ps.view_joint_error(ctx, val["latents"], val["joints_t"])  # (N, V)
    assert error.shape == (len(val["latents"]), pd.NUM_VIEWS) and (error > 0).all()
    assert torch.allclose(true_r, -error.mean(1) / RES, atol=1e-6)


def test_reward_batch_is_the_pair_row_without_multiview_ground_truth(run_dir):
    arrays = pd.load_split(run_dir / "data" / "bench" / "bench.npz")  # the toy bench: add what a real one holds
    count = len(arrays["joints"])
    arrays |= dict(split=np.array(["dynamic"] * count), image=arrays["color"][:, 0],
                   mask=(arrays["color"][:, :, 0] < 255).astype(np.uint8))  # (N, V, H, W) 0/1, as bench.npz stores it
    batch = ps.reward_batch(arrays, [2, 0])
    assert not {"color", "normal", "depth", "split"} & set(batch) and {"joints", "mask", "body_pose"} <= set(batch)
    assert torch.equal(batch["joints"], torch.from_numpy(arrays["joints"][[2, 0]]))
    assert batch["mask"].shape == (2, RES, RES) and batch["mask"].dtype == torch.float32  # the front view's
    assert torch.equal(batch["mask"], torch.from_numpy(arrays["mask"][[2, 0], 0]).float())
    assert torch.equal(batch["image"], torch.from_numpy(arrays["image"][[2, 0]]).float() / 255)


def test_dice_reward_prefers_the_true_pose_and_does_not_pay_for_hedging(trained, val, run_dir):
    """posescore_dice: true pose above a perturbed one, like PoseScore; and its overlap term
    (checked by hand) falls when a prediction spreads out, where per-pixel BCE can rise."""
    ctx, _ = trained
    body = pd.load_body_model(run_dir / "body")
    moved = ps.perturbed_joints(body, val, (0.5,), seed=1)
    true_r, parts = ps.posescore_dice_reward(val["latents"], {"joints": val["joints_t"]}, ctx)
    moved_r, _ = ps.posescore_dice_reward(val["latents"], {"joints": moved[0]}, ctx)
    assert (true_r > moved_r).float().mean() >= 0.8
    assert torch.allclose(true_r, parts["bce"] - ps.DICE_WEIGHT * (1 - parts["dice"]), atol=1e-6)
    target = ps.skeleton_maps(val["joints_t"][:1], RES, 1.0)[0, 0]  # (K, H, W) sharp lines
    spread = ps.skeleton_maps(val["joints_t"][:1], RES, 3.0)[0, 0] * 0.5  # a hedge: wide and faint
    expect = lambda p, t: (2 * (p * t).sum((-2, -1)) + 1e-3) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1e-3)
    assert torch.allclose(ps.soft_dice(spread, target), expect(spread, target))
    assert (ps.soft_dice(spread, target) < 0.8 * ps.soft_dice(target, target)).all()


def test_perceptual_term_loads_local_torchscript(trained, val, tmp_path):
    ctx, _ = trained

    class MeanAbs(torch.nn.Module):  # stands in for an exported LPIPS
        def forward(self, a, b):
            return (a - b).abs().mean((1, 2, 3))

    path = tmp_path / "lpips.pt"
    torch.jit.script(MeanAbs()).save(str(path))
    ctx_p = ps.RewardContext(**{**ctx.__dict__, "perceptual": ps.load_perceptual(path), "perceptual_weight": 2.0})
    batch = {"joints": val["joints_t"][:2]}
    plain, _ = ps.posescore_reward(val["latents"][:2], batch, ctx)
    with_p, parts = ps.posescore_reward(val["latents"][:2], batch, ctx_p)
    assert torch.allclose(with_p, plain + 2.0 * parts["perceptual"]) and (parts["perceptual"] < 0).all()
    with pytest.raises(pd.UserError):
        ps.load_perceptual(tmp_path / "missing.pt")


# --- bad input, the score CLI -------------------------------------------------------------------

def test_bad_input_is_refused_in_one_line(val):
    ctx = _tiny_ctx(res=8)
    views, joints = torch.zeros(2, pd.NUM_VIEWS, 6, 8, 8), val["joints_t"][:2]
    bad = [
        (views[:, :5], joints),  # five views
        (torch.zeros(2, pd.NUM_VIEWS, 3, 8, 8), joints),  # colour only
        (torch.zeros(2, pd.NUM_VIEWS, 6, 16, 16), joints),  # wrong resolution
        (views.clone().index_fill_(0, torch.tensor([1]), float("nan")), joints),
        (views, joints[:1]),  # batch mismatch
        (views, joints[:, :, :2]),  # 2D joints
        (views, joints.clone().index_fill_(0, torch.tensor([0]), float("nan"))),
    ]
    for fn in ps.REWARDS.values():
        for bad_views, bad_joints in bad:
            with pytest.raises(pd.UserError):
                fn(bad_views, {"joints": bad_joints}, ctx)
        with pytest.raises(pd.UserError):
            fn(views, {}, ctx)
    with pytest.raises(pd.UserError):
        ps.skeleton_maps(joints[0], 8)


def test_score_cli_on_a_recon_folder(trained, run_dir, val, tmp_path):
    recon = tmp_path / "recon" / "base"
    for i in range(3):
        (recon / f"{i:05d}").mkdir(parents=True)
        np.savez(recon / f"{i:05d}" / "views.npz", latents=val["latents"][i].numpy())
    ps.score(ps.ScoreArgs(views_dir=recon, poses=run_dir / "data" / "scans" / "val.npz", run_dir=run_dir))
    result = json.loads((recon / "score_posescore.json").read_text())
    assert result["count"] == 3 and len(result["per_sample"]) == 3
    expected, _ = ps.posescore_reward(val["latents"][:3], {"joints": val["joints_t"][:3]}, trained[0])
    assert np.allclose([s["reward"] for s in result["per_sample"]], expected.numpy(), atol=1e-5)
    # a user's mistake is one line on stderr and exit status 2
    proc = subprocess.run([sys.executable, "posescore.py", "score", "--views-dir", str(tmp_path / "nothing"),
                           "--run-dir", str(run_dir)], capture_output=True, text=True,
                          cwd=Path(ps.__file__).parent)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


# --- the pose reader: another g_skel, any orientation, started from given weights ------------------

def test_any_orientation_poses_turn_bodies_every_way(run_dir):
    """--train-on any: the broad poses' root orientations are uniform on SO(3), so the spine points
    every way (upside down included), where the broad generator keeps bodies roughly upright."""
    torch.set_num_threads(1)
    spine = {}
    for any_orientation in (False, True):
        data = ps.render_broad(run_dir, 64, RES, seed=0, device="cpu", any_orientation=any_orientation)
        up = data["joints_t"][:, 12] - data["joints_t"][:, 0]  # pelvis -> neck, (N, 3)
        spine[any_orientation] = (up[:, 1] / up.norm(dim=-1)).numpy()  # cosine with world up
    assert spine[False].min() > 0.3  # broad: never far from upright
    assert (spine[True] < -0.3).mean() > 0.2 and (spine[True] > 0.3).mean() > 0.2


def test_init_with_zero_steps_keeps_the_weights_and_writes_to_out(trained, run_dir, tmp_path):
    out = tmp_path / "reader"
    ps.train(ps.TrainArgs(run_dir=run_dir, out=out, init=run_dir / "posescore", steps=0, threads=1,
                          channels=(8,), width=2.0))  # architecture and width come from --init, not these
    source, copied = ps.load_gskel(run_dir / "posescore").gskel, ps.load_gskel(out).gskel
    for (name, a), (_, b) in zip(source.state_dict().items(), copied.state_dict().items()):
        assert torch.equal(a, b), name
    config = json.loads((out / "posescore_config.json").read_text())
    assert config["width"] == 1.0 and config["args"]["channels"] == [16, 32]
    assert (out / "validation.json").exists() and not (run_dir / "posescore" / "reader").exists()


def test_remembered_gskel_runs_once_per_distinct_input_and_changes_no_reward():
    ctx = _tiny_ctx()
    calls = []
    ctx.gskel.register_forward_hook(lambda *_: calls.append(1))
    remembered = dataclasses.replace(ctx, gskel=ps.RememberedGskel(ctx.gskel))
    generator = torch.Generator().manual_seed(0)
    views = torch.rand(3, pd.NUM_VIEWS, 6, 8, 8, generator=generator) * 2 - 1
    joints = torch.randn(3, 55, 3, generator=generator) * 0.3
    for name in ps.VALIDATED_REWARDS:  # as validation asks: every reward, the true and a moved pose
        for pose in (joints, joints + 0.05):
            before = len(calls)
            expected, _ = ps.REWARDS[name](views, {"joints": pose}, ctx)
            assert len(calls) == before + 1
            got, _ = ps.REWARDS[name](views, {"joints": pose}, remembered)
            assert torch.equal(got, expected), name
    assert len(calls) == len(ps.VALIDATED_REWARDS) * 2 + 1  # the remembered network ran once, the plain one every time
    other = views.clone()
    other[0, 2, 0, 4, 4] += 0.5  # one pixel of one view differs: no replay
    got, _ = ps.posescore_reward(other, {"joints": joints}, remembered)
    assert len(calls) == len(ps.VALIDATED_REWARDS) * 2 + 2
    assert torch.equal(got, ps.posescore_reward(other, {"joints": joints}, ctx)[0])
    assert not torch.equal(got, ps.posescore_reward(views, {"joints": joints}, ctx)[0])


def test_a_forked_reward_that_reads_only_gskel_runs_through_stage_2_and_drpose(trained, run_dir, tmp_path,
                                                                               monkeypatch):
    """The forker's path: one function, one dict line. Stage 2's validation must not call it (it may
    need context a validation cannot give), and finetune.py must train against it without NaN."""
    def mean_confidence(views, batch, ctx):  # needs nothing but g_skel: how sure g_skel is of any bone
        confidence = torch.sigmoid(ps.gskel_logits(ctx.gskel, views.to(ctx.device))).amax(2).mean((1, 2, 3))
        return confidence, {"confidence": confidence.detach()}

    monkeypatch.setitem(ps.REWARDS, "mean_confidence", mean_confidence)
    out = tmp_path / "gskel"
    ps.train(ps.TrainArgs(run_dir=run_dir, out=out, init=run_dir / "posescore", steps=0, threads=1))
    validation = json.loads((out / "validation.json").read_text())
    assert all(np.isfinite(v) for split in ("val", "bench") for v in _numbers(validation[split]))
    assert not any("mean_confidence" in key for key in validation["val"])

    count = 4
    images = np.load(run_dir / "data" / "scans" / "train.npz")
    pd.save_npz(tmp_path / "run/data/drpose/pairs.npz", image=images["color"][:count, 0], joints=images["joints"][:count])
    pd.write_json(tmp_path / "run/data/drpose/manifest.json", {"files": {"pairs.npz": count}, "resolution": RES})
    torch.manual_seed(0)
    unet = pretrain.build_unet(pretrain.unet_config(RES, (16, 32), 1, 1, 2, 16))
    pretrain.save_model(tmp_path / "run/base", unet, dict(resolution=RES, num_views=pd.NUM_VIEWS, scheduler=pretrain.SCHEDULER,
                                                           sampling=dict(sampler="ddim", num_steps=3, guidance=1.0)))
    drpose = finetune.drpose(finetune.Args(run_dir=tmp_path / "run", reward_dir=out, reward="mean_confidence",
                                           steps=2, batch_size=2, lora_rank=4, log_every=1, num_eval=0,
                                           checkpoint_every=2, device="cpu"))
    lines = [json.loads(x) for x in (drpose / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite([x["loss"], x["reward"], x["parts"]["confidence"]]).all() for x in lines)


def _numbers(tree):
    """Every number in a nested dict/list (validation.json), for a NaN check."""
    if isinstance(tree, dict):
        return [v for x in tree.values() for v in _numbers(x)]
    if isinstance(tree, list):
        return [v for x in tree for v in _numbers(x)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_ensemble_reward_is_mean_minus_spread_and_loads_its_members(trained, val, run_dir, tmp_path):
    """posescore_ensemble: mean - ENSEMBLE_K * std of the members' PoseScores; without members it is PoseScore;
    load_reward_context reads the members that ensemble.json lists (relative folders) and refuses a bad list."""
    ctx, _ = trained
    views, batch = val["latents"][:3], {"joints": val["joints_t"][:3]}
    alone, _ = ps.posescore_ensemble_reward(views, batch, ctx)
    assert torch.allclose(alone, ps.posescore_reward(views, batch, ctx)[0], atol=1e-5)
    other = _tiny_ctx(res=ctx.resolution)  # an untrained g_skel: it disagrees with the trained one
    mixed = ps.RewardContext(**{k: getattr(ctx, k) for k in ("gskel", "resolution", "width", "device")}, members=(other,))
    got, parts = ps.posescore_ensemble_reward(views, batch, mixed)
    scores = torch.stack([ps.posescore_reward(views, batch, c)[0] for c in (ctx, other)])
    assert torch.allclose(got, scores.mean(0) - ps.ENSEMBLE_K * scores.std(0, unbiased=False), atol=1e-5)
    assert (got < scores.mean(0)).all() and torch.allclose(parts["mean"], scores.mean(0))
    folder = tmp_path / "ensemble"
    shutil.copytree(run_dir / "posescore", folder)
    (folder / "ensemble.json").write_text(json.dumps({"members": ["../member"]}))
    shutil.copytree(run_dir / "posescore", tmp_path / "member")
    loaded = ps.load_reward_context(folder)
    assert len(loaded.members) == 1 and ps.load_reward_context(run_dir / "posescore").members == ()
    same, _ = ps.posescore_ensemble_reward(views, batch, loaded)  # two equal g_skels: no spread
    assert torch.allclose(same, ps.posescore_reward(views, batch, ctx)[0], atol=1e-4)
    (folder / "ensemble.json").write_text(json.dumps({"members": "../member"}))
    with pytest.raises(pd.UserError, match="ensemble.json"):
        ps.load_reward_context(folder)
    (folder / "ensemble.json").write_text(json.dumps({"members": ["../missing"]}))
    with pytest.raises(pd.UserError, match="missing"):
        ps.load_reward_context(folder)
