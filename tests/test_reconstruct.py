"""reconstruct.py: body fit, oracle reconstruction against GT, output layout, resume, generation
path and bad inputs.

One toy run folder is built once: the mannequin exported as SMPL-X and two hard-pose bench
subjects rendered at 32 px through prepare_data.render_subjects (the path that made the real bench).
g_skel is replaced by the ideal one, the GT skeleton maps (--skeleton ideal): training a g_skel
here would take longer than the whole file may, and the oracle test is about fitting and carving.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

import evaluate
import posescore
import prepare_data as pd
import pretrain
import reconstruct as rc
from posescore import skeleton_maps

REPO = Path(__file__).resolve().parents[1]
RES = 32
# Bounds, measured on the demo bench (runs/demo/data/bench, 12 subjects, --oracle --skeleton ideal,
# demo preset): MPJPE mean 10.0 mm, max 21.4 mm; Chamfer mean 1.23 cm, max 1.45 cm, against a floor
# of 1.00-1.02 cm that the GT mesh scores against itself with evaluate's 5000 samples. Margins
# cover other poses and shapes.
MPJPE_BOUND_MM = 30.0
CHAMFER_BOUND_CM = 1.8
FIT_MPJPE_BOUND_MM = 20.0


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A run folder with body/ and data/bench/ (2 hard-pose subjects, 32 px, GT meshes)."""
    root = tmp_path_factory.mktemp("run")
    pd.export_mannequin_smplx(root / "body" / "SMPLX_NEUTRAL.npz")
    body = pd.load_body_model(root / "body")
    rng = np.random.default_rng(3)
    poses = pd.generate_poses("hard", 2, rng)
    outfits = pd.sample_outfits(2, rng, held_out=True)
    out = pd.render_subjects(body, poses, outfits, RES)
    bench = root / "data" / "bench"
    (bench / "meshes").mkdir(parents=True)
    albedo = pd.paint_vertices(pd.vertex_regions(body), outfits["colors"], outfits["style"]).numpy()
    for i in range(2):
        trimesh.Trimesh(out["vertices"][i].numpy(), body.faces_tensor.numpy(),
                        vertex_colors=(albedo[i] * 255).astype(np.uint8), process=False).export(bench / "meshes" / f"{i:05d}.ply")
    color, normal = pd.to_uint8(out["color"]), pd.to_uint8(out["normal"])
    np.savez(bench / "bench.npz", image=color[:, 0], color=color, normal=normal,
             mask=out["mask"].to(torch.uint8).numpy(), joints=out["joints"].numpy(), transl=out["transl"].numpy(),
             **{k: poses[k] for k in pd.POSE_KEYS if k != "transl"})
    pd.write_json(bench / "manifest.json", dict(count=2, views=list(pd.VIEW_AZIMUTHS), resolution=RES,
                                                files={"bench.npz": 2}))
    return dict(root=root, body=body, out=out)


@pytest.fixture(scope="session")
def oracle_run(world):
    """The CLI's own main() on the toy bench with the GT views and ideal skeleton maps."""
    args = rc.Args(run_dir=world["root"], oracle=True, skeleton="ideal", fit_every=1)
    folder = rc.main(args)
    return folder


# --- pieces ---------------------------------------------------------------------------------------

def test_subset_skinning_matches_smplx(world):
    body = world["body"]
    skinner = rc.SubsetSkinner(body, count=300)
    gen = torch.Generator().manual_seed(0)
    params = dict(global_orient=0.5 * torch.randn(1, 3, generator=gen), body_pose=0.3 * torch.randn(1, 21, 3, generator=gen),
                  betas=torch.randn(1, 10, generator=gen), transl=torch.zeros(1, 3))
    joints, verts = skinner(params)
    full_verts, full_joints = pd.body_forward(body, params)
    assert torch.allclose(verts, full_verts[:, skinner.index], atol=1e-5)
    assert torch.allclose(joints[:, :55], full_joints, atol=1e-5)


def test_triangulation_inverts_the_projection():
    joints = torch.randn(1, 22, 3) * 0.4
    pix = pd.views_to_pixels(pd.world_to_views(joints), RES)[0]  # (V, 22, 2)
    assert torch.allclose(rc.triangulate(pix, RES), joints[0], atol=1e-5)


def test_body_fit_recovers_a_known_pose_from_its_own_skeleton_maps(world):
    """A broad pose (not a bench template) on a random shape, fitted to its own skeleton maps and
    its rendered silhouettes, lands within FIT_MPJPE_BOUND_MM of the true joints."""
    body = world["body"]
    rng = np.random.default_rng(11)
    poses = pd.generate_poses("broad", 1, rng)
    out = pd.render_subjects(body, poses, pd.sample_outfits(1, rng, held_out=False), RES)
    maps = skeleton_maps(out["joints"], RES, 1.0)[0]
    args = rc.Args(fit_steps=60).resolved()
    torch.set_num_threads(1)
    params, joints = rc.fit_body(body, maps, out["mask"][0], args, 1.0)
    error = evaluate.mpjpe_mm(joints[:22].numpy(), out["joints"][0, :22].numpy())
    assert error < FIT_MPJPE_BOUND_MM, f"MPJPE {error:.1f} mm"
    start = rc.initial_params(body, out["joints"][0, :22].double().numpy())  # the IK start alone is worse
    assert set(start) == {"global_orient", "body_pose", "betas", "scale", "transl"}


def test_laplacian_is_identity_minus_neighbour_mean():
    """Against the dense L = I - D^-1 A built from trimesh's own edge list."""
    mesh = trimesh.creation.icosphere(subdivisions=2)
    laplacian = rc.UniformLaplacian(torch.from_numpy(mesh.faces).long(), len(mesh.vertices))
    adjacency = np.zeros((len(mesh.vertices),) * 2)
    adjacency[mesh.edges_unique[:, 0], mesh.edges_unique[:, 1]] = 1
    adjacency = np.maximum(adjacency, adjacency.T)
    x = np.random.default_rng(0).normal(size=(len(mesh.vertices), 3))
    expect = x - adjacency @ x / adjacency.sum(1, keepdims=True)
    assert np.allclose(laplacian(torch.from_numpy(x)).numpy(), expect, atol=1e-12)
    flat = torch.ones(len(mesh.vertices), 3, requires_grad=True)
    laplacian(flat).pow(2).sum().backward()  # differentiable, and zero on a constant field
    assert torch.allclose(flat.grad, torch.zeros_like(flat.grad))


def test_silhouette_term_survives_nan_vertices():
    """grid_sample's backward segfaults on NaN coordinates (torch 2.11-2.13, CPU); a line search
    that strays to NaN used to kill reconstruct.py that way. Now the NaN only reaches the loss."""
    mask = torch.zeros(6, RES, RES)
    mask[:, 8:24, 12:20] = 1
    pix = (torch.rand(6, 50, 2) * RES).requires_grad_(True)
    poisoned = torch.where(torch.arange(50)[None, :, None] == 7, torch.full_like(pix, float("nan")), pix)
    loss = rc.silhouette_loss(poisoned, mask, rc.outside_distance(mask), torch.ones(6))
    loss.backward()  # the crash happened here
    assert torch.isnan(loss) and pix.grad is not None  # NaN is reported (fit_body undoes such a step), no crash


def test_body_fit_on_garbled_maps_stays_finite(world):
    """Maps of a view that shows no body (noise): the fit must still return finite parameters."""
    maps = torch.rand(6, 21, RES, RES, generator=torch.Generator().manual_seed(0)) ** 8
    mask = torch.zeros(6, RES, RES)
    mask[:, 10:22, 10:22] = 1
    torch.set_num_threads(1)
    params, joints = rc.fit_body(world["body"], maps, mask, rc.Args(fit_steps=20).resolved(), 1.0)
    assert all(torch.isfinite(v).all() for v in params.values()) and torch.isfinite(joints).all()


# --- the oracle: GT views in, mesh and joints near the GT out --------------------------------------

def test_oracle_mesh_and_joints_are_near_the_ground_truth(world, oracle_run):
    bench = evaluate.load_bench(world["root"])
    recon = evaluate.load_recon(world["root"], "oracle", bench)  # the reader evaluate.py uses
    for i in range(2):
        pred = evaluate.load_mesh(recon["mesh_paths"][i], "test")
        gt = evaluate.load_mesh(bench["mesh_paths"][i], "test")
        geometry = evaluate.geometry_metrics(pred, gt, 5000, 0.05, np.random.default_rng([0, i]))
        mpjpe = evaluate.mpjpe_mm(recon["joints"][i, :22], bench["joints"][i, :22])
        assert geometry["chamfer_cm"] < CHAMFER_BOUND_CM, f"subject {i}: Chamfer {geometry['chamfer_cm']:.2f} cm"
        assert mpjpe < MPJPE_BOUND_MM, f"subject {i}: MPJPE {mpjpe:.1f} mm"
        # Vertex colours come from the views: the carved mesh is not grey.
        assert np.asarray(pred.visual.vertex_colors)[:, :3].std() > 5


def test_output_layout_matches_the_contract(world, oracle_run):
    manifest = json.loads((oracle_run / "manifest.json").read_text())
    assert manifest["count"] == 2 and manifest["complete"] and manifest["resolution"] == RES
    stages = manifest["seconds_per_stage"]  # what bench/reconstruct_stages.py prints
    assert list(stages) == ["generate", "maps", "fit", "carve", "colour", "write"]
    assert all(v >= 0 for v in stages.values()) and stages["fit"] > 0
    assert sum(stages.values()) <= manifest["seconds_per_sample"] * 1.01
    for i in range(2):
        sample = oracle_run / f"{i:05d}"
        assert sorted(p.name for p in sample.iterdir()) == ["body.json", "joints.npz", "mesh.ply", "views.npz", "views.png"]
        with np.load(sample / "views.npz") as npz:
            assert npz["latents"].shape == (6, 6, RES, RES) and npz["latents"].dtype == np.float32
        with np.load(sample / "joints.npz") as npz:
            assert npz["joints"].shape == (55, 3)
        params = json.loads((sample / "body.json").read_text())
        assert np.array(params["body_pose"]).shape == (21, 3) and len(params["betas"]) == 10
    # views.npz holds exactly the GT views in oracle mode
    data = np.load(world["root"] / "data/bench/bench.npz")
    gt = pd.views_to_latents(pd.from_uint8(data["color"][:1]), pd.from_uint8(data["normal"][:1]))[0].numpy()
    assert np.allclose(np.load(oracle_run / "00000/views.npz")["latents"], gt)


def test_rerun_skips_complete_samples_and_redoes_a_killed_one(world, oracle_run):
    done = oracle_run / "00000" / "mesh.ply"
    stamp = done.stat().st_mtime_ns
    shutil.rmtree(oracle_run / "00001")
    (oracle_run / "00001.tmp").mkdir()  # what a kill mid-write leaves
    (oracle_run / "00001.tmp" / "views.npz").write_bytes(b"partial")
    rc.main(rc.Args(run_dir=world["root"], oracle=True, skeleton="ideal", fit_every=1))
    assert done.stat().st_mtime_ns == stamp  # untouched
    assert (oracle_run / "00001" / "mesh.ply").exists() and not (oracle_run / "00001.tmp").exists()
    with pytest.raises(pd.UserError, match="made differently"):
        rc.main(rc.Args(run_dir=world["root"], oracle=True, skeleton="ideal", seed=1, fit_every=1))


def test_fit_every_writes_views_for_all_and_meshes_for_every_nth(world):
    """The demo fits 3D for every third subject only: the pose metrics need the views alone."""
    out = rc.main(rc.Args(run_dir=world["root"], oracle=True, skeleton="ideal", fit_every=2, tag="every2"))
    assert (out / "00000" / "mesh.ply").exists() and (out / "00000" / "joints.npz").exists()
    assert (out / "00001" / "views.npz").exists() and (out / "00001" / "views.png").exists()
    assert not (out / "00001" / "mesh.ply").exists() and not (out / "00001" / "joints.npz").exists()
    assert json.loads((out / "manifest.json").read_text())["fit_every"] == 2


# --- generation: a tiny model, one image file, per-sample noise -------------------------------------

def test_image_input_generates_views_with_per_sample_noise(world, tmp_path):
    res = 16
    torch.manual_seed(0)
    unet = pretrain.build_unet(pretrain.unet_config(res, (8, 16), 1, 1, 2, 16)).eval()
    model = tmp_path / "tiny"
    pretrain.save_model(model, unet, dict(resolution=res, num_views=pd.NUM_VIEWS, sampling=dict(num_steps=2, guidance=1.5)))
    gskel = posescore.build_gskel(res, (8, 8))
    gskel.save_pretrained(tmp_path / "pose_reader")
    pd.write_json(tmp_path / "pose_reader" / "posescore_config.json", dict(resolution=res, width=1.0))
    (tmp_path / "body").symlink_to(world["root"] / "body")
    rgba = np.zeros((40, 30, 4), np.uint8)
    rgba[5:35, 10:20] = (200, 50, 50, 255)  # an opaque figure on a transparent background
    Image.fromarray(rgba).save(tmp_path / "person.png")
    args = rc.Args(run_dir=tmp_path, model=str(model), input=tmp_path / "person.png", fit_steps=3, carve_steps=1)
    out = rc.main(args)
    assert out == tmp_path / "recon" / "tiny"
    image = rc.load_image(tmp_path / "person.png", res)
    assert image.shape == (3, res, res) and image[:, 0, 0].tolist() == [1.0, 1.0, 1.0]  # white margin
    loaded = pretrain.load_model(model)
    expect = pretrain.sample_views(loaded.unet, image[None], 2, 1.5, torch.Generator().manual_seed(0),
                                   alphas=loaded.alphas, codec=loaded.codec)[0]
    assert np.allclose(np.load(out / "00000" / "views.npz")["latents"], expect.numpy(), atol=1e-5)
    assert (out / "00000" / "mesh.ply").exists()


def test_missing_pose_reader_names_the_command(world, tmp_path):
    (tmp_path / "body").symlink_to(world["root"] / "body")
    (tmp_path / "data").symlink_to(world["root"] / "data")
    with pytest.raises(pd.UserError, match=r"holds no pose reader; make it with `python posescore.py train .*--train-on any"):
        rc.main(rc.Args(run_dir=tmp_path, oracle=True))


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, message", [("corrupt", "not a readable image"), ("tiny", "too small"),
                                           ("blank", "no foreground"), ("empty_alpha", "empty alpha")])
def test_bad_images_are_refused_in_one_line(tmp_path, kind, message):
    path = tmp_path / f"{kind}.png"
    if kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif kind == "tiny":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    elif kind == "blank":
        Image.fromarray(np.full((64, 64, 3), 240, np.uint8)).save(path)
    else:
        Image.fromarray(np.zeros((64, 64, 4), np.uint8)).save(path)
    with pytest.raises(pd.UserError, match=message) as err:
        rc.load_image(path, RES)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_cli_exits_2_with_one_line_for_a_bad_image(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"nope")
    (tmp_path / "base").mkdir()
    run = subprocess.run([sys.executable, "reconstruct.py", "--run-dir", str(tmp_path), "--input", str(path)],
                         cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 2
    lines = [line for line in run.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, run.stderr


# --- the judge sets and committed models ---------------------------------------------------------------

def test_a_committed_copy_of_the_base_reads_exactly_as_the_base_from_views_reconstruct_kept(world, tmp_path,
                                                                                          monkeypatch):
    """A model folder outside the run (a committed one, as `make demo` takes pretrained/demo_drpose) is evaluated
    from what reconstruct.py made with it: a copy of the base must read exactly as the base in every judge row,
    from the judge-set views reconstruct kept (evaluate generates none), and carry its committed label."""
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "body").symlink_to(world["root"] / "body")
    (run / "data" / "bench").symlink_to(world["root"] / "data" / "bench")
    bench = np.load(world["root"] / "data" / "bench" / "bench.npz")
    pd.save_npz(run / "data" / "scans" / "val.npz", **{k: bench[k] for k in ("color", "normal", "mask", "joints")})
    pd.write_json(run / "data" / "scans" / "manifest.json", dict(files={"val.npz": 2}, resolution=RES,
                                                                  views=list(pd.VIEW_AZIMUTHS)))
    torch.manual_seed(0)
    unet = pretrain.build_unet(pretrain.unet_config(RES, (8, 16), 1, 1, 2, 16)).eval()
    pretrain.save_model(run / "base", unet, dict(resolution=RES, num_views=pd.NUM_VIEWS, stage="pretrain",
                                                 sampling=dict(num_steps=2, guidance=1.0)))
    committed = tmp_path / "pretrained" / "demo_drpose"
    shutil.copytree(run / "base", committed)
    config = json.loads((committed / pretrain.CONFIG_NAME).read_text())
    config.update(stage="finetune", step=100, drpose=dict(batch_size=16), trained_on=dict(device="cuda", processes=1))
    pd.write_json(committed / pretrain.CONFIG_NAME, config)
    torch.manual_seed(1)
    posescore.build_gskel(RES, (8, 8)).save_pretrained(run / "pose_reader")
    pd.write_json(run / "pose_reader" / "posescore_config.json", dict(resolution=RES, width=1.0))
    quick = dict(run_dir=run, fit_every=2, fit_steps=2, carve_steps=1, judge_count=2)
    rc.main(rc.Args(model="base", **quick))
    rc.main(rc.Args(model=str(committed), tag="committed_drpose", **quick))
    assert {p.name for p in (run / "recon" / "base").glob("judge_*.npz")} == {"judge_val.npz"}  # no drpose_gt here

    def no_generation(*_):
        raise AssertionError("evaluate generated views that reconstruct.py kept")

    monkeypatch.setattr(rc, "generate_set", no_generation)
    results = evaluate.main(evaluate.Args(run_dir=run, models=("base", "committed_drpose"), num_samples=500,
                                          max_grids=0, judge_count=2))
    monkeypatch.undo()
    val = results["judge_sets"]["val"]["models"]
    assert val["committed_drpose"] == val["base"] and val["base"]["judged_px"] > 0
    for split in results["splits"].values():
        assert split["models"]["committed_drpose"]["judged_error_px"] == split["models"]["base"]["judged_error_px"]
    assert results["labels"] == {"committed_drpose": "committed, 1,600 samples, GPU"}
    first_line = (run / "eval" / "results.md").read_text().splitlines()[0]
    assert first_line.startswith("Committed weights, evaluated here beside the base: committed_drpose (committed, "
                                 "1,600 samples, GPU)")
    page = (run / "eval" / "report.html").read_text()
    assert page.index(first_line) < page.index("<table>")
    # Without the kept views evaluate generates the same ones itself.
    for path in (run / "recon").glob("*/judge_*.npz"):
        path.unlink()
    again = evaluate.main(evaluate.Args(run_dir=run, models=("base", "committed_drpose"), num_samples=500,
                                        max_grids=0, judge_count=2))
    assert again["judge_sets"]["val"] == results["judge_sets"]["val"]
