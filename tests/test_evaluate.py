"""evaluate.py: every metric against an independent computation, then end to end on a fake run
folder laid out as reconstruct.py and prepare_data.py write it (recon/<model>/NNNNN/, data/bench/)."""

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import procrustes
from scipy.spatial.transform import Rotation

import evaluate
import posescore
from evaluate import (Args, chamfer_cm, closest_on_triangles, fscore, geometry_metrics, mpjpe_mm, normal_consistency,
                      pa_mpjpe_mm, point_to_surface_cm, procrustes_align, ssim)
from evaluate import read_metrics
from prepare_data import views_to_latents
from plumbing import UserError
from pretrain import psnr

REPO = Path(__file__).resolve().parents[1]


# --- geometry: brute force and trimesh against our KD-tree versions --------------------------------

def test_chamfer_fscore_normals_match_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 3)) * 0.1, rng.normal(size=(60, 3)) * 0.1
    na, nb = rng.normal(size=(40, 3)), rng.normal(size=(60, 3))
    na /= np.linalg.norm(na, axis=1, keepdims=True)
    nb /= np.linalg.norm(nb, axis=1, keepdims=True)
    dist = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))  # (40, 60) every pair
    assert chamfer_cm(a, b) == pytest.approx(100 * (dist.min(1).mean() + dist.min(0).mean()) / 2, rel=1e-9)
    tau = 0.05
    p, r = (dist.min(1) < tau).mean(), (dist.min(0) < tau).mean()
    assert fscore(a, b, tau) == pytest.approx(2 * p * r / (p + r))
    assert fscore(a, b + 10, tau) == 0.0  # nothing near: F is 0, not a division by zero
    forward = np.abs((na * nb[dist.argmin(1)]).sum(1)).mean()
    backward = np.abs((nb * na[dist.argmin(0)]).sum(1)).mean()
    assert normal_consistency(a, na, b, nb) == pytest.approx((forward + backward) / 2)


def test_point_to_surface_is_the_known_offset_from_a_box():
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    rng = np.random.default_rng(1)
    # Points over the interior of the +x and -y faces, 3 cm outside: the nearest surface point is on
    # that face, straight below, so the distance is exactly 3 cm.
    inner = rng.uniform(-0.4, 0.4, size=(50, 2))
    points = np.concatenate([np.c_[np.full(50, 0.53), inner], np.c_[inner[:, 0], np.full(50, -0.53), inner[:, 1]]])
    assert point_to_surface_cm(points, box) == pytest.approx(3.0, abs=1e-6)


def test_closest_point_on_a_triangle_matches_a_dense_sampling_of_it():
    rng = np.random.default_rng(2)
    a, b, c = (rng.normal(0, 1, (400, 3)) for _ in range(3))
    c[:20] = a[:20] + 1e-9 * rng.normal(0, 1, (20, 3))  # nearly degenerate triangles too
    p = rng.normal(0, 2, (400, 3))
    closest = closest_on_triangles(p, a, b, c)
    s, t = np.meshgrid(np.linspace(0, 1, 301), np.linspace(0, 1, 301))
    s, t = s[s + t <= 1], t[s + t <= 1]  # barycentric grid over each triangle
    dense = a[:, None] + s[None, :, None] * (b - a)[:, None] + t[None, :, None] * (c - a)[:, None]
    dense_dist = np.linalg.norm(dense - p[:, None], axis=2).min(1)
    exact = np.linalg.norm(closest - p, axis=1)
    spacing = np.linalg.norm(np.stack([b - a, c - a]), axis=2).max(0) / 300
    assert (exact <= dense_dist + 1e-9).all() and (dense_dist - exact <= spacing).all()


def test_point_to_surface_equals_the_closest_point_over_every_triangle():
    mesh = trimesh.creation.icosphere(subdivisions=3)
    mesh.vertices *= np.array([0.3, 0.9, 0.2])  # an elongated body of uneven triangles
    rng = np.random.default_rng(3)
    points = rng.normal(0, 0.6, (300, 3))
    tri = mesh.triangles
    every = np.stack([np.linalg.norm(closest_on_triangles(np.repeat(p[None], len(tri), 0), *tri.transpose(1, 0, 2))
                                     - p, axis=1).min() for p in points])
    assert point_to_surface_cm(points, mesh) == pytest.approx(100 * every.mean(), rel=1e-12)


def test_concentric_spheres_give_the_offset():
    inner = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    outer = trimesh.creation.icosphere(subdivisions=4, radius=0.52)  # 2 cm further out everywhere
    rng = np.random.default_rng(0)
    m = geometry_metrics(outer, inner, 4000, 0.05, rng)
    assert m["p2s_cm"] == pytest.approx(2.0, abs=0.05)  # polyhedral error of subdivision 4 is < 0.1 mm
    assert 1.95 < m["chamfer_cm"] < 2.6  # nearest *sample* is never closer than the surface
    assert m["normal_consistency"] > 0.99
    assert m["fscore"] == 1.0
    assert geometry_metrics(outer, inner, 4000, 0.015, rng)["fscore"] == 0.0  # tau under the offset
    same = geometry_metrics(inner, inner, 4000, 0.05, np.random.default_rng(0))
    assert same["p2s_cm"] < 1e-6 and same["fscore"] == 1.0


def test_translation_icp_recovers_a_known_shift():
    gt = trimesh.creation.box(extents=(0.4, 0.9, 0.25))
    pred = gt.copy()
    pred.apply_translation([0.03, -0.02, 0.01])
    plain = geometry_metrics(pred, gt, 3000, 0.05, np.random.default_rng(0), align="none")
    aligned = geometry_metrics(pred, gt, 3000, 0.05, np.random.default_rng(0), align="translation")
    assert np.allclose(aligned["shift_cm"], [-3, 2, -1], atol=0.3)
    assert plain["p2s_cm"] > 1.0 and aligned["p2s_cm"] < 0.3


# --- pose ------------------------------------------------------------------------------------------

def test_mpjpe_known_offsets():
    gt = np.random.default_rng(0).normal(size=(22, 3))
    moved = gt.copy()
    moved[5, 0] += 0.022  # one non-pelvis joint, 22 mm: mean over 22 joints is 1 mm
    assert mpjpe_mm(moved, gt) == pytest.approx(1.0)
    assert mpjpe_mm(gt + [0.3, -0.1, 0.2], gt) == pytest.approx(0.0, abs=1e-9)  # pelvis-aligned


def test_pa_mpjpe_undoes_a_similarity_and_matches_scipy():
    rng = np.random.default_rng(3)
    gt = rng.normal(size=(22, 3)) * 0.3
    rot = Rotation.random(random_state=4).as_matrix()
    pred = 1.3 * gt @ rot.T + [0.2, -0.4, 1.0]
    assert pa_mpjpe_mm(pred, gt) == pytest.approx(0.0, abs=1e-6)
    assert mpjpe_mm(pred, gt) > 10
    # With noise: scipy's disparity is the residual of the same optimal similarity, normalised by
    # the centred GT's squared norm.
    noisy = pred + rng.normal(size=pred.shape) * 0.02
    _, _, disparity = procrustes(gt, noisy)
    residual = ((procrustes_align(noisy, gt) - gt) ** 2).sum()
    assert residual == pytest.approx(disparity * ((gt - gt.mean(0)) ** 2).sum(), rel=1e-6)


# --- appearance ------------------------------------------------------------------------------------

def test_mask_iou_of_known_squares():
    pred = np.zeros((2, 10, 10), np.uint8)
    gt = np.zeros((2, 10, 10), np.uint8)
    pred[0, 0:4, 0:4] = 1  # 16 px
    gt[0, 2:6, 0:4] = 1  # 16 px, 8 shared: IoU 8 / 24
    pred[1, 5:10, 5:10] = gt[1, 5:10, 5:10] = 1  # identical: IoU 1
    assert evaluate.mask_iou(pred, gt) == pytest.approx((8 / 24 + 1) / 2)
    assert evaluate.mask_iou(np.zeros((1, 4, 4)), np.zeros((1, 4, 4))) == 1.0  # empty both: no error


def test_psnr_of_a_constant_offset_and_ssim_of_constants():
    gt = np.random.default_rng(0).uniform(0, 0.8, size=(6, 3, 16, 16))
    psnr_db = lambda pred, target: psnr(torch.from_numpy(pred)[None], torch.from_numpy(target)[None]).item()
    assert psnr_db(gt + 0.1, gt) == pytest.approx(20.0)  # MSE 0.01
    assert psnr_db(gt, gt) == pytest.approx(100.0)  # capped, so json never holds Infinity
    assert ssim(gt, gt) == pytest.approx(1.0)
    x, y = np.full((6, 3, 16, 16), 0.3), np.full((6, 3, 16, 16), 0.5)
    c1 = 0.01 ** 2  # constant images: SSIM reduces to its luminance term
    assert ssim(x, y) == pytest.approx((2 * 0.3 * 0.5 + c1) / (0.3 ** 2 + 0.5 ** 2 + c1))


def test_reward_log_skips_lines_without_reward_and_broken_lines(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 0, "reward": 0.1}\n{"step": 1, "loss": 3}\n{"step": 2, "rew\n'
                   '{"step": 3, "reward": 0.4}\n')
    lines = [x for x in read_metrics(log) if "reward" in x]
    assert [x["step"] for x in lines] == [0, 3] and [x["reward"] for x in lines] == [0.1, 0.4]


# --- a fake run folder, exactly as the contract lays it out ----------------------------------------

N, RES, V = 3, 16, 6
OFFSET_M = 0.02  # base meshes are the GT sphere 2 cm larger


def _manifest(folder: Path, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(dict(
        count=N, views=[0, 45, 90, 180, 270, 315], resolution=RES, seed=0, source="test", preset="demo",
        conventions={}, **extra)))


def make_run(root: Path, models=("base", "drpose")) -> Path:
    """bench (spheres, random joints and renders) and recon: drpose = GT exactly; base = spheres
    2 cm larger, one joint 22 mm off, colour views 0.1 brighter."""
    rng = np.random.default_rng(0)
    run = root / "run"
    bench_dir = run / "data" / "bench"
    _manifest(bench_dir, files={"bench.npz": N})
    joints = rng.normal(size=(N, 55, 3)).astype(np.float32) * 0.3
    color = rng.integers(0, 200, size=(N, V, 3, RES, RES), dtype=np.uint8)  # room for +0.1
    normal = rng.integers(0, 256, size=(N, V, 3, RES, RES), dtype=np.uint8)
    np.savez(bench_dir / "bench.npz", joints=joints, image=color[:, 0], color=color, normal=normal,
             mask=np.ones((N, V, RES, RES), np.uint8), category=np.array(["jump", "kick", "roll"]),
             outfit=np.arange(N))
    (bench_dir / "meshes").mkdir()
    radii = [0.3, 0.35, 0.4]
    for i, r in enumerate(radii):
        trimesh.creation.icosphere(subdivisions=3, radius=r).export(bench_dir / "meshes" / f"{i:05d}.ply")
    gt_latents = views_to_latents(torch.from_numpy(color).float() / 255, torch.from_numpy(normal).float() / 255)
    for tag in models:
        folder = run / "recon" / tag
        _manifest(folder, model=str(run / tag))
        for i, r in enumerate(radii):
            sample = folder / f"{i:05d}"
            sample.mkdir()
            latents = gt_latents[i].clone()
            pred_joints = joints[i].copy()
            radius = r
            if tag == "base":
                latents[:, :3] += 0.2  # +0.1 in [0, 1] images
                pred_joints[5, 0] += 0.022
                radius = r + OFFSET_M
            np.savez(sample / "views.npz", latents=latents.numpy())
            np.savez(sample / "joints.npz", joints=pred_joints)
            (sample / "body.json").write_text("{}")
            trimesh.creation.icosphere(subdivisions=3, radius=radius).export(sample / "mesh.ply")
    (run / "drpose").mkdir()
    (run / "drpose" / "metrics.jsonl").write_text(
        "".join(json.dumps(dict(step=s, reward=0.5 + 0.01 * s, loss=1.0)) + "\n" for s in range(30)))
    return run


def run_eval(run: Path, **kw) -> dict:
    return evaluate.main(Args(run_dir=run, num_samples=1500, **kw))


def test_end_to_end_numbers_files_and_report(tmp_path):
    run = make_run(tmp_path)
    results = run_eval(run)
    base, drpose = results["models"]["base"], results["models"]["drpose"]
    assert results["subjects"] == 3 and results["reference"] == "base"
    # drpose is the GT: pose 0, images identical, samples lie on the GT surface.
    assert drpose["mpjpe_mm"]["mean"] == pytest.approx(0, abs=1e-3)
    assert drpose["pa_mpjpe_mm"]["mean"] == pytest.approx(0, abs=1e-3)
    assert drpose["p2s_cm"]["mean"] < 1e-5
    assert drpose["psnr_color_db"]["mean"] > 60 and drpose["ssim_normal"]["mean"] == pytest.approx(1)
    # base: the known offsets.
    assert base["mpjpe_mm"]["per_subject"] == pytest.approx([1.0] * 3, abs=1e-3)
    assert base["psnr_color_db"]["per_subject"] == pytest.approx([20.0] * 3, abs=1e-3)
    assert base["p2s_cm"]["mean"] == pytest.approx(100 * OFFSET_M, rel=0.05)
    assert base["chamfer_cm"]["mean"] > drpose["chamfer_cm"]["mean"]
    assert base["chamfer_cm"]["std"] == pytest.approx(np.std(base["chamfer_cm"]["per_subject"]))
    change = results["change"]["drpose"]
    assert change["mpjpe_mm"]["verdict"] == "better" and change["p2s_cm"]["verdict"] == "better"
    assert change["psnr_normal_db"]["verdict"] == "same"  # both identical to the GT normals
    assert change["psnr_color_db"]["relative"] > 0
    assert "posescore" not in base  # no posescore/ folder: skipped, not failed

    out = run / "eval"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["models"]["base"]["mpjpe_mm"]["mean"] == pytest.approx(base["mpjpe_mm"]["mean"])
    md = (out / "results.md").read_text()
    assert "| metric | base | drpose | drpose vs base |" in md
    assert re.search(r"\| MPJPE \(mm\) ↓ \| 1 ± \S+ \| 0 ± 0 \| -100\.0% \(better\) \|", md), md
    assert re.search(r"\| PSNR colour \(dB\) ↑ \| 20 ± \S+ \| 100 ± 0 \| \+400\.0% \(better\) \|", md), md

    page = (out / "report.html").read_text()
    refs = re.findall(r"(?:src|href)='([^']+)'", page)
    assert {"metrics.png", "reward_curve.png", "scatter.png", "results.json", "grids/00002.png"} <= set(refs)
    for ref in refs:
        assert not Path(ref).is_absolute() and (out / ref).is_file(), ref
    for ref in refs:
        if ref.endswith(".png"):
            assert matplotlib.image.imread(out / ref).ndim == 3


def test_one_model_alone(tmp_path):
    run = make_run(tmp_path, models=("drpose",))
    results = run_eval(run, models=("drpose",), max_grids=1)
    assert results["change"] == {} and "drpose" in results["models"]
    out = run / "eval"
    assert not (out / "scatter.png").exists()
    assert "| metric | drpose |" in (out / "results.md").read_text()
    for ref in re.findall(r"(?:src|href)='([^']+)'", (out / "report.html").read_text()):
        assert (out / ref).is_file(), ref


def test_posescore_is_used_when_present(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    (run / "posescore").mkdir()
    seen = {}

    def fake_reward(views, batch, ctx):
        # A reward computable by hand: the mean colour latent, so base (brighter) scores 0.2 higher.
        assert views.shape[1:] == (V, 6, RES, RES) and batch["joints"].shape[1:] == (55, 3)
        seen["ctx"] = ctx
        return views[:, :, :3].mean(dim=(1, 2, 3, 4)), {"bce": torch.zeros(len(views))}

    fake = types.ModuleType("posescore")
    fake.load_reward_context = lambda folder, device: ("ctx", Path(folder).name, device)
    fake.posescore_reward = fake_reward
    fake.reward_in_chunks, fake.reward_batch = posescore.reward_in_chunks, posescore.reward_batch  # the real batching
    monkeypatch.setattr(evaluate, "posescore", fake)
    results = run_eval(run, max_grids=0)
    assert seen["ctx"] == ("ctx", "posescore", "cpu")
    base, drpose = results["models"]["base"]["posescore"], results["models"]["drpose"]["posescore"]
    assert np.allclose(np.array(base["per_subject"]) - drpose["per_subject"], 0.2, atol=1e-5)
    assert results["gt_reference"]["posescore"]["mean"] == pytest.approx(drpose["mean"], abs=1e-6)  # drpose = GT
    assert "PoseScore" in (run / "eval" / "results.md").read_text()


def fake_posescore(view_joint_error):
    """A posescore module whose pose reader reads `view_joint_error(ctx, views, joints)` (B, V) px, for the
    view joint error and the judge (every view drawn solidly, the real penalty rule); its `keypoints`
    reward is broken, so a metric that still read it would fail."""
    def broken(views, batch, ctx):
        raise AssertionError("the evaluation read the keypoints reward")

    fake = types.ModuleType("posescore")
    fake.load_gskel = lambda folder, device: types.SimpleNamespace(folder=Path(folder).name, resolution=RES)
    fake.view_joint_error = view_joint_error
    fake.solidity, fake.judged_error = (lambda views, gt: torch.ones(views.shape[:2])), posescore.judged_error

    def judge_verdict(reader, views, gt_views, joints):  # drawn solidly, the reader sure: the judged error is the error
        error = view_joint_error(reader, views, joints)
        return dict(error=error, solidity=torch.ones_like(error), sureness=torch.ones_like(error), judged=error)

    fake.judge_verdict = judge_verdict
    fake.REWARDS = {"keypoints": broken}
    fake.reward_in_chunks, fake.reward_batch = posescore.reward_in_chunks, posescore.reward_batch
    return fake


def test_view_joint_error_uses_the_pose_reader_in_pixels(tmp_path, monkeypatch):
    """The pose reader's folder is loaded with posescore.load_gskel and read by
    posescore.view_joint_error (pixels per view, averaged over the views), never by a reward of the
    registry; evaluate reports the GT's too."""
    run = make_run(tmp_path)
    (run / "pose_reader").mkdir()
    seen = []

    def fake_error(gskel_ctx, views, joints):
        seen.append(gskel_ctx.folder)
        assert joints.shape[1:] == (55, 3)
        # base views are 0.2 brighter: a made-up error of 2 px for base, 0 for drpose (= GT)
        error = (views[:, :, :3].mean(dim=(1, 2, 3, 4)) - GT_MEAN[: len(views)]) * 10
        return error[:, None] * torch.tensor([0.5, 1.5, 1, 1, 1, 1])  # (B, V): the views average to it

    fake = fake_posescore(fake_error)
    monkeypatch.setattr(evaluate, "posescore", fake)
    data = np.load(run / "data" / "bench" / "bench.npz")
    GT_MEAN = views_to_latents(torch.from_numpy(data["color"]).float() / 255,
                               torch.from_numpy(data["normal"]).float() / 255)[:, :, :3].mean(dim=(1, 2, 3, 4))
    results = run_eval(run, max_grids=0)
    assert set(seen) == {"pose_reader"}
    assert results["models"]["base"]["view_joint_error_px"]["per_subject"] == pytest.approx([2.0] * N, abs=1e-4)
    assert results["models"]["drpose"]["view_joint_error_px"]["mean"] == pytest.approx(0, abs=1e-5)
    assert results["gt_reference"]["view_joint_error_px"]["mean"] == pytest.approx(0, abs=1e-5)
    assert results["change"]["drpose"]["view_joint_error_px"]["verdict"] == "better"
    assert "posescore" not in results["models"]["base"]  # no posescore/ folder: skipped


# --- errors a user can hit -------------------------------------------------------------------------

def test_missing_inputs_name_the_file_and_the_command(tmp_path):
    run = make_run(tmp_path, models=("base",))
    with pytest.raises(UserError, match=r"recon/drpose/manifest.json is missing; make it with `python reconstruct.py"):
        run_eval(run)
    (run / "recon" / "base" / "00001" / "mesh.ply").unlink()
    with pytest.raises(UserError, match=r"recon/base/00001/mesh.ply is missing"):
        run_eval(run, models=("base",))
    with pytest.raises(UserError, match=r"data/bench/manifest.json is missing; make it with `python prepare_data.py"):
        run_eval(tmp_path / "elsewhere")


def test_cli_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "evaluate.py", "--run-dir", str(tmp_path / "nothing"),
                           "--models", "base", "drpose"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bench" in lines[0]


# --- bench splits, the supervised ceiling and the gap closed ---------------------------------------

def test_gap_closed_is_the_share_of_the_way_from_base_to_ceiling():
    assert evaluate.gap_closed(5.0, 4.0, 3.0) == pytest.approx(0.5)
    assert evaluate.gap_closed(5.0, 5.5, 3.0) == pytest.approx(-0.25)  # worse than the base: negative
    assert evaluate.gap_closed(5.0, 4.0, 5.0) is None  # a ceiling no better than the base: no gap


def test_split_table_gap_closed_and_views_only_samples(tmp_path, monkeypatch):
    """Two splits (the first two subjects dynamic, the last extreme), a ceiling model, and
    reconstructions whose sample 1 has views only (reconstruct.py --fit-every 2): 3D metrics average
    over the fitted subjects, view metrics over all, and gap closed is computed per split from a view
    joint error the test controls."""
    run = make_run(tmp_path, models=("base", "drpose", "ceiling"))
    bench = dict(np.load(run / "data/bench/bench.npz"))
    bench["split"] = np.array(["dynamic", "dynamic", "extreme"])
    np.savez(run / "data/bench/bench.npz", **bench)
    for tag in ("base", "drpose", "ceiling"):
        _manifest(run / "recon" / tag, model=str(run / tag), fit_every=2)
        for name in ("joints.npz", "mesh.ply", "body.json"):
            (run / "recon" / tag / "00001" / name).unlink()
    error = {"base": [6.0, 4.0, 9.0], "drpose": [5.0, 4.0, 9.5], "ceiling": [3.0, 3.0, 7.0]}  # px per subject
    (run / "pose_reader").mkdir()

    error["gt"] = [1.0, 1.0, 1.0]
    # The view joint error reads the models in order, then the GT; the judge reads them again in the same order.
    order = iter(["base", "drpose", "ceiling", "gt"] * 2)

    def fake_error(gskel_ctx, views, joints):  # the made-up error of the model being read, px per view
        return torch.tensor(error[next(order)][: len(views)])[:, None].expand(-1, V)

    monkeypatch.setattr(evaluate, "posescore", fake_posescore(fake_error))
    results = run_eval(run, models=("base", "drpose", "ceiling"), max_grids=2)

    assert results["models"]["base"]["chamfer_cm"]["count"] == 2  # subjects 0 and 2 were fitted
    assert results["models"]["base"]["chamfer_cm"]["per_subject"][1] is None
    assert results["models"]["base"]["mask_iou"]["count"] == 3
    dynamic, extreme = results["splits"]["dynamic"], results["splits"]["extreme"]
    assert dynamic["count"] == 2 and extreme["count"] == 1
    assert dynamic["models"]["base"]["view_joint_error_px"] == pytest.approx(5.0)
    # dynamic: base 5.0, drpose 4.5, ceiling 3.0 -> 25%; extreme: base 9, drpose 9.5, ceiling 7 -> -25%
    assert dynamic["gap_closed"]["drpose"] == pytest.approx(0.25)
    assert extreme["gap_closed"]["drpose"] == pytest.approx(-0.25)
    text = (run / "eval" / "results.md").read_text()
    assert "| bench dynamic | 2 |" in text and "25%" in text and "-25%" in text
    assert "[2 subjects]" in text  # 3D rows say how many subjects they average


# --- the report: headline table, verdict, captions -------------------------------------------------

def _results(errors: dict, posescore_change: float = 0.12) -> dict:
    """A results dict as evaluate.main writes it, with only the judge's metric and PoseScore:
    errors = row -> model -> judged error (px); row `val` is a judge set, the others bench splits."""
    tags = list(next(iter(errors.values())))
    counts = {"val": 4, "dynamic": 3, "extreme": 2}
    splits, sets = {}, {}
    for name, by_model in errors.items():
        if name == "val":
            sets[name] = dict(count=counts[name], models={t: {"judged_px": v} for t, v in by_model.items()})
            continue
        entry = dict(count=counts[name], models={t: {evaluate.GAP_METRIC: v, "posescore": -0.05}
                                                 for t, v in by_model.items()})
        if "ceiling" in by_model:
            entry["gap_closed"] = {t: evaluate.gap_closed(by_model["base"], v, by_model["ceiling"])
                                   for t, v in by_model.items() if t not in ("base", "ceiling")}
        splits[name] = entry
    stat = dict(mean=4.0, std=1.0, count=5, per_subject=[4.0] * 5)
    return dict(run_dir="runs/x", models={t: {evaluate.GAP_METRIC: stat, "posescore": stat} for t in tags},
                reference="base", subjects=5, bench_subjects=5, categories=[""] * 5, splits=splits, judge_sets=sets,
                change={t: {"posescore": dict(absolute=0.006, relative=posescore_change, verdict="better")}
                        for t in tags[1:]},
                gt_reference={evaluate.GAP_METRIC: dict(mean=1.27, std=0.1)}, protocol=dict(std="population"),
                metrics={})


def test_report_opens_with_the_headline_table_and_a_verdict_from_the_numbers(tmp_path):
    results = _results({"dynamic": dict(base=4.0, drpose=3.5, ceiling=3.0), "extreme": dict(base=5.0, drpose=5.2, ceiling=4.0),
                        "val": dict(base=2.0, drpose=1.9, ceiling=2.1)})
    (tmp_path / "reward_curve.png").write_bytes(b"")
    evaluate.write_report(tmp_path / "report.html", results, {"Fine-tuning reward": "reward_curve.png"},
                          [("subject 00000 crouch", "grids/00000.png")])
    page = (tmp_path / "report.html").read_text()
    first = page[page.index("<table>"):page.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", first)
    assert re.findall(r"<th>(.*?)</th>", rows[0]) == ["", "subjects", "base", "drpose", "ceiling", "drpose: gap closed"]
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in rows[1:]]
    in_distribution = evaluate.JUDGE_SET_LABELS["val"]
    assert cells[0] == [in_distribution, "4", "2.000", "1.900", "2.100",
                        "no gap: ceiling not better than base"]  # the in-distribution row comes first
    assert cells[1] == ["bench dynamic", "3", "4.000", "3.500", "3.000", "50%"]
    assert cells[2][0] == "bench extreme" and cells[2][-1] == "-20%"
    assert (f"drpose reads a better pose than the base on {in_distribution} and bench dynamic and a worse one on "
            "bench extreme (judged error, px: ") in page
    assert "PoseScore, rises 12.0%" in page and "ceiling beats the base on bench dynamic and bench extreme" in page
    order = [page.index(s) for s in ("<table>", "Verdict:", "reward_curve.png", "splits.png", "grids/00000.png",
                                     "Every metric", "Protocol")]
    assert order == sorted(order)
    figures = re.findall(r"<figure>(.*?)</figure>", page)
    assert len(figures) == len(re.findall(r"<img ", page)) == 3
    for fig in figures:
        assert len(re.search(r"<figcaption>(.*?)</figcaption>", fig).group(1)) > 20
    assert "Look for" in page[page.index("splits.png"):]
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "splits.png").ndim == 3
    assert "No in-distribution row" not in page


def test_report_verdict_when_the_fine_tune_loses_everywhere_and_there_is_no_gap(tmp_path):
    results = _results({"dynamic": dict(base=3.9, drpose=4.5, ceiling=4.5), "extreme": dict(base=5.0, drpose=5.2, ceiling=5.1)})
    sentence = evaluate.verdict_sentence(results)
    assert sentence.startswith("Verdict: drpose reads a worse pose than the base on every row (judged error, px: "
                               "bench dynamic 4.500 against 3.900, bench extreme 5.200 against 5.000)")
    assert sentence.endswith("the supervised ceiling beats the base nowhere, so there is no gap to close.")
    evaluate.write_report(tmp_path / "report.html", results, {}, [])
    page = (tmp_path / "report.html").read_text()
    assert "No in-distribution row" in page and "No fine-tuning reward curve" in page
    assert "no gap: ceiling not better than base" in page
    only_base = _results({"dynamic": dict(base=3.9)})
    assert evaluate.verdict_sentence(only_base) == "No verdict: only the base was evaluated."


def test_two_readers_a_verdict_holds_only_where_both_agree(tmp_path):
    """With a second reader, every cell shows both readers' judged errors, and the verdict says better or worse
    only where both readers say so; elsewhere it says the readers disagree."""
    results = _results({"dynamic": dict(base=4.0, drpose=3.5, ceiling=3.0), "extreme": dict(base=5.0, drpose=4.5, ceiling=4.0),
                        "val": dict(base=2.0, drpose=2.2, ceiling=1.9)})
    second = {"dynamic": dict(base=4.2, drpose=3.6, ceiling=3.0), "extreme": dict(base=5.1, drpose=5.4, ceiling=4.1),
              "val": dict(base=2.1, drpose=2.3, ceiling=2.0)}
    results["readers"] = {"pose_reader": "", "pose_reader2": "_reader2"}
    for name, by_model in second.items():
        if name == "val":
            for t, v in by_model.items():
                results["judge_sets"][name]["models"][t]["judged_px_reader2"] = v
            continue
        for t, v in by_model.items():
            results["splits"][name]["models"][t][evaluate.GAP_METRIC + "_reader2"] = v
        results["splits"][name]["gap_closed_reader2"] = {"drpose": evaluate.gap_closed(by_model["base"], by_model["drpose"],
                                                                                       by_model["ceiling"])}
    header, rows = evaluate.headline_rows(results)
    dynamic = next(r for r in rows if r[0] == "bench dynamic")
    assert dynamic == ["bench dynamic", "3", "4.000 / 4.200", "3.500 / 3.600", "3.000 / 3.000", "50% / 50%"]
    assert evaluate.agreement([3.5, 3.6], [4.0, 4.2]) == "better"
    assert evaluate.agreement([4.5, 5.4], [5.0, 5.1]) == "readers disagree"
    assert evaluate.agreement([2.2, 2.3], [2.0, 2.1]) == "worse"
    sentence = evaluate.verdict_sentence(results)
    assert "drpose reads a better pose than the base on bench dynamic and a worse one on " in sentence
    assert "the readers disagree on bench extreme" in sentence
    assert "first / second reader" in sentence and "bench extreme 4.500 / 5.400 against 5.000 / 5.100" in sentence
    evaluate.write_report(tmp_path / "report.html", results, {}, [])
    assert "readers disagree" in (tmp_path / "report.html").read_text()


# --- which weights: live runs and committed models -------------------------------------------------

def test_labels_say_live_or_committed_samples_and_device(tmp_path):
    run = tmp_path / "run"

    def folder(path: Path, **config) -> Path:
        path.mkdir(parents=True)
        (path / "model_config.json").write_text(json.dumps(config))
        return path

    drpose = folder(run / "drpose", stage="finetune", step=20, drpose=dict(batch_size=4, device="auto"),
                    trained_on=dict(device="cpu", processes=1))
    ceiling = folder(run / "ceiling", stage="pretrain", step=20, train_args=dict(batch_size=4, device="auto"),
                     trained_on=dict(device="cpu", processes=1))
    older = folder(run / "older", stage="finetune", step=100, drpose=dict(batch_size=4, device="auto"))
    committed = folder(tmp_path / "pretrained" / "demo_drpose", stage="finetune", step=400,
                       drpose=dict(batch_size=16, device="auto"), trained_on=dict(device="cuda", processes=4))
    assert evaluate.model_label(drpose, run) == evaluate.model_label(ceiling, run) == "live, 80 samples, CPU"
    assert evaluate.model_label(older, run) == "live, 400 samples"  # no record of where it trained: not guessed
    assert evaluate.model_label(committed, run) == "committed, 25,600 samples, GPU"
    assert evaluate.model_label(None, run) is None and evaluate.model_label(run / "gone", run) is None


def test_the_report_opens_with_which_weights_the_verdict_reads(tmp_path):
    errors = {"dynamic": dict(base=4.0, drpose=4.4, ceiling=3.0), "extreme": dict(base=5.0, drpose=4.6, ceiling=4.0)}
    results = _results(errors)
    results["labels"] = dict(drpose="live, 80 samples, CPU", ceiling="live, 80 samples, CPU")
    line = evaluate.weights_line(results)
    assert line.startswith("No committed GPU-trained weights are evaluated here")
    assert "pretrained/demo_drpose" in line and "drpose (live, 80 samples, CPU)" in line
    evaluate.write_report(tmp_path / "report.html", results, {}, [])
    page = (tmp_path / "report.html").read_text()
    assert page.index(line) < page.index("<table>")
    assert "<th>drpose (live, 80 samples, CPU)</th>" in page
    assert evaluate.verdict_sentence(results).startswith("Verdict: drpose (live, 80 samples, CPU) reads ")

    for row in errors.values():  # a committed DrPose beside the live one: it leads the verdict
        row["committed_drpose"] = row["base"] - 0.5
    results = _results(errors)
    results["labels"] = dict(drpose="live, 80 samples, CPU", ceiling="committed, 25,600 samples, GPU",
                             committed_drpose="committed, 25,600 samples, GPU")
    line = evaluate.weights_line(results)
    assert line.startswith("Committed weights, evaluated here beside the base: ceiling (committed, 25,600 samples, "
                           "GPU) and committed_drpose (committed, 25,600 samples, GPU); the verdict reads them")
    assert "Live runs of this machine, which show the loop running: drpose (live, 80 samples, CPU)." in line
    verdict = evaluate.verdict_sentence(results)
    assert verdict.startswith("Verdict: committed_drpose (committed, 25,600 samples, GPU) reads a better pose than "
                              "the base on every row")
    assert "; drpose (live, 80 samples, CPU) reads " in verdict
