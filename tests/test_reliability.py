"""Reliability: bad input is refused in one line with exit status 2 and nothing written;
kill -9 and resume in a new process (another hash seed, another spelling of the run folder) ends
bitwise equal to an uninterrupted run; a non-finite loss or gradient stops training at its step.

One tiny but complete run folder (`world`: 16 px data made by prepare_data, a random g_skel as
posescore/ and pose_reader/, a 4-step base/ and drpose/ with checkpoints, two reconstructions and an
evaluation) is built once. Each bad-input case runs on a copy of it: the stage's real CLI entry point
(`run_cli`, in-process; a few through a subprocess), the run folder hashed before and after.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro

import evaluate
import finetune
import plumbing
import posescore
import prepare_data as pd
import pretrain
import reconstruct

REPO = Path(__file__).resolve().parents[1]
RES = 16
TINY_DATA = ["--resolution", "16", "--num-scans", "6", "--num-val-scans", "2", "--num-anchors", "2",
             "--neighbours", "1", "--num-bench-dynamic", "1", "--num-bench-extreme", "1", "--pose-pool-clips", "2",
             "--no-ceiling"]
TINY_BASE = ["--steps", "4", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "1", "--channels", "8", "16",
             "--layers-per-block", "1", "--attn-levels", "1", "--heads", "2", "--token-dim", "16",
             "--checkpoint-every", "2", "--log-every", "1", "--val-every", "2", "--num-eval", "0", "--ddim-steps", "2",
             "--device", "cpu"]
TINY_DRPOSE = ["--steps", "4", "--batch-size", "2", "--lr", "1e-2", "--warmup-steps", "1", "--lora-rank", "4",
               "--ddim-steps", "3", "--grad-steps", "2", "--early-stop-max", "1", "--log-every", "1", "--num-eval", "0",
               "--checkpoint-every", "2", "--device", "cpu"]
TINY_RECON = ["--model", "base", "--count", "2", "--ddim-steps", "2", "--fit-steps", "2", "--carve-steps", "1"]
MAINS = {"prepare_data": (pd.main, pd.Args), "posescore": (posescore.main, posescore.Command),
         "pretrain": (pretrain.main, pretrain.Args), "finetune": (finetune.main, finetune.Args),
         "reconstruct": (reconstruct.main, reconstruct.Args), "evaluate": (evaluate.main, evaluate.Args)}
# Every refusal says what to do: re-run a command, pass or drop a flag, ...
FIX = re.compile(r"\b(re-run|make (it|one)|pass|drop|delete|lower|raise|use|leave|name|change|fix|check|expected)\b")


def in_process(stage: str, argv: list[str]):
    """Run a stage's CLI entry point (`run_cli`: tyro parse, main, UserError -> one line + exit 2)."""
    main, args_type = MAINS[stage]
    old = sys.argv
    sys.argv = [f"{stage}.py", *argv]
    try:
        pd.run_cli(main, args_type)
    finally:
        sys.argv = old


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses below run with OMP_NUM_THREADS=1: same float sums
    try:
        # data through the script, as the kill-and-rerun test makes it (one BLAS thread: same float sums)
        script("prepare_data", ["--run-dir", str(root), *TINY_DATA], REPO, hash_seed=0)
        for name in ("posescore", "pose_reader"):
            torch.manual_seed(0)
            posescore.build_gskel(RES, (8, 8)).save_pretrained(root / name)
            pd.write_json(root / name / "posescore_config.json", dict(resolution=RES, width=1.0))
        pretrain.train_base(tyro.cli(pretrain.Args, args=["--run-dir", str(root), *TINY_BASE]))
        finetune.drpose(tyro.cli(finetune.Args, args=["--run-dir", str(root), *TINY_DRPOSE]))
        reconstruct.main(tyro.cli(reconstruct.Args, args=["--run-dir", str(root), *TINY_RECON]))
        evaluate.main(tyro.cli(evaluate.Args, args=["--run-dir", str(root), "--models", "base", "--num-samples", "200",
                                                    "--max-grids", "1"]))
    finally:
        torch.set_num_threads(threads)
    return root


def folder_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


# --- damage a copy of the world ---------------------------------------------------------------------

def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    path.write_bytes(b"{not json, not npz")


def edit_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text())
    obj.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del obj[key]
    path.unlink()
    path.write_text(json.dumps(obj))


def edit_npz(path: Path, key: str, fn) -> None:
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays[key] = fn(arrays[key])
    path.unlink()
    np.savez(path, **arrays)


def nan_first(a):
    a = a.astype(np.float32)
    a.flat[0] = np.nan
    return a


def a_file(run: Path) -> None:
    (run / "afile").write_text("a file where a folder would go")


def person_png(run: Path) -> None:
    from PIL import Image

    pixels = np.full((32, 32, 3), 255, np.uint8)
    pixels[4:28, 12:20] = (200, 60, 60)
    Image.fromarray(pixels).save(run / "person.png")


def motion_file(array):
    return lambda run: np.save(run / "clip.npy", array)


HELD_LOCKS = []  # open lock files of a run "under way" in this process (flock is per open file)


def hold_lock(path: Path) -> None:
    import fcntl

    handle = open(path, "a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    HELD_LOCKS.append(handle)


def nan_weights(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name].view(-1)[0] = float("nan")
    path.unlink()
    save_file(weights, path)


# --- the matrix ---------------------------------------------------------------------------------------

@dataclass
class Case:
    stage: str
    argv: list
    expect: str  # a regex the error line must contain: the flag or the file
    damage: object = None  # fn(run) applied to the copy before hashing
    subprocess: bool = False  # through the real script in a new process, not in-process
    skip_on_cuda: bool = False
    extra: dict = field(default_factory=dict)


R = ["--run-dir", "{run}"]
E = R + ["--num-samples", "200"]  # evaluate: few surface samples (the cases fail before scoring anyway)
SCANS, BENCH, PAIRS = "data/scans/train.npz", "data/bench/bench.npz", "data/drpose/pairs.npz"
MOTIONX = ["--pose-source", "files", "--pose-layout", "motionx", "--fps", "30"]
CASES = {
    # prepare_data: flags, motion files, the body model, the output folder
    "data/motion-file-garbage": Case("prepare_data", R + MOTIONX + ["--pose-files", "{run}/clip.npy"],
                                     "clip.npy", lambda run: garbage(run / "clip.npy")),
    "data/motion-file-wrong-width": Case("prepare_data", R + MOTIONX + ["--pose-files",
                                                              "{run}/clip.npy"], "clip.npy.*322",
                                         motion_file(np.zeros((10, 100), np.float32))),
    "data/motion-file-nan": Case("prepare_data", R + MOTIONX + ["--pose-files", "{run}/clip.npy"],
                                 "clip.npy.*NaN", motion_file(np.full((10, 322), np.nan, np.float32))),
    "data/motion-too-few-frames": Case("prepare_data", R + MOTIONX + ["--pose-files",
                                                            "{run}/clip.npy"], "too short for --neighbours",
                                       motion_file(np.zeros((10, 322), np.float32))),
    "data/body-model-empty-folder": Case("prepare_data", R + ["--body-model", "{run}/smplx"], "SMPLX_NEUTRAL",
                                         lambda run: (run / "smplx").mkdir()),
    "data/body-model-garbage": Case("prepare_data", R + ["--body-model", "{run}/smplx"], "not a valid SMPL-X",
                                    lambda run: garbage(run / "smplx" / "SMPLX_NEUTRAL.npz")),
    "data/body-model-not-a-folder": Case("prepare_data", R + ["--body-model", "{run}/nothing"], "--body-model"),
    "data/damaged-body-export": Case("prepare_data", R + TINY_DATA, "body/SMPLX_NEUTRAL.npz",
                                     lambda run: truncate(run / "body" / "SMPLX_NEUTRAL.npz")),
    "data/run-dir-under-a-file": Case("prepare_data", ["--run-dir", "{run}/afile/run"], "afile is a file", a_file),

    # posescore train: flags, --init, what it reads (scans, bench, body)
    "gskel/channels-too-deep": Case("posescore", ["train"] + R + ["--channels"] + ["8"] * 6, "--channels"),
    "gskel/out-under-a-file": Case("posescore", ["train"] + R + ["--out", "{run}/afile/gskel"], "afile is a file", a_file),
    "gskel/init-config-garbage": Case("posescore", ["train"] + R + ["--init", "{run}/pose_reader", "--steps", "0",
                                                                    "--out", "{run}/reader2"],
                                      "pose_reader/posescore_config.json",
                                      lambda run: garbage(run / "pose_reader" / "posescore_config.json")),
    "gskel/init-config-without-resolution": Case(
        "posescore", ["train"] + R + ["--init", "{run}/pose_reader", "--steps", "0", "--out", "{run}/reader2"],
        "posescore_config.json lacks a valid resolution",
        lambda run: edit_json(run / "pose_reader" / "posescore_config.json", resolution=None)),
    "gskel/init-weights-truncated": Case(
        "posescore", ["train"] + R + ["--init", "{run}/pose_reader", "--steps", "0", "--out", "{run}/reader2"],
        "pose_reader: cannot load", lambda run: truncate(run / "pose_reader" / "diffusion_pytorch_model.safetensors"),
        subprocess=True),
    "gskel/bench-missing": Case("posescore", ["train"] + R + ["--steps", "1"], "bench/manifest.json is missing",
                                lambda run: shutil.rmtree(run / "data" / "bench")),
    "gskel/bench-nan": Case("posescore", ["train"] + R + ["--steps", "1"], "bench.npz.*NaN",
                            lambda run: edit_npz(run / BENCH, "joints", nan_first)),
    "gskel/body-missing": Case("posescore", ["train"] + R + ["--steps", "1"], "SMPLX_NEUTRAL",
                               lambda run: shutil.rmtree(run / "body")),
    "gskel/scans-manifest-resolution": Case("posescore", ["train"] + R, "train.npz.*'color'",
                                            lambda run: edit_json(run / "data/scans/manifest.json", resolution=32)),
    "gskel/scans-manifest-views": Case("posescore", ["train"] + R, "lists views",
                                       lambda run: edit_json(run / "data/scans/manifest.json", views=[0, 90, 180, 270])),
    "gskel/scans-joints-22": Case("posescore", ["train"] + R, "train.npz.*'joints'",
                                  lambda run: edit_npz(run / SCANS, "joints", lambda a: a[:, :22])),
    "gskel/scans-colour-float": Case("posescore", ["train"] + R, "train.npz.*'color'",
                                     lambda run: edit_npz(run / SCANS, "color", lambda a: a.astype(np.float32))),
    "gskel/scans-truncated": Case("posescore", ["train"] + R, "train.npz is not a readable npz",
                                  lambda run: truncate(run / SCANS)),
    # posescore score
    "score/unknown-reward": Case("posescore", ["score", "--views-dir", "{run}/recon/base"] + R + ["--reward", "nope"],
                                 "--reward nope"),
    "score/views-with-4-views": Case("posescore", ["score", "--views-dir", "{run}/recon/base"] + R,
                                     "00000/views.npz.*latents",
                                     lambda run: edit_npz(run / "recon/base/00000/views.npz", "latents", lambda a: a[:4])),
    "score/views-nan": Case("posescore", ["score", "--views-dir", "{run}/recon/base"] + R, "views.npz.*NaN",
                            lambda run: edit_npz(run / "recon/base/00001/views.npz", "latents", nan_first)),
    "score/gskel-config-garbage": Case("posescore", ["score", "--views-dir", "{run}/recon/base"] + R,
                                       "posescore/posescore_config.json",
                                       lambda run: garbage(run / "posescore" / "posescore_config.json")),

    # pretrain: flags that would destroy base/, --init, --resume, what it reads
    "base/resume-without-checkpoint": Case("pretrain", R + TINY_BASE + ["--resume"], "--resume: no complete checkpoint",
                                           lambda run: shutil.rmtree(run / "base_ckpt")),
    "base/resume-other-network": Case("pretrain", R + TINY_BASE + ["--resume", "--channels", "8", "24"],
                                      "different network"),
    "base/resume-past-steps": Case("pretrain", R + TINY_BASE + ["--resume", "--steps", "1"], "past --steps 1"),
    "base/init-weights-truncated": Case("pretrain", R + ["--init", "{run}/base", "--steps", "0"], "base: cannot load",
                                        lambda run: truncate(run / "base" / "diffusion_pytorch_model.safetensors"),
                                        subprocess=True),
    "base/init-config-garbage": Case("pretrain", R + ["--init", "{run}/base", "--steps", "0"], "model_config.json",
                                     lambda run: garbage(run / "base" / "model_config.json")),
    "base/scans-truncated": Case("pretrain", R + TINY_BASE, "train.npz is not a readable npz",
                                 lambda run: truncate(run / SCANS)),
    "base/scans-joints-22": Case("pretrain", R + TINY_BASE, "train.npz.*'joints'",
                                 lambda run: edit_npz(run / SCANS, "joints", lambda a: a[:, :22])),
    "base/bench-truncated": Case("pretrain", R + TINY_BASE + ["--num-eval", "1"], "bench.npz",
                                 lambda run: truncate(run / BENCH)),
    "base/run-dir-under-a-file": Case("pretrain", ["--run-dir", "{run}/afile/run"], "afile is a file", a_file),
    "base/device-cuda-without-cuda": Case("pretrain", R + ["--device", "cuda"], "CUDA is not available",
                                          skip_on_cuda=True),

    # finetune (DrPose): flags, --resume, the base, the reward, the pairs
    "drpose/out-under-a-file": Case("finetune", R + ["--out", "{run}/afile/drpose"], "afile is a file", a_file),
    "drpose/resume-without-checkpoint": Case("finetune", R + TINY_DRPOSE + ["--resume"],
                                             "--resume: no complete checkpoint",
                                             lambda run: shutil.rmtree(run / "drpose_ckpt")),
    "drpose/resume-other-lora-rank": Case("finetune", R + TINY_DRPOSE + ["--resume", "--lora-rank", "2"],
                                          "incompatible"),
    "drpose/base-missing": Case("finetune", R + TINY_DRPOSE + ["--base", "{run}/nothing"], "nothing is not a model"),
    "drpose/base-weights-truncated": Case("finetune", R + TINY_DRPOSE, "base: cannot load",
                                          lambda run: truncate(run / "base" / "diffusion_pytorch_model.safetensors")),
    "drpose/base-config-without-resolution": Case(
        "finetune", R + TINY_DRPOSE, "model_config.json lacks a valid resolution",
        lambda run: edit_json(run / "base" / "model_config.json", resolution=None)),
    "drpose/reward-gskel-missing": Case("finetune", R + TINY_DRPOSE + ["--reward-dir", "{run}/nothing"],
                                        "holds no trained g_skel"),
    "drpose/reward-gskel-config-garbage": Case("finetune", R + TINY_DRPOSE, "posescore/posescore_config.json",
                                               lambda run: garbage(run / "posescore" / "posescore_config.json")),
    "drpose/reward-gskel-weights-truncated": Case(
        "finetune", R + TINY_DRPOSE, "posescore: cannot load",
        lambda run: truncate(run / "posescore" / "diffusion_pytorch_model.safetensors")),
    "drpose/lpips-missing": Case("finetune", R + TINY_DRPOSE + ["--lpips-weights", "{run}/lpips.pt"], "--lpips-weights"),
    "drpose/pairs-joints-22": Case("finetune", R + TINY_DRPOSE, "pairs.npz.*'joints'",
                                   lambda run: edit_npz(run / PAIRS, "joints", lambda a: a[:, :22])),
    "drpose/pairs-manifest-resolution": Case("finetune", R + TINY_DRPOSE, "pairs.npz.*'image'",
                                             lambda run: edit_json(run / "data/drpose/manifest.json", resolution=32)),
    "drpose/pairs-truncated": Case("finetune", R + TINY_DRPOSE, "pairs.npz is not a readable npz",
                                   lambda run: truncate(run / PAIRS)),
    "drpose/bench-joints-22": Case("finetune", R + TINY_DRPOSE + ["--num-eval", "1"], "bench.npz.*'joints'",
                                   lambda run: edit_npz(run / BENCH, "joints", lambda a: a[:, :22])),

    # reconstruct: flags, the model, the reader, given views, the output folder's recipe
    "recon/views-from-4-views": Case("reconstruct", R + ["--views-from", "{run}/recon/base", "--tag", "refit"],
                                     "00001/views.npz.*latents",
                                     lambda run: edit_npz(run / "recon/base/00001/views.npz", "latents", lambda a: a[:4])),
    "recon/views-from-nan": Case("reconstruct", R + ["--views-from", "{run}/recon/base", "--tag", "refit"],
                                 "views.npz.*NaN",
                                 lambda run: edit_npz(run / "recon/base/00001/views.npz", "latents", nan_first)),
    "recon/model-missing": Case("reconstruct", R + ["--model", "nothing"], "nothing is not a model folder"),
    "recon/model-weights-truncated": Case("reconstruct", R + TINY_RECON, "base: cannot load",
                                          lambda run: truncate(run / "base" / "diffusion_pytorch_model.safetensors")),
    "recon/reader-config-garbage": Case("reconstruct", R + TINY_RECON, "pose_reader/posescore_config.json",
                                        lambda run: garbage(run / "pose_reader" / "posescore_config.json")),
    "recon/manifest-garbage": Case("reconstruct", R + TINY_RECON, "recon/base/manifest.json",
                                   lambda run: garbage(run / "recon/base/manifest.json")),
    "recon/recipe-differs": Case("reconstruct", R + TINY_RECON + ["--seed", "3"], "made differently"),
    "recon/ideal-skeleton-on-an-image": Case(
        "reconstruct", R + ["--input", "{run}/person.png", "--skeleton", "ideal"], "need a dataset", person_png),
    "recon/bench-joints-22": Case("reconstruct", R + ["--oracle", "--skeleton", "ideal", "--tag", "o"],
                                  "bench.npz.*'joints'", lambda run: edit_npz(run / BENCH, "joints", lambda a: a[:, :22])),

    # evaluate: flags, reconstructions, the bench, the networks
    "eval/model-not-reconstructed": Case("evaluate", E + ["--models", "base", "drpose"],
                                         "recon/drpose/manifest.json is missing"),
    "eval/recon-joints-nan": Case("evaluate", E + ["--models", "base"], "00000/joints.npz.*NaN",
                                  lambda run: edit_npz(run / "recon/base/00000/joints.npz", "joints", nan_first)),
    "eval/recon-joints-22": Case("evaluate", E + ["--models", "base"], "joints.npz.*'joints'",
                                 lambda run: edit_npz(run / "recon/base/00000/joints.npz", "joints", lambda a: a[:22])),
    "eval/recon-views-4": Case("evaluate", E + ["--models", "base"], "views.npz.*'latents'",
                               lambda run: edit_npz(run / "recon/base/00001/views.npz", "latents", lambda a: a[:4])),
    "eval/recon-count-0": Case("evaluate", E + ["--models", "base"], "count 0",
                               lambda run: edit_json(run / "recon/base/manifest.json", count=0)),
    "eval/recon-mesh-garbage": Case("evaluate", E + ["--models", "base"], "00000/mesh.ply",
                                    lambda run: garbage(run / "recon/base/00000/mesh.ply")),
    "eval/bench-mesh-missing": Case("evaluate", E + ["--models", "base"], "meshes/00001.ply is missing",
                                    lambda run: (run / "data/bench/meshes/00001.ply").unlink()),
    "eval/bench-manifest-garbage": Case("evaluate", E + ["--models", "base"], "bench/manifest.json",
                                        lambda run: garbage(run / "data/bench/manifest.json")),
    "eval/posescore-config-garbage": Case("evaluate", E + ["--models", "base"], "posescore/posescore_config.json",
                                          lambda run: garbage(run / "posescore" / "posescore_config.json")),
    "eval/reader-weights-truncated": Case(
        "evaluate", E + ["--models", "base"], "pose_reader: cannot load",
        lambda run: truncate(run / "pose_reader" / "diffusion_pytorch_model.safetensors")),
    "eval/run-dir-under-a-file": Case("evaluate", ["--run-dir", "{run}/afile/run"], "afile is a file", a_file),

    # no flag destroys what the run made: another stage's folder, a name outside the run, a run under way
    "guard/base-out-data": Case("pretrain", R + ["--init", "{run}/base", "--steps", "0", "--out", "{run}/data"],
                                "--out .*data is a data folder made by prepare_data.py"),
    "guard/drpose-out-base": Case("finetune", R + TINY_DRPOSE + ["--out", "{run}/base"],
                                  "--out .*base is a base or ceiling model folder"),
    "guard/gskel-out-base": Case("posescore", ["train"] + R + ["--out", "{run}/base"],
                                 "--out .*base is a base or ceiling model folder"),
    "guard/score-out-base-config": Case("posescore", ["score", "--views-dir", "{run}/recon/base"] + R +
                                        ["--out", "{run}/base/model_config.json"], "--out .*model_config.json"),
    "guard/recon-tag-escapes": Case("reconstruct", R + TINY_RECON + ["--tag", "../../escaped"], "--tag '../../escaped'"),
    "guard/eval-run-dir-in-base": Case("evaluate", ["--run-dir", "{run}/base"], "inside .*base, a base or ceiling"),
    "guard/base-max-minutes-negative": Case("pretrain", R + TINY_BASE + ["--resume", "--max-minutes", "-1"],
                                            "--max-minutes -1"),
    "guard/drpose-realism-weight-negative": Case("finetune", R + TINY_DRPOSE + ["--realism-weight", "-1"],
                                                 "--realism-weight -1"),
    "guard/preset-huge": Case("pretrain", R + ["--preset", "huge"], "invalid choice 'huge' for argument '--preset'"),
    "guard/drpose-out-being-written": Case("finetune", R + TINY_DRPOSE, "drpose is being written by another run",
                                           lambda run: hold_lock(run / "drpose.lock")),
    "guard/drpose-base-nan-weights": Case("finetune", R + TINY_DRPOSE, "base: the weights hold NaN",
                                          lambda run: nan_weights(run / "base/diffusion_pytorch_model.safetensors")),
    "guard/drpose-bench-manifest-count": Case("finetune", R + TINY_DRPOSE + ["--num-eval", "1"], "count = 1000",
                                              lambda run: edit_json(run / "data/bench/manifest.json", count=1000)),
    "guard/drpose-pairs-manifest-anchors": Case("finetune", R + TINY_DRPOSE, "anchors = 9999",
                                                lambda run: edit_json(run / "data/drpose/manifest.json", anchors=9999)),
    "guard/base-checkpoint-step-four": Case("pretrain", R + TINY_BASE + ["--resume"], "step 'four'",
                                            lambda run: edit_json(run / "base_ckpt/step_000004/state.json", step="four")),
}


def test_the_matrix_is_big_enough_and_covers_every_stage():
    assert len(CASES) >= 60
    assert {case.stage for case in CASES.values()} == set(MAINS)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_in_one_line_and_writes_nothing(name, world, tmp_path, capsys):
    case = CASES[name]
    if case.skip_on_cuda and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    run = tmp_path / "run"
    shutil.copytree(world, run, symlinks=True)
    if case.damage is not None:
        case.damage(run)
    argv = [arg.replace("{run}", str(run)) for arg in case.argv]
    before = folder_hashes(tmp_path)
    if case.subprocess:
        proc = subprocess.run([sys.executable, str(REPO / f"{case.stage}.py"), *argv], capture_output=True,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path, timeout=300)
        status, stderr = proc.returncode, proc.stderr
    else:
        with pytest.raises(SystemExit) as exit_info:
            in_process(case.stage, argv)
        status, stderr = exit_info.value.code, capsys.readouterr().err
    assert status == 2, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr  # one line, nothing else
    assert re.search(case.expect, stderr), (case.expect, stderr)
    assert FIX.search(stderr), stderr
    assert folder_hashes(tmp_path) == before  # every file written before is unchanged, nothing new


# --- kill -9 and resume in a new process ---------------------------------------------------------------

def spawn(code: str, argv: list[str], cwd: Path, hash_seed: int) -> subprocess.Popen:
    """A stage's own function in a new process that stops (sleeps) at a chosen point, to be killed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED=str(hash_seed), PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, ready: Path, timeout: float = 240) -> None:
    """Poll for `ready`, then kill -9 (SIGKILL: no cleanup, no atexit)."""
    deadline = time.time() + timeout
    while not ready.exists():
        assert proc.poll() is None, f"the run ended before {ready} appeared: {proc.stderr.read()}"
        assert time.time() < deadline, f"{ready} did not appear"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9


def script(stage: str, argv: list[str], cwd: Path, hash_seed: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED=str(hash_seed))
    proc = subprocess.run([sys.executable, str(REPO / f"{stage}.py"), *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def two_spellings(tmp_path: Path) -> tuple[str, Path]:
    """The run folder as `run` relative to tmp_path (the killed run) and as an absolute path through
    a symlink (the resumed run)."""
    (tmp_path / "link").symlink_to(tmp_path / "run", target_is_directory=True)
    return "run", tmp_path / "link"


def test_pretrain_killed_and_resumed_in_a_new_process_matches_an_uninterrupted_run(world, tmp_path):
    (tmp_path / "run").mkdir()
    shutil.copytree(world / "data", tmp_path / "run" / "data")
    relative, via_link = two_spellings(tmp_path)
    # Sleep once step 3 is done (logged, not checkpointed): the kill loses it, as a real one would.
    code = ("import sys, time, tyro, pretrain; "
            "pretrain.train_base(tyro.cli(pretrain.Args, args=sys.argv[1:]), hook=lambda s: s == 3 and time.sleep(600))")
    proc = spawn(code, ["--run-dir", relative, *TINY_BASE], tmp_path, hash_seed=11)
    kill_when(proc, tmp_path / "run/base_ckpt/step_000002/state.json")
    assert not (tmp_path / "run/base").exists()
    script("pretrain", ["--run-dir", str(via_link), *TINY_BASE, "--resume"], REPO, hash_seed=22)
    name = "diffusion_pytorch_model.safetensors"
    assert same_weights(tmp_path / "run/base" / name, world / "base" / name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/base/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 3 of the killed run was dropped and redone once


def test_drpose_killed_and_resumed_in_a_new_process_matches_an_uninterrupted_run(world, tmp_path):
    for name in ("base", "posescore", "data/drpose"):
        shutil.copytree(world / name, tmp_path / "run" / name)
    relative, via_link = two_spellings(tmp_path)
    code = ("import sys, time, tyro, finetune; "
            "finetune.drpose(tyro.cli(finetune.Args, args=sys.argv[1:]), hook=lambda s: s == 3 and time.sleep(600))")
    proc = spawn(code, ["--run-dir", relative, *TINY_DRPOSE], tmp_path, hash_seed=33)
    kill_when(proc, tmp_path / "run/drpose_ckpt/step_000002/state.json")
    assert not (tmp_path / "run/drpose").exists()
    script("finetune", ["--run-dir", str(via_link), *TINY_DRPOSE, "--resume"], REPO, hash_seed=44)
    for name in ("diffusion_pytorch_model.safetensors", "lora/pytorch_lora_weights.safetensors"):
        assert same_weights(tmp_path / "run/drpose" / name, world / "drpose" / name), name


def same_weights(a: Path, b: Path) -> bool:
    """Every tensor bitwise equal, and the same metadata (a safetensors header's metadata is a Rust
    hash map: its key order varies from process to process, so the files' bytes may not be equal)."""
    from safetensors import safe_open

    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        return fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys()) and all(
            fa.get_tensor(k).dtype == fb.get_tensor(k).dtype
            and fa.get_tensor(k).numpy().tobytes() == fb.get_tensor(k).numpy().tobytes() for k in fa.keys())


def test_prepare_data_killed_mid_dataset_and_rerun_gives_identical_files(world, tmp_path):
    """Killed while data/drpose.tmp/ is half written (scans complete): a re-run in a new process
    redoes the datasets (each written atomically, deterministic) and leaves no temporary folder;
    every file equals the uninterrupted run's, byte for byte."""
    (tmp_path / "run").mkdir()
    relative, via_link = two_spellings(tmp_path)
    code = ("import sys, time, prepare_data as pd; sheet = pd.contact_sheet; "
            "pd.contact_sheet = lambda path, rows: (sheet(path, rows), 'drpose.tmp' in str(path) and time.sleep(600)); "
            "pd.run_cli(pd.main, pd.Args)")
    proc = spawn(code, ["--run-dir", relative, *TINY_DATA], tmp_path, hash_seed=55)
    kill_when(proc, tmp_path / "run/data/drpose.tmp/contact_sheet.png")
    assert (tmp_path / "run/data/scans/manifest.json").exists() and not (tmp_path / "run/data/bench").exists()
    script("prepare_data", ["--run-dir", str(via_link), *TINY_DATA], REPO, hash_seed=66)
    made = {k: v for k, v in folder_hashes(tmp_path / "run").items() if k != "prepare_data.json"}
    reference = {k: v for k, v in folder_hashes(world).items() if k.startswith(("body/", "data/"))}
    assert made == reference


# --- checkpoints and recipes do not depend on hash seed or spelling ------------------------------------

def test_architecture_ignores_private_keys_and_order():
    config = dict(pretrain.unet_config(RES, (8, 16), 1, 1, 2, 16))
    a = dict(config, _use_default_values=["b", "a"], _name_or_path="/x/base")
    b = dict(reversed(list(config.items())), _use_default_values=["a", "b"], _name_or_path="runs/x/base")
    assert plumbing.architecture(a) == plumbing.architecture(b) == plumbing.architecture(config)
    assert plumbing.architecture(dict(config, layers_per_block=2)) != plumbing.architecture(config)


def test_reconstruct_rerun_through_another_spelling_keeps_its_samples(world, tmp_path):
    shutil.copytree(world, tmp_path / "run", symlinks=True)
    relative, via_link = two_spellings(tmp_path)
    stamp = (tmp_path / "run/recon/base/00000/mesh.ply").stat().st_mtime_ns
    reconstruct.main(tyro.cli(reconstruct.Args, args=["--run-dir", str(via_link), *TINY_RECON]))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        reconstruct.main(tyro.cli(reconstruct.Args, args=["--run-dir", relative, *TINY_RECON]))
    finally:
        os.chdir(cwd)
    assert (tmp_path / "run/recon/base/00000/mesh.ply").stat().st_mtime_ns == stamp  # skipped, not redone


# --- NaN guards -----------------------------------------------------------------------------------------

def test_pretrain_stops_at_a_nan_loss_with_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    shutil.copytree(world / "data", tmp_path / "run" / "data")
    loss_fn, calls = pretrain.diffusion_loss, []

    def nan_at_step_3(*args, **kw):
        calls.append(1)
        loss = loss_fn(*args, **kw)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(pretrain, "diffusion_loss", nan_at_step_3)
    args = tyro.cli(pretrain.Args, args=["--run-dir", str(tmp_path / "run"), *TINY_BASE, "--val-every", "100"])
    with pytest.raises(pd.UserError, match=r"pretrain stopped at step 3: loss nan.*step_000002"):
        train_single_thread(pretrain.train_base, args)
    ckpt = tmp_path / "run/base_ckpt"
    assert plumbing.latest_checkpoint(ckpt).name == "step_000002" and not (tmp_path / "run/base").exists()
    good = world / "base_ckpt/step_000002/model.safetensors"
    assert same_weights(ckpt / "step_000002/model.safetensors", good)  # the last good one, intact


def train_single_thread(fn, args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(args)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("broken", ["loss", "gradient"])
def test_drpose_stops_at_a_nan_loss_or_gradient_with_the_last_good_checkpoint(world, tmp_path, monkeypatch, broken):
    for name in ("base", "posescore", "data/drpose"):
        shutil.copytree(world / name, tmp_path / "run" / name)
    calls = []

    def reward_breaking_at_step_3(views, batch, ctx):
        calls.append(1)  # call 1 is the start-up check of the reward's output (posescore.check_reward)
        rewards, parts = posescore.posescore_reward(views, batch, ctx)
        if len(calls) == 4 and broken == "loss":
            rewards = rewards * float("nan")
        elif len(calls) == 4:  # a finite value whose gradient is NaN: 0 * d sqrt(x)/dx at x = 0
            rewards = rewards + 0 * (views * 0).sqrt().sum()
        return rewards, parts

    monkeypatch.setitem(posescore.REWARDS, "breaks", reward_breaking_at_step_3)
    args = tyro.cli(finetune.Args, args=["--run-dir", str(tmp_path / "run"), *TINY_DRPOSE, "--reward", "breaks"])
    message = "loss nan" if broken == "loss" else r"loss [\d.]+, gradient norm nan"
    with pytest.raises(pd.UserError, match=rf"drpose stopped at step 3: {message}.*step_000002"):
        train_single_thread(finetune.drpose, args)
    ckpt = tmp_path / "run/drpose_ckpt"
    assert plumbing.latest_checkpoint(ckpt).name == "step_000002" and not (tmp_path / "run/drpose").exists()
    assert same_weights(ckpt / "step_000002/model.safetensors", world / "drpose_ckpt/step_000002/model.safetensors")


def test_gskel_training_stops_at_a_nan_loss_and_keeps_posescore(world, tmp_path, monkeypatch):
    shutil.copytree(world, tmp_path / "run", symlinks=True)
    before = folder_hashes(tmp_path / "run")
    augment, calls = posescore.augment, []

    def nan_at_step_2(images, *args):
        calls.append(1)
        out = augment(images, *args)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(posescore, "augment", nan_at_step_2)
    with pytest.raises(pd.UserError, match="g_skel training stopped at step 2"):
        posescore.train(posescore.TrainArgs(run_dir=tmp_path / "run", steps=4, batch_size=4, channels=(8, 8), threads=1))
    assert folder_hashes(tmp_path / "run") == before  # posescore/ as it was, no half-written folder left
