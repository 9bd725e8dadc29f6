"""The judge (pose reader + solidity) and the supervised ceiling's levers (replay, EMA): would each fail
if it were wrong?"""

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import posescore
from posescore import box_blur, fade, judged_error, solid_mess, solidity, speckle
from pretrain import train_base
from prepare_data import views_mask
from plumbing import UserError
from test_model import Killed, make_split, tiny_args, weights


def figure(count=4, res=32, seed=0):
    """(N, V, 6, H, W) view latents: a solid figure (a vertical bar plus an arm) on the white background."""
    g = torch.Generator().manual_seed(seed)
    views = torch.ones(count, 6, 6, res, res)
    for i in range(count):
        x = int(torch.randint(10, 20, (1,), generator=g))
        views[i, :, :, 6:26, x:x + 4] = -0.6  # a dark body: normal channels well below the mask threshold
        views[i, :, :, 10:12, x:x + 10] = -0.2  # an arm, two pixels thick
    return views


def test_solidity_keeps_blur_and_speckle_and_scales_with_fading():
    gt = figure()
    assert torch.allclose(solidity(gt, gt), torch.ones(4, 6))
    g = torch.Generator().manual_seed(0)
    assert solidity(box_blur(gt, 6), gt).min() > 0.9  # a blob still draws the body's ink
    assert solidity(speckle(gt, 0.1, g), gt).min() > 0.9  # the median removes isolated pixels
    faint = solidity(fade(gt, 0.7), gt)
    assert torch.allclose(faint, torch.full_like(faint, 0.3), atol=0.02)  # a 70% fade keeps 30% of the ink
    assert solidity(torch.ones_like(gt), gt).max() == 0  # nothing drawn


def test_judged_error_penalises_only_views_below_the_solid_share():
    error = torch.tensor([1.0, 1.0, 1.0, 1.0])
    solid = torch.tensor([1.0, posescore.SOLID_SHARE, posescore.SOLID_SHARE / 2, 0.0])
    judged = judged_error(error, solid)
    assert judged[0] == judged[1] == 1.0
    assert judged[2] == pytest.approx(1 + posescore.UNSOLID_PENALTY_PX / 2)
    assert judged[3] == pytest.approx(1 + posescore.UNSOLID_PENALTY_PX)


def test_solid_mess_is_reproducible_messy_and_keeps_the_figure_solid():
    gt = figure(count=64).flatten(0, 1)  # (N, 6, H, W)
    a = solid_mess(gt, torch.Generator().manual_seed(3))
    b = solid_mess(gt, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == gt.shape and a.min() >= -1 and a.max() <= 1
    changed = (a - gt).abs().flatten(1).amax(1) > 0.05
    assert 0.5 < changed.float().mean() < 1.0  # most views get some mess, not all
    assert solidity(a, gt).mean() > 0.9  # mess, not fading
    strong = solid_mess(gt, torch.Generator().manual_seed(3), strength=2.0)
    assert (strong - gt).abs().mean() > (a - gt).abs().mean()


def test_view_joint_error_is_the_reader_error_not_a_reward(monkeypatch):
    """The evaluation metric reads joints off the reader's maps; editing a registry reward cannot move it."""
    torch.manual_seed(0)
    gskel = posescore.build_gskel(32, (8, 16)).eval()
    ctx = posescore.RewardContext(gskel=gskel, resolution=32, width=1.0, device=torch.device("cpu"))
    views, joints = figure(count=2), torch.randn(2, 55, 3) * 0.3
    before = posescore.view_joint_error(ctx, views, joints)
    assert before.shape == (2, 6) and (before > 0).all()
    monkeypatch.setitem(posescore.REWARDS, "keypoints", lambda *a: (torch.zeros(2), {}))
    assert torch.equal(posescore.view_joint_error(ctx, views, joints), before)
    # and it is the distance between the joints read off the maps and the projected GT joints
    maps = torch.sigmoid(posescore.gskel_logits(gskel, views))
    truth = posescore.project_joints(joints, 32)
    expect = (posescore.joints_from_maps(maps) - truth).norm(dim=-1).mean(-1)
    assert torch.allclose(before, expect, atol=1e-5)


def test_mess_augmentation_is_a_reader_training_flag():
    with pytest.raises(UserError, match="--mess"):
        posescore.TrainArgs(mess=-1.0).resolved()


@pytest.fixture
def ceiling_world(tmp_path):
    make_split(tmp_path / "data/scans", "train", 8, seed=0)
    make_split(tmp_path / "data/scans", "val", 2, seed=1)
    make_split(tmp_path / "data/drpose_gt", "train", 6, seed=5)
    return tmp_path


def replay_args(run_dir, **kw):
    flags = dict(train_data=run_dir / "data/drpose_gt/train.npz", replay_data=run_dir / "data/scans/train.npz",
                 replay_share=0.5, ema_decay=0.9)
    return tiny_args(run_dir, **(flags | kw))


def test_replay_and_ema_change_training_and_resume_exactly(ceiling_world, tmp_path):
    straight = train_base(replay_args(ceiling_world))
    plain = train_base(tiny_args(ceiling_world, train_data=ceiling_world / "data/drpose_gt/train.npz",
                                 out=tmp_path / "plain"))
    a, p = weights(straight), weights(plain)
    assert any(not torch.equal(a[k], p[k]) for k in a)  # replay and EMA do something
    assert (ceiling_world / "base_ckpt/step_000002/ema.pt").exists()
    record = json.loads((straight / "model_config.json").read_text())
    assert record["train_args"]["replay_share"] == 0.5 and record["train_args"]["ema_decay"] == 0.9

    other = tmp_path / "other"
    shutil.copytree(ceiling_world / "data", other / "data")

    def kill(step):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train_base(replay_args(other), hook=kill)
    resumed = weights(train_base(replay_args(other, resume=True)))
    assert all(torch.equal(a[k], resumed[k]) for k in a)  # the average resumes too
    with pytest.raises(UserError, match="ema_decay differs"):
        train_base(replay_args(other, steps=6, resume=True, ema_decay=0.5))


def test_replay_flags_go_together(ceiling_world):
    with pytest.raises(UserError, match="--replay-data and --replay-share"):
        tiny_args(ceiling_world, replay_share=0.5).resolved()
    with pytest.raises(UserError, match="--ema-decay"):
        tiny_args(ceiling_world, ema_decay=1.0).resolved()


def test_views_mask_sees_the_test_figure():
    assert views_mask(figure(count=1))[0, 0].sum() > 50


def test_judge_check_cases_keep_the_front_view_and_the_rules_read_the_table():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("judge_check", Path(__file__).parents[1] / "bench/judge_check.py")
    jc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jc)
    gt, scans = figure(count=4), figure(count=2, seed=7)
    views = jc.cases(gt, scans, anchor_stride=2, seed=0)
    assert set(views) == {"clean", *jc.SOLID, *jc.WRONG, *jc.FAINT, *jc.POSE_FREE}
    for name, v in views.items():
        assert v.shape == gt.shape and torch.equal(v[:, 0], gt[:, 0])  # the input view is never edited
    assert torch.equal(views[jc.WRONG[1]][:, 1:], gt.roll(2, 0)[:, 1:])
    fair = {"clean": 1.0} | {n: 1.2 for n in jc.SOLID} | {n: 4.0 for n in jc.WRONG} | {n: 9.0 for n in jc.FAINT}
    verdicts = jc.rules({n: {"judged": v} for n, v in fair.items()})
    assert all(rule["passes"] for rule in verdicts.values())
    fooled = dict(fair, **{jc.FAINT[0]: 2.0})  # a faint drawing reading better than a wrong pose
    assert not jc.rules({n: {"judged": v} for n, v in fooled.items()})["faint and fuzzy no better than best wrong"]["passes"]


def _judge_check():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("judge_check", Path(__file__).parents[1] / "bench/judge_check.py")
    jc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jc)
    return jc


def test_judge_check_pose_free_cases_carry_the_ink_and_not_the_limbs():
    jc = _judge_check()
    gt = figure(count=20)
    views = jc.cases(gt, figure(count=2, seed=7), anchor_stride=2, seed=0)
    assert set(jc.POSE_FREE) <= set(views)
    mean = views[jc.POSE_FREE[0]]
    assert torch.allclose(mean[0, 1:], gt[[(0 + 1 * (j + 1)) % 20 for j in range(16)], 1:].mean(0))  # 16 others
    blob = views[jc.POSE_FREE[1]]
    assert torch.equal(blob[:, 0], gt[:, 0])
    ratio = posescore.ink(blob[:, 1:]) / posescore.ink(gt[:, 1:])
    assert ((ratio > 0.8) & (ratio < 1.25)).all()  # the body's ink ...
    assert (blob[:, 1:] - gt[:, 1:]).abs().amax((-3, -2, -1)).min() > 0.3  # ... but not the figure


def test_judge_check_rules_for_pose_free_and_gamed_views():
    jc = _judge_check()
    fair = {"clean": 1.0} | {n: 1.2 for n in jc.SOLID} | {n: 4.0 for n in jc.WRONG} | {n: 9.0 for n in jc.FAINT}
    fair |= {n: 6.0 for n in jc.POSE_FREE} | {jc.GAMED: 5.0, jc.GAMED_BASE: 3.5}
    verdicts = jc.rules({n: {"judged": v} for n, v in fair.items()})
    assert len(verdicts) == 6 and all(rule["passes"] for rule in verdicts.values())
    blob_fools = dict(fair, **{jc.POSE_FREE[0]: 3.9})  # the mean of many people reads better than a wrong pose
    assert not jc.rules({n: {"judged": v} for n, v in blob_fools.items()})[
        "pose-free (a), (b) no better than best wrong"]["passes"]
    gamed_fools = dict(fair, **{jc.GAMED: 3.4})  # the gamed model's blobs read better than the base's figures
    assert not jc.rules({n: {"judged": v} for n, v in gamed_fools.items()})[
        "(c) gamed views no better than the base's"]["passes"]


def test_ink_gaussians_keep_mass_centre_and_spread():
    gt = figure(count=3).flatten(0, 1)  # (N, 6, H, W)
    blob = posescore.ink_gaussians(gt)

    def moments(views):
        dark = posescore.darkness(views)
        grid = torch.arange(32.0) + 0.5
        mass = dark.sum((-2, -1))
        u = (dark.sum(-2) * grid).sum(-1) / mass
        v = (dark.sum(-1) * grid).sum(-1) / mass
        vv = (dark.sum(-1) * (grid - v[:, None]) ** 2).sum(-1) / mass
        return mass, u, v, vv

    for a, b in zip(moments(blob), moments(gt)):
        assert torch.allclose(a, b, rtol=0.15, atol=0.5)
    cloud = posescore.ink_gaussians(gt, torch.Generator().manual_seed(0), parts=4)
    assert not torch.allclose(cloud, blob) and cloud.min() >= -1 and cloud.max() <= 1


def test_pose_free_images_are_of_the_asked_kinds_and_reproducible():
    latents = figure(count=20)  # (S, V, 6, H, W)
    subject, view = torch.arange(6), torch.tensor([0, 1, 2, 3, 4, 5])
    one = posescore.pose_free_images(latents, subject, view, ("gaussian",), torch.Generator().manual_seed(0))
    assert torch.allclose(one, posescore.ink_gaussians(latents[subject, view]))
    mean = posescore.pose_free_images(latents, subject, view, ("mean",), torch.Generator().manual_seed(0))
    again = posescore.pose_free_images(latents, subject, view, ("mean",), torch.Generator().manual_seed(0))
    assert torch.equal(mean, again) and not torch.allclose(mean, latents[subject, view])


def test_judged_error_pays_for_a_view_the_reader_is_unsure_of():
    error, solid = torch.full((4,), 2.0), torch.ones(4)
    sure = torch.tensor([1.0, posescore.SURE_SHARE, posescore.SURE_SHARE / 2, 0.0])
    judged = judged_error(error, solid, sure)
    assert judged[0] == judged[1] == 2.0
    assert judged[2] == pytest.approx(2 + posescore.UNSURE_PENALTY_PX / 2)
    assert judged[3] == pytest.approx(2 + posescore.UNSURE_PENALTY_PX)
    assert torch.equal(judged_error(error, solid), error)  # without a sureness, the rule of solidity alone


def test_judge_verdict_reads_an_empty_map_as_no_body(monkeypatch):
    """A reader whose maps are empty on a view (what a reader trained on pose-free images answers a blob with) is
    unsure of it, and the judge adds the full penalty; on the GT it is sure."""
    gskel = posescore.build_gskel(32, (8, 16)).eval()
    ctx = posescore.GskelContext(gskel=gskel, resolution=32, width=1.0, device=torch.device("cpu"))
    gt, joints = figure(count=2), torch.randn(2, 55, 3) * 0.3
    blob = torch.cat([gt[:, :1], box_blur(gt[:, 1:], 12)], 1)  # the body's ink, no sharp limbs

    def logits(net, views):  # confident bones where a sharp dark figure is drawn, empty maps elsewhere
        out = torch.full((*views.shape[:2], posescore.NUM_BONES, 32, 32), -9.0)
        out[..., 10, 10] = torch.where((views < -0.5).flatten(2).any(-1), 9.0, -9.0)[..., None]
        return out

    monkeypatch.setattr(posescore, "gskel_logits", logits)
    verdict = posescore.judge_verdict(ctx, blob, gt, joints)
    assert torch.allclose(verdict["sureness"][:, 0], torch.ones(2))
    assert (verdict["sureness"][:, 1:] < 0.01).all()
    assert (verdict["solidity"][:, 1:] > posescore.SOLID_SHARE).all()  # solid: only the sureness pays
    assert torch.allclose(verdict["judged"][:, 1:], verdict["error"][:, 1:] + posescore.UNSURE_PENALTY_PX, atol=0.2)


def test_pose_free_training_flags_are_checked():
    with pytest.raises(UserError, match="--pose-free"):
        posescore.TrainArgs(pose_free=1.5).resolved()
    with pytest.raises(UserError, match="--pose-free-kinds"):
        posescore.TrainArgs(pose_free=0.5, pose_free_kinds=()).resolved()


def test_adversarial_images_stay_in_the_ball_and_raise_the_loss():
    """PGD for adversarial training: each image moves at most eps (L2) and g_skel's loss against the unchanged
    targets rises; eps 0 leaves the images alone."""
    torch.manual_seed(0)
    gskel = posescore.build_gskel(32, (8, 16)).eval()
    images = figure(count=1)[0]  # (6 views as 6 images, 6, H, W)
    view = torch.arange(6)
    target = posescore.skeleton_maps(torch.randn(1, 55, 3) * 0.3, 32)[0]  # (6, K, H, W)
    pos_weight = torch.tensor(1.0)
    moved = posescore.adversarial_images(gskel, images, view, target, 1.0, 3, pos_weight)
    assert ((moved - images).flatten(1).norm(dim=1) <= 1.0 + 1e-4).all()
    loss = lambda x: torch.nn.functional.binary_cross_entropy_with_logits(  # noqa: E731
        posescore.gskel_apply(gskel, x, view), target).item()
    assert loss(moved) > loss(images)
    assert torch.equal(posescore.adversarial_images(gskel, images, view, target, 0.0, 3, pos_weight), images)


def test_negatives_train_gskel_to_draw_no_skeleton_on_them(tmp_path):
    """--negatives (bench/mine_negatives.py's file): rows of each batch are replaced by the file's views, read as
    their own view ids, with empty maps as the target; a g_skel trained on nothing else draws (almost) no bone
    on them, where the same training without them draws the scans' bones."""
    latents = figure(count=4)  # (N, V, 6, H, W)
    joints = torch.randn(4, 55, 3) * 0.3
    hacked = box_blur(figure(count=2, seed=1)[:, 1:], 8).flatten(0, 1)  # (10, 6, H, W): blob-like side views
    path = tmp_path / "negatives.npz"
    np.savez(path, views=((hacked * 127.5 + 127.5).round().byte()).numpy(), view_ids=np.tile(np.arange(1, 6), 2))
    negatives = posescore.load_negatives([path], 32)
    assert negatives["views"].shape == (10, 6, 32, 32) and negatives["view_ids"].tolist() == list(range(1, 6)) * 2

    def trained(share):
        args = posescore.TrainArgs(steps=60, batch_size=8, lr=2e-2, channels=(8, 16), negatives=(path,),
                                   negative_share=share, log_every=1000, threads=1).resolved()
        torch.manual_seed(0)
        return posescore.train_gskel(latents, joints, args, negatives=negatives if share else None)

    def bone_share(gskel):  # the mean bone probability on the negatives
        with torch.no_grad():
            return torch.sigmoid(posescore.gskel_apply(gskel, negatives["views"], negatives["view_ids"])).mean().item()

    assert bone_share(trained(1.0)) < 0.5 * bone_share(trained(0.0))


def test_negatives_files_are_checked(tmp_path):
    with pytest.raises(UserError, match="--negatives .*missing.npz is not a file"):
        posescore.TrainArgs(negatives=(tmp_path / "missing.npz",)).resolved()
    bad = tmp_path / "bad.npz"
    np.savez(bad, views=np.zeros((3, 6, 16, 16), np.uint8), view_ids=np.zeros(3, np.int64))
    with pytest.raises(UserError, match="not \\(M, 6, 32, 32\\)"):
        posescore.load_negatives([bad], 32)
    with pytest.raises(UserError, match="--negative-share"):
        posescore.TrainArgs(negative_share=2.0).resolved()


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).parents[1] / "bench").glob("*.py")))
def test_every_bench_script_imports(script):
    """A bench script that no longer imports (a function moved between stages) fails here, not on a GPU."""
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", Path(__file__).parents[1] / "bench" / script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).parents[1] / "bench").glob("*.sh")))
def test_every_bench_shell_script_parses(script):
    """The GPU recipes run where CI cannot: at least their syntax is checked here."""
    proc = subprocess.run(["bash", "-n", f"bench/{script}"], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
