"""Real inputs as researchers have them: motion files of every layout in POSE_LAYOUTS,
checked for values, axes and frame rate before anything is written; real SMPL-X folders; photos
without alpha accepted only on a plain background.

Every layout gets a small valid file whose joints are checked against an independent forward pass
(stock smplx on the same body file, with the file's own parameters and hand convention, the joints
rotated y-up afterwards), and malformed copies whose one-line errors must come before any work.
"""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import prepare_data as pd
import reconstruct as rc

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 40
TINY = dict(resolution=16, num_scans=4, num_val_scans=2, num_anchors=3, num_bench_dynamic=3, num_bench_extreme=3, pose_pool_clips=4, neighbours=2)
LAYOUTS = list(pd.POSE_LAYOUTS)
SUFFIX = {"amass-smplh": ".npz", "amass-smplx": ".npz", "motionx": ".npy", "smpl72": ".npz", "aistpp": ".pkl"}
AIST_SCALING = 93.5


@pytest.fixture(scope="module")
def body_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("body")
    facts = pd.export_mannequin_smplx(folder / "SMPLX_NEUTRAL.npz")
    pd.write_json(folder / "manifest.json", dict(facts, file="SMPLX_NEUTRAL.npz", loader="smplx.create"))
    return folder


@pytest.fixture(scope="module")
def body(body_dir):
    return pd.load_body_model(body_dir)


@pytest.fixture
def fast_main(body, body_dir, tmp_path, monkeypatch):
    """pd.main on a run folder that already holds the exported body, with the loaded model reused
    (the check under test is what main does before rendering, not the loading)."""
    run = tmp_path / "run"
    shutil.copytree(body_dir, run / "body")
    monkeypatch.setattr(pd, "load_body_model", lambda *a, **k: body)

    def call(**flags):
        return pd.main(pd.Args(run_dir=run, **dict(TINY, **flags)))
    return run, call


def _listing(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# --- writing files of each layout -------------------------------------------------------------------

def _file_params(up: str, seed: int = 0, frames: int = FRAMES, lying: bool = False) -> dict:
    """Parameters as a file of that up axis stores them: a body upright in that world (or lying on
    its side), mild random articulation, hands, shape and translation."""
    rng = np.random.default_rng(seed)
    world = Rotation.from_euler("y", rng.uniform(-np.pi, np.pi, (frames, 1)))
    if lying:
        world = Rotation.from_euler("z", 90, degrees=True) * world
    to_y = Rotation.from_euler(pd.UP_TO_Y[up][1], pd.UP_TO_Y[up][0], degrees=True)
    return dict(root=(to_y.inv() * world).as_rotvec(), body=rng.normal(0, 0.2, (frames, 63)),
                hands=rng.normal(0, 0.3, (frames, 90)), face=rng.normal(0, 0.1, (frames, 9)),
                smpl_hands=rng.normal(0, 0.5, (frames, 6)), betas=rng.uniform(-1, 1, 16),
                trans=rng.normal(0, 0.5, (frames, 3)))


def write_motion(layout: str, path: Path, p: dict, fps: float = 30.0, gender: str = "female", drop: str = None,
                 width_extra: int = 0, nan: bool = False) -> Path:
    """A file of `layout` from _file_params output; drop / width_extra / nan make it malformed."""
    n = len(p["root"])
    if layout == "amass-smplh":
        poses = np.concatenate([p["root"], p["body"], p["hands"]], 1)
        keys = dict(poses=poses, trans=p["trans"], betas=p["betas"], mocap_framerate=np.array(fps),
                    gender=np.array(gender))
    elif layout == "amass-smplx":
        poses = np.concatenate([p["root"], p["body"], p["face"], p["hands"]], 1)  # jaw 3 + eyes 6 in `face`
        keys = dict(poses=poses, trans=p["trans"], betas=p["betas"], mocap_frame_rate=np.array(fps),
                    gender=np.array(gender), surface_model_type=np.array("smplx"),
                    markers_latent_vids=np.array({"C7": 3832}, dtype=object))  # AMASS's pickled extras: skipped
    elif layout == "motionx":
        poses = np.concatenate([p["root"], p["body"], p["hands"], p["face"][:, :3], np.zeros((n, 150)),
                                p["trans"], np.repeat(p["betas"][None, :10], n, 0)], 1)
        keys = {"": poses}
    elif layout == "smpl72":
        poses = np.concatenate([p["root"], p["body"], p["smpl_hands"]], 1)
        keys = dict(poses=poses, trans=p["trans"], betas=p["betas"][:10], fps=np.array(fps), gender=np.array(gender))
    else:
        poses = np.concatenate([p["root"], p["body"], p["smpl_hands"]], 1)
        keys = dict(smpl_poses=poses, smpl_trans=p["trans"] * AIST_SCALING, smpl_scaling=np.array([AIST_SCALING]),
                    smpl_loss=0.5)
    pose_key = {"": ""} if "" in keys else {"poses": "poses", "smpl_poses": "smpl_poses"}
    key = next(k for k in pose_key if k in keys)
    if width_extra:
        keys[key] = np.concatenate([keys[key], np.zeros((n, width_extra))], 1)
    if nan:
        keys[key] = keys[key].copy()
        keys[key][n // 2, 5] = np.nan
    if drop:
        keys.pop(drop)
    if layout == "motionx":
        np.save(path, keys[""])
    elif layout == "aistpp":
        with open(path, "wb") as fh:
            pickle.dump(keys, fh, protocol=2)
    else:
        np.savez(path, **keys)
    return path


def independent_joints(body_dir: Path, layout: str, p: dict, up: str) -> np.ndarray:
    """(frames, 55, 3) joints by stock smplx from the file's own parameters, rotated y-up after."""
    import smplx

    spec = pd.POSE_LAYOUTS[layout]
    model = smplx.create(str(body_dir / "SMPLX_NEUTRAL.npz"), model_type="smplx", use_pca=False, num_betas=10,
                         num_expression_coeffs=10, flat_hand_mean=spec.hands == "absolute")
    n = len(p["root"])
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    hands = p["hands"] if spec.hands != "none" else np.zeros((n, 90))
    face = p["face"] if layout == "amass-smplx" else np.zeros((n, 9))
    betas = np.zeros(10) if layout == "aistpp" else p["betas"][:10]  # AIST++ files carry no shape
    with torch.no_grad():
        out = model(global_orient=t(p["root"]), body_pose=t(p["body"]), left_hand_pose=t(hands[:, :45]),
                    right_hand_pose=t(hands[:, 45:]), jaw_pose=t(face[:, :3]), leye_pose=t(face[:, 3:6]),
                    reye_pose=t(face[:, 6:]), betas=t(np.repeat(betas[None], n, 0)), transl=t(p["trans"]),
                    expression=torch.zeros(n, 10))
    joints = out.joints[:, :pd.NUM_JOINTS].double().numpy()
    return Rotation.from_euler("x", pd.UP_TO_Y[up][0], degrees=True).apply(joints.reshape(-1, 3)).reshape(joints.shape)


def our_joints(body, clip: dict) -> np.ndarray:
    params = {k: torch.as_tensor(clip[k], dtype=torch.float32) for k in pd.POSE_KEYS}
    with torch.no_grad():
        return pd.body_forward(body, params)[1].double().numpy()


# --- valid files: loaded joints equal an independent forward pass ---------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_loads_to_the_joints_of_an_independent_forward_pass(layout, body, body_dir, tmp_path):
    up = pd.POSE_LAYOUTS[layout].up
    p = _file_params(up, seed=LAYOUTS.index(layout))
    path = write_motion(layout, tmp_path / f"clip{SUFFIX[layout]}", p)
    raw = pd.load_motion(path)  # layout told apart by file type, keys and width
    assert raw["layout"] == layout and raw["path"] == path
    assert raw["fps"] == (60.0 if layout == "aistpp" else None if layout == "motionx" else 30.0)
    clip = pd.check_motion(body, raw, "auto")
    assert clip["up"] == up
    expected = independent_joints(body_dir, layout, p, up)
    assert np.abs(our_joints(body, clip) - expected).max() < 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_file_in_the_other_up_axis_is_rotated_by_auto_and_refused_when_forced(layout, body, body_dir, tmp_path):
    own = pd.POSE_LAYOUTS[layout].up
    other = "y" if own == "z" else "z"  # a y-up file in a z-up layout, or the reverse
    p = _file_params(other, seed=7)
    path = write_motion(layout, tmp_path / f"clip{SUFFIX[layout]}", p)
    clip = pd.check_motion(body, pd.load_motion(path), "auto")
    assert clip["up"] == other
    assert np.abs(our_joints(body, clip) - independent_joints(body_dir, layout, p, other)).max() < 1e-4
    with pytest.raises(pd.UserError, match="lies down") as err:
        pd.check_motion(body, pd.load_motion(path), own)
    assert str(path) in str(err.value) and "--up auto" in str(err.value) and "\n" not in str(err.value)


def test_camera_frame_files_are_turned_upright_with_minus_y(body, tmp_path):
    p = _file_params("-y", seed=3)
    path = write_motion("smpl72", tmp_path / "vibe.npz", p)
    clip = pd.check_motion(body, pd.load_motion(path), "auto")
    assert clip["up"] == "-y"


# --- malformed files: one line naming the file, before anything is written ------------------------

def _malformed(layout: str, case: str, folder: Path) -> Path | None:
    up = pd.POSE_LAYOUTS[layout].up
    path = folder / f"{case}{SUFFIX[layout]}"
    p = _file_params(up, seed=11, lying=case == "lying")
    if case == "width":
        return write_motion(layout, path, p, width_extra=1)
    if case == "nan":
        return write_motion(layout, path, p, nan=True)
    if case == "missing_key":
        drop = dict(motionx=None, smpl72="poses", aistpp="smpl_trans").get(layout, "trans")
        return write_motion(layout, path, p, drop=drop) if drop else None
    if case == "gender":
        return write_motion(layout, path, p, gender="robot") if layout not in ("motionx", "aistpp") else None
    if case == "truncated":
        write_motion(layout, path, p)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path
    if case == "forced_up":  # a file of the other axis with the layout's own axis forced
        return write_motion(layout, path, _file_params("y" if up == "z" else "z", seed=11))
    return write_motion(layout, path, p)  # lying: on its side under every up axis


CASES = {"width": "expected \\(frames, |cannot tell its layout", "nan": "NaN", "missing_key": "lacks|none of them",
         "gender": "gender is 'robot'", "truncated": "not a readable", "lying": "lies down",
         "forced_up": "lies down"}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_malformed_files_are_refused_in_one_line_before_any_work(layout, case, tmp_path, fast_main):
    run, call = fast_main
    path = _malformed(layout, case, tmp_path)
    if path is None:
        pytest.skip(f"{layout} files have no such key")
    before = _listing(run)
    with pytest.raises(pd.UserError, match=CASES[case]) as err:
        call(pose_source="files", pose_files=path, up=pd.POSE_LAYOUTS[layout].up if case == "forced_up" else "auto")
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert _listing(run) == before  # nothing rendered, exported or written


def test_unknown_width_names_the_layouts_of_that_width_or_lists_them(tmp_path):
    np.save(tmp_path / "amass_as_npy.npy", np.zeros((5, 156)))
    with pytest.raises(pd.UserError, match=r"156-wide pose array is amass-smplh \(a \.npz file with keys poses"):
        pd.load_motion(tmp_path / "amass_as_npy.npy")
    np.savez(tmp_path / "odd.npz", poses=np.zeros((5, 99)))
    with pytest.raises(pd.UserError, match=r"known widths of .npz files: 72 \(smpl72\), 156 \(amass-smplh\), "
                                           r"165 \(amass-smplx\);"):
        pd.load_motion(tmp_path / "odd.npz")
    np.save(tmp_path / "odd.npy", np.zeros((5, 99)))  # an .npy is never AIST++ (.pkl only)
    with pytest.raises(pd.UserError, match=r"known widths of .npy files: 72 \(smpl72\), 322 \(motionx\);"):
        pd.load_motion(tmp_path / "odd.npy")
    with pytest.raises(pd.UserError, match=r"expected \(frames, 165\); a 156-wide pose array is amass-smplh"):
        pd.load_motion(write_motion("amass-smplh", tmp_path / "h.npz", _file_params("z")), "amass-smplx")


def test_no_frame_rate_and_no_fps_flag_is_a_clear_error(body, tmp_path, fast_main):
    run, call = fast_main
    path = write_motion("motionx", tmp_path / "clip.npy", _file_params("y"))
    with pytest.raises(pd.UserError, match="carries no frame rate; pass --fps") as err:
        call(pose_source="files", pose_files=path)
    assert str(path) in str(err.value)
    args = pd.Args(pose_source="files", pose_files=path, fps=20.0, **TINY)
    assert pd.read_pose_inputs(args, body)[0]["fps"] == 20.0  # --fps gives it


def test_each_files_frame_rate_is_printed_with_where_it_came_from(body, tmp_path, capsys):
    """A key of the file, --fps (which wins, saying what the file said), or the layout's documented rate."""
    motions = tmp_path / "motions"
    motions.mkdir()
    keyed = write_motion("amass-smplh", motions / "keyed.npz", _file_params("z", seed=40), fps=120.0)
    aist = write_motion("aistpp", motions / "dance.pkl", _file_params("y", seed=41))
    clips = pd.read_pose_inputs(pd.Args(pose_source="files", pose_files=motions, neighbours=2), body)
    assert [c["fps"] for c in clips] == [60.0, 120.0]  # sorted by path: dance.pkl, keyed.npz
    lines = capsys.readouterr().out.splitlines()
    line = lambda path: next(x for x in lines if x.startswith(f"poses: {path}: "))  # noqa: E731
    assert f"{FRAMES} frames at 120 fps (key mocap_framerate)" in line(keyed)
    assert "at 60 fps (the aistpp layout's default), hands none (the layout has none: smplx's relaxed hands)" \
        in line(aist)
    pd.read_pose_inputs(pd.Args(pose_source="files", pose_files=keyed, fps=30.0, neighbours=2), body)
    assert "at 30 fps (--fps, the file says 120)" in capsys.readouterr().out


def test_amass_smplx_hands_are_read_in_the_convention_each_files_data_shows(body, body_dir, tmp_path, capsys):
    """AMASS stores SMPL-X hands absolute (a flat hand is zero), BEAT2 relative to smplx's relaxed mean: the
    same layout, told apart per file by where its hands rest, and posed as stock smplx poses that convention."""
    relaxed = torch.cat([body.left_hand_mean, body.right_hand_mean]).double().numpy()  # (90,)
    p = _file_params("z", seed=42)
    motions = tmp_path / "motions"
    motions.mkdir()
    written = {kind: dict(p, hands=p["hands"] + offset) for kind, offset in (("absolute", relaxed), ("relative", 0))}
    paths = {kind: write_motion("amass-smplx", motions / f"{kind}.npz", q) for kind, q in written.items()}
    clips = {c["path"]: c for c in pd.read_pose_inputs(pd.Args(pose_source="files", pose_files=motions,
                                                               neighbours=2), body)}
    lines = capsys.readouterr().out.splitlines()
    for kind, path in paths.items():
        assert pd.hand_convention(body, *(written[kind]["hands"][:, s].reshape(-1, 15, 3)
                                          for s in (slice(0, 45), slice(45, 90))))[0] == kind
        line = next(x for x in lines if x.startswith(f"poses: {path}: amass-smplx"))
        assert f"hands {kind} (from the data: mean hand pose" in line and "up z (the layout's)" in line
        expected = stock_joints(body_dir, written[kind], "z", hands=written[kind]["hands"], flat=kind == "absolute",
                                betas=p["betas"][:10])
        assert np.abs(our_joints(body, clips[path]) - expected).max() < 1e-4
        wrong = stock_joints(body_dir, written[kind], "z", hands=written[kind]["hands"], flat=kind != "absolute",
                             betas=p["betas"][:10])
        assert np.abs(our_joints(body, clips[path]) - wrong).max() > 1e-2  # the convention moves the fingers


def test_a_pickle_naming_os_system_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "motion.pkl"
    path.write_bytes(pickle.dumps({"smpl_poses": Exploit()}))
    with pytest.raises(pd.UserError, match=r"was refused: it names (posix|os|nt)\.system") as err:
        pd.load_motion(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_folder_trees_are_walked_and_amass_shape_files_skipped(body, tmp_path):
    tree = tmp_path / "motions"
    (tree / "CMU" / "01").mkdir(parents=True)
    (tree / "aist").mkdir()
    write_motion("amass-smplh", tree / "CMU" / "01" / "01_01_poses.npz", _file_params("z", 1))
    np.savez(tree / "CMU" / "01" / "shape.npz", betas=np.zeros(16), gender=np.array("male"))
    write_motion("aistpp", tree / "aist" / "gBR_sBM_cAll_d04_mBR0_ch01.pkl", _file_params("y", 2))
    (tree / "notes.txt").write_text("not a motion")
    clips = pd.load_pose_files("auto", tree)
    assert [c["layout"] for c in clips] == ["amass-smplh", "aistpp"]
    with pytest.raises(pd.UserError, match="holds no .npy files"):
        pd.load_pose_files("motionx", tree)


# --- frame rate: neighbours a fixed time apart ----------------------------------------------------

def _smooth_motion(fps: float, seconds: float = 4.0) -> dict:
    """One motion as a function of time, sampled at `fps`: the same poses at the same times."""
    t = np.arange(int(seconds * fps)) / fps
    p = _file_params("z", seed=5, frames=len(t))
    p["body"] = 0.3 * np.sin(2 * np.pi * 0.7 * t[:, None] + np.arange(63)[None])
    p["root"] = (Rotation.from_euler("x", 90, degrees=True) * Rotation.from_euler("y", 0.5 * t[:, None])).as_rotvec()
    return p


def test_neighbour_spacing_in_seconds_is_the_same_at_30_and_120_fps(body, tmp_path):
    for fps in (30, 120):
        write_motion("amass-smplh", tmp_path / f"walk_{fps}.npz", _smooth_motion(fps), fps=fps)
    args = pd.Args(pose_source="files", pose_files=tmp_path, neighbours=9)
    clips = {int(c["fps"]): c for c in pd.read_pose_inputs(args, body)}
    for anchor_s in (0.0, 1.0, 2.5, 3.9):
        times, poses = {}, {}
        for fps, clip in clips.items():
            frames = pd.temporal_neighbours(len(clip["body_pose"]), round(anchor_s * fps), 10, fps * args.neighbour_spacing)
            times[fps] = np.array(frames) / fps
            poses[fps] = clip["body_pose"][frames]
        assert len(times[30]) == 10 and np.allclose(times[30], times[120])
        assert np.allclose(poses[30], poses[120])  # the very same poses of the motion
    assert np.allclose(np.diff(np.sort(times[30])), args.neighbour_spacing)


def test_generated_pool_keeps_the_stride_2_neighbours_of_before():
    length, count = pd.GENERATED_CLIP_FRAMES, 10
    for frame in range(length):
        old = sorted(range(length), key=lambda f: (abs(f - frame) + (abs(f - frame) % 2) * length, f))[:count]
        assert pd.temporal_neighbours(length, frame, count, pd.GENERATED_FPS * pd.Args.neighbour_spacing) == old


def test_files_run_end_to_end_and_the_manifest_records_the_spacing(tmp_path, fast_main):
    run, call = fast_main
    motions = tmp_path / "motions"
    motions.mkdir()
    write_motion("amass-smplh", motions / "a.npz", _smooth_motion(60), fps=60)
    write_motion("aistpp", motions / "b.pkl", _file_params("y", seed=4))
    write_motion("aistpp", motions / "short.pkl", _file_params("y", frames=3))  # too short: left out
    call(pose_source="files", pose_files=motions, fps=None, neighbours=2)
    manifest = pd.read_manifest(run / "data" / "drpose", "")
    assert manifest["neighbour_spacing_s"] == pytest.approx(1 / 15) and manifest["pool_fps"] == [60.0]
    assert manifest["pose_files"]["layouts"] == ["aistpp", "amass-smplh"]
    pairs = pd.load_split(run / "data" / "drpose" / "pairs.npz")
    assert len(pairs["image"]) == 9


def test_cli_bad_file_exits_2_with_one_line_and_writes_nothing(tmp_path):
    bad = write_motion("amass-smplx", tmp_path / "dance.npz", _file_params("z"), nan=True)
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "prepare_data.py", "--run-dir", str(run), "--pose-source", "files",
                             "--pose-files", str(bad)], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(bad) in lines[0] and "fix or drop this file" in lines[0], result.stderr
    assert _listing(run) == []


def test_contradicting_flags_are_refused_before_any_work(tmp_path):
    with pytest.raises(pd.UserError, match="--pose-files, --fps apply to motion files only"):
        pd.main(pd.Args(run_dir=tmp_path / "run", pose_files=tmp_path, fps=30.0))
    with pytest.raises(pd.UserError, match="needs --pose-files"):
        pd.main(pd.Args(run_dir=tmp_path / "run", pose_source="files"))
    assert _listing(tmp_path / "run") == []


def test_pose_layout_flag_names_every_layout():
    import typing

    hints = typing.get_type_hints(pd.Args)
    assert set(typing.get_args(hints["pose_layout"])) == {"auto", *pd.POSE_LAYOUTS}
    assert set(typing.get_args(hints["up"])) == {"auto", *pd.UP_AXES} and set(pd.UP_AXES) == set(pd.UP_TO_Y)


# --- the files people have that no layout describes: AIST++ without its scale, wider packed arrays, ---
# --- nested video-estimation output; each loads upright through a documented flag ---------------------

def stock_joints(body_dir: Path, p: dict, up: str, hands: np.ndarray | None = None, flat: bool = False,
                 betas: np.ndarray | None = None) -> np.ndarray:
    """(frames, 55, 3) joints by stock smplx from parameters as a file stores them, rotated y-up after."""
    import smplx

    model = smplx.create(str(body_dir / "SMPLX_NEUTRAL.npz"), model_type="smplx", use_pca=False, num_betas=10,
                         num_expression_coeffs=10, flat_hand_mean=flat)
    n = len(p["root"])
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    hands = np.zeros((n, 90)) if hands is None else hands
    betas = np.zeros(10) if betas is None else betas
    with torch.no_grad():
        out = model(global_orient=t(p["root"]), body_pose=t(p["body"]), left_hand_pose=t(hands[:, :45]),
                    right_hand_pose=t(hands[:, 45:]), betas=t(np.repeat(betas[None], n, 0)), transl=t(p["trans"]),
                    jaw_pose=torch.zeros(n, 3), leye_pose=torch.zeros(n, 3), reye_pose=torch.zeros(n, 3),
                    expression=torch.zeros(n, 10))
    joints = out.joints[:, :pd.NUM_JOINTS].double().numpy()
    return Rotation.from_euler("x", pd.UP_TO_Y[up][0], degrees=True).apply(joints.reshape(-1, 3)).reshape(joints.shape)


def test_aistpp_without_scaling_loads_with_translation_in_metres(body, body_dir, tmp_path, capsys):
    p = _file_params("y", seed=21)
    poses = np.concatenate([p["root"], p["body"], p["smpl_hands"]], 1)
    for name in ("a.pkl", "b.pkl"):
        with open(tmp_path / name, "wb") as fh:
            pickle.dump(dict(smpl_poses=poses, smpl_trans=p["trans"]), fh, protocol=2)  # no smpl_scaling
    clips = pd.read_pose_inputs(pd.Args(pose_source="files", pose_files=tmp_path, neighbours=2), body)
    assert [c["up"] for c in clips] == ["y", "y"] and np.allclose(clips[0]["transl"], p["trans"])
    assert np.abs(our_joints(body, clips[0]) - stock_joints(body_dir, p, "y")).max() < 1e-4
    printed = [line for line in capsys.readouterr().out.splitlines() if "smpl_scaling" in line]
    assert len(printed) == 1 and "2 AIST++ files" in printed[0] and "metres" in printed[0]  # once, not per file


@pytest.mark.parametrize("joints", [21, 23])
def test_smpl_files_with_global_orient_and_body_pose_keys(joints, body, body_dir, tmp_path):
    p = _file_params("y", seed=25)
    body_pose = np.concatenate([p["body"], p["smpl_hands"]], 1)[:, :3 * joints].reshape(-1, joints, 3)
    np.savez(tmp_path / "est.npz", global_orient=p["root"][:, None], body_pose=body_pose, trans=p["trans"])
    clip = pd.check_motion(body, pd.load_motion(tmp_path / "est.npz"))
    assert clip["layout"] == "smpl72" and np.abs(our_joints(body, clip) - stock_joints(body_dir, p, "y")).max() < 1e-4


def _packed(p: dict) -> np.ndarray:
    """A packed SMPL-X array no layout knows (175 wide): transl 0:3, 6 other columns, root 9:12, body 12:75,
    hands 75:165, expression 165:175."""
    n = len(p["root"])
    return np.concatenate([p["trans"], np.ones((n, 6)), p["root"], p["body"], p["hands"], np.zeros((n, 10))], 1)


PACKED_COLUMNS = ("transl=0:3,global_orient=9:12,body_pose=12:75,left_hand_pose=75:120,right_hand_pose=120:165,"
                  "hands=absolute")


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_a_packed_array_of_unknown_width_loads_through_pose_columns(suffix, body, body_dir, tmp_path):
    p = _file_params("z", seed=22)
    path = tmp_path / f"packed{suffix}"
    np.save(path, _packed(p)) if suffix == ".npy" else np.savez(path, motion=_packed(p), mocap_frame_rate=np.array(120.))
    with pytest.raises(pd.UserError, match="--pose-columns") as err:  # the refusal names the flag that loads it
        pd.load_motion(path)
    assert "\n" not in str(err.value)
    flags = dict(pose_source="files", pose_files=path, pose_columns=PACKED_COLUMNS, fps=30.0 if suffix == ".npy" else None,
                 pose_keys=None if suffix == ".npy" else "poses=motion", neighbours=2)
    clip = pd.read_pose_inputs(pd.Args(**flags), body)[0]
    assert clip["layout"] == "mapped" and clip["up"] == "z" and clip["fps"] == (30.0 if suffix == ".npy" else 120.0)
    expected = stock_joints(body_dir, p, "z", hands=p["hands"], flat=True)  # AMASS-style absolute hands
    assert np.abs(our_joints(body, clip) - expected).max() < 1e-4


def _estimator_output(p: dict) -> dict:
    """Video-estimation output: per person, SMPL's body without the root (69 = 23 joints: SMPL-X's 21 body
    joints, then SMPL's two hand joints), the root and the translation under their own keys; camera frame."""
    return {"person_data": {0: dict(smpl_pose=np.concatenate([p["body"], p["smpl_hands"]], 1), root_orient=p["root"],
                                    cam_trans=p["trans"], frame_ids=np.arange(len(p["root"])))}}


ESTIMATOR_KEYS = "global_orient=person_data.0.root_orient,body_pose=person_data.0.smpl_pose,transl=person_data.0.cam_trans"


def test_nested_estimator_output_loads_through_pose_keys(body, body_dir, tmp_path):
    p = _file_params("-y", seed=23)
    path = tmp_path / "track.pkl"
    with open(path, "wb") as fh:
        pickle.dump(_estimator_output(p), fh, protocol=2)
    with pytest.raises(pd.UserError, match="--pose-keys") as err:
        pd.load_motion(path)
    assert "person_data" in str(err.value) and "\n" not in str(err.value)
    assert f"--pose-keys {ESTIMATOR_KEYS} " in (ROOT / "README.md").read_text()  # the documented example
    clip = pd.check_motion(body, pd.load_motion(path, keys=pd.parse_pose_map(ESTIMATOR_KEYS, "--pose-keys")))
    assert clip["up"] == "-y"  # detected, not given
    assert np.abs(our_joints(body, clip) - stock_joints(body_dir, p, "-y")).max() < 1e-4
    for keys, message in ((ESTIMATOR_KEYS.replace("person_data.0", "person_data.1"), "stops at '1'"),
                          (ESTIMATOR_KEYS.replace("cam_trans", "frame_ids"), "expected \\(frames, 3\\)")):
        with pytest.raises(pd.UserError, match=message) as err:
            pd.load_motion(path, keys=pd.parse_pose_map(keys, "--pose-keys"))
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_files_through_pose_keys_run_end_to_end(tmp_path, fast_main, capsys):
    run, call = fast_main
    path = tmp_path / "track.pkl"
    with open(path, "wb") as fh:
        pickle.dump(_estimator_output(_file_params("-y", seed=24)), fh, protocol=2)
    call(pose_source="files", pose_files=path, pose_keys=ESTIMATOR_KEYS, fps=30.0, neighbours=2)
    manifest = pd.read_manifest(run / "data" / "drpose", "")
    assert manifest["pose_files"]["layouts"] == ["mapped"]
    out = capsys.readouterr().out
    # a mapped file has no layout, so no "layout's own up axis" to differ from; its line says how -y was found
    assert "layout's own up axis" not in out
    assert f"poses: {path}: mapped, {FRAMES} frames at 30 fps (--fps), hands relative (the default of " in out
    assert "up -y (the first axis the body stands upright in" in out


def test_the_readmes_pose_columns_examples_read_their_layouts_files_as_the_layouts_do(tmp_path):
    """The README's two --pose-columns examples are the Motion-X and AMASS SMPL-X layouts written as columns."""
    examples = [line.strip(" \\") for line in (ROOT / "README.md").read_text().splitlines()
                if line.lstrip().startswith("--pose-")]
    layout_of = {"motionx": "--pose-columns global_orient=0:3,body_pose=3:66,left_hand_pose=66:111",
                 "amass-smplx": "--pose-columns global_orient=0:3,body_pose=3:66,left_hand_pose=75:120"}
    for layout, start in layout_of.items():
        at = next(i for i, line in enumerate(examples) if line.startswith(start))
        columns = pd.parse_pose_map(examples[at].split(" ", 1)[1], "--pose-columns")
        after = examples[at + 1] if at + 1 < len(examples) else ""  # its --pose-keys continuation line, if any
        keys = pd.parse_pose_map(after.split(" ", 1)[1] if after.startswith("--pose-keys") else None, "--pose-keys")
        path = write_motion(layout, tmp_path / f"clip{SUFFIX[layout]}", _file_params(pd.POSE_LAYOUTS[layout].up, seed=26))
        mapped, known = pd.load_motion(path, columns=columns, keys=keys), pd.load_motion(path, layout)
        assert mapped["hands"] == known["hands"] and mapped["fps"] == known["fps"]
        for key in pd.POSE_KEYS:
            assert np.allclose(mapped[key], known[key]), (layout, key)


@pytest.mark.parametrize("flags, message", [
    (dict(pose_columns="global_orient=0:3,body_pose=3:60"), "--pose-columns: cannot read 'body_pose=3:60'"),
    (dict(pose_columns="global_orient=0:3,body_pose=3:66,jaw=66:69"), "--pose-columns: cannot read 'jaw=66:69'"),
    (dict(pose_columns="global_orient=0:3,body_pose=3:66,hands=flat"), "cannot read 'hands=flat'"),
    (dict(pose_keys="global_orient=a.b"), "must place global_orient and body_pose"),
    (dict(pose_keys="global_orient=a,body_pose=b", pose_layout="smpl72"), "drop --pose-layout"),
    (dict(pose_keys="body_pose=a,body_pose=b"), "--pose-keys: cannot read 'body_pose=b'"),
])
def test_bad_pose_map_flags_are_refused_when_parsed(flags, message, tmp_path):
    with pytest.raises(pd.UserError, match=message) as err:
        pd.Args(run_dir=tmp_path / "run", pose_source="files", pose_files=tmp_path, **flags).resolved()
    assert "\n" not in str(err.value)
    with pytest.raises(pd.UserError, match="apply to motion files only"):  # not with generated poses
        pd.Args(run_dir=tmp_path / "run", pose_keys="global_orient=a,body_pose=b").resolved()


# --- real SMPL-X folders --------------------------------------------------------------------------

def test_smplx_folder_by_gender_npz_and_pkl(body, body_dir, tmp_path):
    folder = tmp_path / "models" / "smplx"  # the official download's layout
    folder.mkdir(parents=True)
    shutil.copy(body_dir / "SMPLX_NEUTRAL.npz", folder / "SMPLX_MALE.npz")
    with np.load(body_dir / "SMPLX_NEUTRAL.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    with open(folder / "SMPLX_FEMALE.pkl", "wb") as fh:
        pickle.dump(arrays, fh, protocol=2)
    params = {k: torch.as_tensor(np.random.default_rng(0).normal(0, 0.3, (2,) + s), dtype=torch.float32)
              for k, s in pd.POSE_KEYS.items()}
    with torch.no_grad():
        expected = pd.body_forward(body, params)[1]
        for gender in ("male", "female"):
            model = pd.load_body_model(tmp_path / "models", gender=gender)
            assert torch.allclose(pd.body_forward(model, params)[1], expected, atol=1e-5)
    with pytest.raises(pd.UserError, match="holds no SMPLX_NEUTRAL.npz"):
        pd.load_body_model(tmp_path / "models", gender="neutral")
    with pytest.raises(pd.UserError, match="gender 'robot' is not one of neutral, male, female"):
        pd.load_body_model(tmp_path / "models", gender="robot")
    # prepare_body points the run's body/ at the user's file; later stages load it from there
    args = pd.Args(run_dir=tmp_path / "run", body_model=tmp_path / "models", gender="female")
    pd.prepare_body(args, args.body_model)
    assert pd.body_model_file(tmp_path / "run" / "body") == ((folder / "SMPLX_FEMALE.pkl").resolve(), "female")
    assert pd.load_body_model(tmp_path / "run" / "body").v_template.shape == body.v_template.shape


def test_model_pickles_needing_chumpy_or_code_are_refused(tmp_path):
    chumpy = b"\x80\x02cchumpy.ch\nCh\nq\x00)\x81q\x01."  # what an old SMPL-X .pkl starts like
    (tmp_path / "SMPLX_NEUTRAL.pkl").write_bytes(chumpy)
    with pytest.raises(pd.UserError, match="needs chumpy"):
        pd.load_body_model(tmp_path)


# --- photos -----------------------------------------------------------------------------------------

def _person(background, size=(96, 64)) -> np.ndarray:
    """An RGB photo: `background` (H, W, 3) uint8 with one person-like blob (head, body, legs)."""
    image = background.copy()
    image[20:30, 28:36] = (200, 160, 130)  # head
    image[30:60, 22:42] = (40, 60, 160)  # torso
    image[60:85, 24:40] = (30, 30, 30)  # legs
    return image


def _save(tmp_path, name, array):
    from PIL import Image

    Image.fromarray(array).save(tmp_path / name)
    return tmp_path / name


def test_plain_background_photo_is_accepted_and_framed(tmp_path):
    path = _save(tmp_path, "studio.jpg", _person(np.full((96, 64, 3), 235, np.uint8)))
    image = rc.load_image(path, 32)
    assert image.shape == (3, 32, 32) and image[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    dark = image.min(0).values < 0.9
    rows, cols = np.nonzero(dark.numpy())
    height = (rows.max() - rows.min() + 1) / 32
    assert abs(height - rc.FOREGROUND_FRACTION) < 0.1  # the person's 65 rows scaled to 0.8 of the side


def test_textured_background_photo_is_refused(tmp_path):
    texture = np.random.default_rng(0).integers(0, 255, (96, 64, 3)).astype(np.uint8)
    path = _save(tmp_path, "street.png", _person(texture))
    with pytest.raises(pd.UserError, match="background is not plain.*pass an RGBA cut-out") as err:
        rc.load_image(path, 32)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_two_people_and_implausible_sizes_are_refused(tmp_path):
    two = np.full((96, 128, 3), 240, np.uint8)
    two[:, :64] = _person(two[:, :64])
    two[:, 64:] = _person(two[:, 64:])
    with pytest.raises(pd.UserError, match="2 separate regions.*RGBA cut-out"):
        rc.load_image(_save(tmp_path, "two.png", two), 32)
    speck = np.full((200, 200, 3), 240, np.uint8)
    speck[100:103, 100:103] = 0
    with pytest.raises(pd.UserError, match="no foreground found|covers"):
        rc.load_image(_save(tmp_path, "speck.png", speck), 32)
    filled = np.full((64, 64, 3), 240, np.uint8)
    filled[2:62, 2:62] = 20
    with pytest.raises(pd.UserError, match="covers 88% of the frame"):
        rc.load_image(_save(tmp_path, "filled.png", filled), 32)


def test_a_mask_file_makes_a_textured_photo_usable(tmp_path):
    texture = np.random.default_rng(1).integers(0, 255, (96, 64, 3)).astype(np.uint8)
    photo = _person(texture)
    mask = np.zeros((96, 64), np.uint8)
    mask[20:85, 22:42] = 255
    path = _save(tmp_path, "street.png", photo)
    mask_path = _save(tmp_path, "street_mask.png", mask)
    rgba = _save(tmp_path, "cutout.png", np.concatenate([photo, mask[..., None]], -1))
    assert torch.equal(rc.load_image(path, 32, mask=mask_path), rc.load_image(rgba, 32))
    with pytest.raises(pd.UserError, match="pass a mask of the same size"):
        rc.load_image(path, 32, mask=_save(tmp_path, "small_mask.png", mask[:50]))


def test_huge_images_are_refused_before_decoding(tmp_path):
    from PIL import Image

    path = tmp_path / "huge.png"
    Image.new("1", (5000, 4000)).save(path)
    with pytest.raises(pd.UserError, match=r"is 5000x4000 px, more than 16777216 pixels") as err:
        rc.load_image(path, 32)
    assert str(path) in str(err.value)
