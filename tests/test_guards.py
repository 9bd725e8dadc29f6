"""No flag can destroy what a run already made.

- Output folders are guarded by whose they are: every stage refuses an --out (or a run-folder default)
  that holds another stage's product or lies inside one, judged by the `stage` field each config or
  manifest records and, for folders written before that field, by their marker files.
- A second writer of the same folder is refused while the first runs (a lock next to it, and one on its
  half-written .tmp folder).
- Names that become folders (--tag, --models) stay inside the run folder.
- Every numeric flag has a range, checked at parse time: one parametrised test per stage calls its
  `Args.resolved()` (which runs `check`) directly, no subprocess.
- Inputs read true: EXIF orientation, 16-bit images, manifests against their arrays, motion angles,
  NaN weights; a failing reconstruction leaves no manifest.json; each model records what made it.

Everything here is built from marker files and tiny arrays: no stage trains or renders.
"""

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import tyro
from PIL import Image

import evaluate
import finetune
import plumbing
import posescore
import prepare_data as pd
import pretrain
import reconstruct as rc

RES = 16
FIX = re.compile(r"\b(re-run|pass|drop|delete|lower|raise|use|leave|fix|wait|save|change|name)\b")


def refusal(fn, *args, **kwargs) -> str:
    """The one-line message of the UserError `fn` raises."""
    with pytest.raises(pd.UserError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and FIX.search(message), message
    return message


# --- a run folder of every stage's product, by marker files only --------------------------------------

PRODUCTS = {  # folder under the run folder -> the stage whose product it is
    "data": "prepare_data", "data/bench": "prepare_data", "body": "prepare_data",
    "posescore": "posescore", "pose_reader": "posescore",
    "base": "pretrain", "ceiling": "pretrain", "base_ckpt": "pretrain", "base_ckpt/step_000002": "pretrain",
    "drpose": "finetune", "drpose_ckpt": "finetune",
    "recon": "reconstruct", "recon/base": "reconstruct", "eval": "evaluate",
}


def make_products(run: Path, stage_field: bool) -> Path:
    """Each stage's folder as the stage leaves it, with (today's) or without (older folders) the `stage`
    field; contents are the marker files and a weights file, nothing a stage could load."""
    def write(rel: str, stage: str, **obj):
        pd.write_json(run / rel, dict(obj, stage=stage) if stage_field else obj)

    pd.write_json(run / "prepare_data.json", dict(args={}))
    for name in ("scans", "drpose", "bench", "drpose_gt"):
        write(f"data/{name}/manifest.json", "prepare_data", files={}, conventions={})
    write("body/manifest.json", "prepare_data", file="SMPLX_NEUTRAL.npz", loader="smplx.create")
    for name in ("posescore", "pose_reader"):
        write(f"{name}/posescore_config.json", "posescore", resolution=RES, width=1.0)
    config = pretrain.CONFIG_NAME if stage_field else "drpose_config.json"  # its name in older folders
    for name in ("base", "ceiling"):
        write(f"{name}/{config}", "pretrain", resolution=RES)
        (run / name / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    write("base_ckpt/step_000002/state.json", "pretrain", step=2)
    write(f"drpose/{config}", "finetune", resolution=RES, drpose={})
    write("drpose_ckpt/step_000002/state.json", "finetune", step=2, drpose={})
    write("recon/base/manifest.json", "reconstruct", count=1, skeleton="reader")
    write("eval/results.json", "evaluate", models={})
    return run


@pytest.fixture
def products(tmp_path):
    return make_products(tmp_path / "run", stage_field=True)


@pytest.mark.parametrize("stage_field", [True, False])
def test_whose_folder_it_is_comes_from_the_stage_field_or_the_marker_files(tmp_path, stage_field):
    run = make_products(tmp_path / "run", stage_field)
    assert {name: plumbing.folder_stage(run / name) for name in PRODUCTS} == PRODUCTS
    assert plumbing.folder_stage(run) == plumbing.RUN_FOLDER and plumbing.folder_stage(tmp_path) is None
    for name in PRODUCTS:  # folders written before the field are guarded all the same
        if PRODUCTS[name] != "finetune":
            assert "--out" in refusal(finetune.Args(run_dir=run, out=run / name).resolved)


WRITERS = {  # a stage writing where a flag points it: (its stage, Args for a run folder and a target)
    "prepare_data --run-dir": ("prepare_data", lambda run, target: pd.Args(run_dir=target)),
    "posescore train --out": ("posescore", lambda run, target: posescore.TrainArgs(run_dir=run, out=target)),
    "pretrain --out": ("pretrain", lambda run, target: pretrain.Args(run_dir=run, out=target, init=run / "base",
                                                                     steps=0)),
    "finetune --out": ("finetune", lambda run, target: finetune.Args(run_dir=run, out=target)),
    "reconstruct --run-dir": ("reconstruct", lambda run, target: rc.Args(run_dir=target)),
    "evaluate --run-dir": ("evaluate", lambda run, target: evaluate.Args(run_dir=target)),
    "posescore score --out": ("score", lambda run, target: posescore.ScoreArgs(
        views_dir=run / "recon/base", run_dir=run, out=target / "score.json")),
}


@pytest.mark.parametrize("target", [*PRODUCTS, "."])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_no_stage_writes_into_another_stages_folder(products, writer, target):
    stage, make = WRITERS[writer]
    owner = PRODUCTS.get(target, plumbing.RUN_FOLDER)
    args = make(products, products / target)
    before = sorted(str(p) for p in products.rglob("*"))
    allowed = owner == stage or (owner == plumbing.RUN_FOLDER and writer.endswith("--run-dir")) or (
        stage == "score" and owner in ("reconstruct", "evaluate", plumbing.RUN_FOLDER))
    check = args.check if stage == "score" else args.resolved
    if allowed:
        check()
    else:
        message = refusal(check)
        assert re.search(r"--(out|run-dir)", message) and str(products / target) in message, message
        assert "made by" in message or "run folder" in message, message
    assert sorted(str(p) for p in products.rglob("*")) == before  # checking writes nothing


def test_pretrain_writes_the_ceiling_beside_the_base_and_finetune_may_not(products):
    pretrain.Args(run_dir=products, init=products / "base", out=products / "ceiling",
                  train_data=products / "data/drpose_gt/train.npz", steps=1).resolved()
    assert "DrPose" not in refusal(finetune.Args(run_dir=products, out=products / "base").resolved)
    assert "base or ceiling model folder made by pretrain.py" in refusal(
        finetune.Args(run_dir=products, out=products / "ceiling").resolved)


def test_a_folder_of_other_files_is_refused_and_an_empty_or_half_written_one_taken(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's own file")
    assert "holds files that no finetune.py run wrote (notes.txt)" in refusal(
        finetune.Args(run_dir=tmp_path, out=tmp_path / "mine").resolved)
    (tmp_path / "empty" / "x.tmp").mkdir(parents=True)  # what a killed atomic write leaves
    (tmp_path / "empty_ckpt" / "logs").mkdir(parents=True)  # a checkpoint folder is added to, never replaced:
    (tmp_path / "empty_ckpt" / "metrics.jsonl").write_text("")  # files beside the step folders are fine
    finetune.Args(run_dir=tmp_path, out=tmp_path / "empty").resolved()
    pd.write_json(tmp_path / "empty_ckpt" / "step_000002" / "state.json", dict(stage="pretrain", step=2))
    assert "holds checkpoints of pretrain.py" in refusal(finetune.Args(run_dir=tmp_path, out=tmp_path / "empty").resolved)


# --- one writer at a time --------------------------------------------------------------------------

def test_a_second_writer_of_the_same_output_is_refused_while_the_first_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "drpose"
    seen = {}

    def first_run(args):  # what finetune.main would do; meanwhile a second run of the same --out starts
        seen["lock"] = (tmp_path / "drpose.lock").read_text()
        seen["second"] = refusal(lambda: plumbing.claim_outputs([out]).__enter__())

    monkeypatch.setattr(sys, "argv", ["finetune.py", "--run-dir", str(tmp_path), "--out", str(out)])
    plumbing.run_cli(first_run, finetune.Args)
    assert seen["lock"].startswith("pid ") and "being written by another run (pid " in seen["second"]
    assert not (tmp_path / "drpose.lock").exists() and not out.exists()  # released, nothing left


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path):
    (tmp_path / "base.lock").write_text("pid 123 since yesterday\n")  # its process is gone: no lock held
    with plumbing.claim_outputs([tmp_path / "base"]):
        pass
    assert not (tmp_path / "base.lock").exists()
    with plumbing.claim_outputs([tmp_path / "new" / "deeper" / "base"]):
        assert (tmp_path / "new" / "deeper" / "base.lock").exists()
    assert not (tmp_path / "new").exists()  # folders made for the lock alone are removed with it


def test_two_writers_never_share_a_tmp_folder(tmp_path):
    folder = tmp_path / "drpose"
    with plumbing.atomic_dir(folder) as tmp:
        (tmp / "weights").write_text("first run")
        assert "being written by another run" in refusal(lambda: plumbing.atomic_dir(folder).__enter__())
        assert (tmp / "weights").read_text() == "first run"  # the second did not clear it
    assert (folder / "weights").read_text() == "first run"


# --- names stay inside the run folder ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../escaped", "a/b", "/tmp/abs", "..", ".", "", ".hidden", "a\\b"])
def test_names_that_become_folders_stay_inside_the_run_folder(tmp_path, name):
    assert "--tag" in refusal(rc.Args(run_dir=tmp_path, tag=name).resolved)
    assert "--models" in refusal(evaluate.Args(run_dir=tmp_path, models=("base", name)).resolved)
    assert not (tmp_path / "recon").exists()


def test_a_model_path_names_its_recon_folder_only_when_that_name_is_plain(tmp_path):
    assert "--model" in refusal(rc.Args(run_dir=tmp_path / "run", model="..").resolved)
    (tmp_path / "run").mkdir()
    assert rc.Args(run_dir=tmp_path / "run", model=str(tmp_path / "models" / "v2")).resolved().outputs == (
        tmp_path / "run" / "recon" / "v2",)


# --- every numeric flag has a range, checked at parse time ------------------------------------------

def parsed(args_type, run: Path, flags: list[str]):
    """Args as the CLI parses them (tyro), for a run folder."""
    return tyro.cli(args_type, args=["--run-dir", str(run), *flags])


def assert_refused(args_type, tmp_path, flags, expect):
    message = refusal(parsed(args_type, tmp_path, flags).resolved)
    assert re.search(expect, message), (expect, message)
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("flags, expect", [
    (["--resolution", "0"], "--resolution 0"),
    (["--resolution", "20"], "--resolution 20.*multiple of 8"),
    (["--resolution", "1048576"], "--resolution 1048576.*<= 256"),
    (["--num-scans", "-1"], "--num-scans -1"),
    (["--num-scans", "1000000000000"], "--num-scans 1000000000000.*<= 100000"),
    (["--num-val-scans", "0"], "--num-val-scans 0"),
    (["--num-anchors", "0"], "--num-anchors 0"),
    (["--num-anchors", "500", "--pose-pool-clips", "2"], "--num-anchors 500"),
    (["--num-bench-extreme", "-1"], "--num-bench-extreme -1"),
    (["--neighbours", "-1"], "--neighbours -1"),
    (["--neighbours", "1000000000"], "--neighbours 1000000000.*<= 100"),
    (["--pose-pool-clips", "0"], "--pose-pool-clips 0"),
    (["--seed", "-1"], "--seed -1"),
    (["--seed", "99999999999"], "--seed 99999999999"),
    (["--resolution", "256", "--num-scans", "20000"], "renders about .* GB"),
    (["--pose-source", "files", "--pose-files", "x.npz", "--fps", "inf"], "--fps inf"),
    (["--pose-source", "files", "--pose-files", "x.npz", "--fps", "0"], "--fps 0"),
    (["--neighbour-spacing", "0"], "--neighbour-spacing 0"),
    (["--neighbour-spacing", "nan"], "--neighbour-spacing nan"),
    (["--pose-source", "files"], "--pose-files"),
    (["--device", "gpu"], "--device gpu"),
])
def test_prepare_data_flags_have_ranges(tmp_path, flags, expect):
    assert_refused(pd.Args, tmp_path, flags, expect)


@pytest.mark.parametrize("flags, expect", [
    (["--steps", "-5"], "--steps -5"),
    (["--steps", "2000000000000000000"], "--steps 2000000000000000000.*<= 1000000"),
    (["--steps", "0"], "--steps 0.*--init"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--batch-size", "100000"], "--batch-size 100000"),
    (["--lr", "0"], "--lr 0"),
    (["--lr", "nan"], "--lr nan"),
    (["--lr", "5"], "--lr 5"),
    (["--channels", "12", "24"], "--channels 12 24"),
    (["--channels", "8", "100000"], "--channels 8 100000"),
    (["--width", "0"], "--width 0"),
    (["--width", "1e9"], "--width 1000000000"),
    (["--blur", "-1"], "--blur -1"),
    (["--noise", "inf"], "--noise inf"),
    (["--pos-weight", "0"], "--pos-weight 0"),
    (["--mess", "-1"], "--mess -1"),
    (["--mess", "50"], "--mess 50"),
    (["--pose-free", "-0.1"], "--pose-free -0.1"),
    (["--pose-free", "2"], "--pose-free 2"),
    (["--adv-eps", "-1"], "--adv-eps -1"),
    (["--adv-eps", "inf"], "--adv-eps inf"),
    (["--adv-eps", "1", "--adv-steps", "0"], "--adv-steps 0"),
    (["--train-on", "broad", "--num-broad", "0"], "--num-broad 0"),
    (["--train-on", "broad", "--num-broad", "1000000000"], "--num-broad 1000000000"),
    (["--perturb-levels", "-0.1"], "--perturb-levels"),
    (["--perturb-levels", "0.1", "100"], "--perturb-levels"),
    (["--log-every", "0"], "--log-every 0"),
    (["--threads", "-1"], "--threads -1"),
    (["--seed", "-1"], "--seed -1"),
    (["--init", "nothing", "--steps", "0"], "--init"),
])
def test_posescore_flags_have_ranges(tmp_path, flags, expect):
    assert_refused(posescore.TrainArgs, tmp_path, flags, expect)
    message = refusal(posescore.ScoreArgs(views_dir=tmp_path, run_dir=tmp_path, batch_size=0).check)
    assert "--batch-size 0" in message


@pytest.mark.parametrize("flags, expect", [
    (["--steps", "-3"], "--steps -3"),
    (["--steps", "2000000000000000000"], "--steps 2000000000000000000.*<= 1000000"),
    (["--steps", "0"], "--steps 0.*--init"),
    (["--max-minutes", "-1"], "--max-minutes -1.*> 0"),
    (["--max-minutes", "0"], "--max-minutes 0"),
    (["--max-minutes", "nan"], "--max-minutes nan"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--batch-size", "1000000"], "--batch-size 1000000"),
    (["--lr", "-1"], "--lr -1"),
    (["--warmup-steps", "0"], "--warmup-steps 0"),
    (["--heads", "5"], "--heads 5"),
    (["--heads", "1000"], "--heads 1000"),
    (["--attn-levels", "5"], "--attn-levels 5"),
    (["--channels", "64", "128", "100000"], "--channels 64 128 100000"),
    (["--token-dim", "1000000"], "--token-dim 1000000"),
    (["--layers-per-block", "100"], "--layers-per-block 100"),
    (["--num-eval", "-1"], "--num-eval -1"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints 0"),
    (["--cond-drop", "1.5"], "--cond-drop 1.5"),
    (["--grad-clip", "inf"], "--grad-clip inf"),
    (["--ddim-steps", "0"], "--ddim-steps 0"),
    (["--ddim-steps", "5000"], "--ddim-steps 5000"),
    (["--guidance", "-1"], "--guidance -1"),
    (["--guidance", "inf"], "--guidance inf"),
    (["--sheet-subjects", "0"], "--sheet-subjects 0"),
    (["--replay-share", "1.5"], "--replay-share 1.5"),
    (["--ema-decay", "1"], "--ema-decay 1"),
    (["--seed", "-1"], "--seed -1"),
    (["--init", "nothing", "--steps", "0"], "--init"),
    (["--device", "gpu"], "--device gpu"),
])
def test_pretrain_flags_have_ranges(tmp_path, flags, expect):
    assert_refused(pretrain.Args, tmp_path, flags, expect)


@pytest.mark.parametrize("flags, expect", [
    (["--steps", "0"], "--steps 0"),
    (["--steps", "2000000000000000000"], "--steps 2000000000000000000"),
    (["--lora-rank", "-1"], "--lora-rank -1.*0 to fine-tune every"),
    (["--lora-rank", "100000000"], "--lora-rank 100000000.*<= 1024"),
    (["--realism-weight", "-1"], "--realism-weight -1"),
    (["--realism-weight", "nan"], "--realism-weight nan"),
    (["--realism-t-range", "900", "100"], "--realism-t-range 900 100.*ordered"),
    (["--realism-t-range", "-5", "100"], "--realism-t-range -5 100"),
    (["--realism-t-range", "50", "5000"], "--realism-t-range 50 5000"),
    (["--ddim-steps", "3", "--grad-steps", "5"], "--grad-steps 5.*<= 3"),
    (["--ddim-steps", "3", "--early-stop-max", "3"], "--early-stop-max 3.*<= 2"),
    (["--ddim-steps", "0"], "--ddim-steps 0"),
    (["--ddim-steps", "100000"], "--ddim-steps 100000"),
    (["--grad-steps", "0"], "--grad-steps 0"),
    (["--early-stop-max", "-1"], "--early-stop-max -1"),
    (["--kl-weight", "-1"], "--kl-weight -1"),
    (["--kl-weight", "nan"], "--kl-weight nan"),
    (["--perceptual-weight", "-2"], "--perceptual-weight -2"),
    (["--anchor-weight", "-1"], "--anchor-weight -1"),
    (["--max-minutes", "-1"], "--max-minutes -1"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--batch-size", "1000000"], "--batch-size 1000000"),
    (["--warmup-steps", "0"], "--warmup-steps 0"),
    (["--grad-clip", "0"], "--grad-clip 0"),
    (["--lr", "inf"], "--lr inf"),
    (["--guidance", "1e9"], "--guidance 1000000000"),
    (["--num-eval", "-1"], "--num-eval -1"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints 0"),
    (["--seed", "-1"], "--seed -1"),
    (["--reward", "nope"], "--reward nope"),
])
def test_finetune_flags_have_ranges(tmp_path, flags, expect):
    assert_refused(finetune.Args, tmp_path, flags, expect)


@pytest.mark.parametrize("flags, expect", [
    (["--fit-every", "0"], "--fit-every 0"),
    (["--count", "0"], "--count 0"),
    (["--count", "-1"], "--count -1"),
    (["--ddim-steps", "0"], "--ddim-steps 0"),
    (["--ddim-steps", "100000"], "--ddim-steps 100000"),
    (["--fit-steps", "-1"], "--fit-steps -1"),
    (["--fit-steps", "1000000000"], "--fit-steps 1000000000"),
    (["--carve-steps", "-1"], "--carve-steps -1"),
    (["--guidance", "-1"], "--guidance -1"),
    (["--threads", "0"], "--threads 0"),
    (["--seed", "-1"], "--seed -1"),
    (["--view-weights", "1", "1", "1"], "--view-weights"),
    (["--view-weights", "0", "0", "0", "0", "0", "0"], "--view-weights"),
    (["--view-weights", "1", "1", "1", "1", "1", "nan"], "--view-weights"),
    (["--oracle", "--views-from", "."], "--oracle and --views-from"),
    (["--views-from", "nothing"], "--views-from"),
    (["--input", "missing.png"], "--input"),
    (["--device", "gpu"], "--device gpu"),
    (["--judge-count", "0"], "--judge-count 0"),
    (["--judge-count", "1000000000"], "--judge-count 1000000000"),
    (["--judge-sets", "nope"], "--judge-sets nope"),
])
def test_reconstruct_flags_have_ranges(tmp_path, flags, expect):
    assert_refused(rc.Args, tmp_path, flags, expect)


@pytest.mark.parametrize("flags, expect", [
    (["--num-samples", "0"], "--num-samples 0"),
    (["--num-samples", "1000000000"], "--num-samples 1000000000"),
    (["--fscore-cm", "0"], "--fscore-cm 0"),
    (["--fscore-cm", "inf"], "--fscore-cm inf"),
    (["--max-grids", "-1"], "--max-grids -1"),
    (["--judge-count", "0"], "--judge-count 0"),
    (["--judge-count", "1000000000"], "--judge-count 1000000000"),
    (["--judge-sets", "nope"], "--judge-sets nope"),
    (["--seed", "-1"], "--seed -1"),
    (["--models", "base", "base"], "--models base base"),
    (["--models", "../base"], "--models"),
])
def test_evaluate_flags_have_ranges(tmp_path, flags, expect):
    assert_refused(evaluate.Args, tmp_path, flags, expect)


@pytest.mark.parametrize("argv, expect", [
    (["--preset", "huge"], r"invalid choice 'huge' for argument '--preset'.*'demo', 'full'"),
    (["--steps", "abc"], r"--steps"),
    (["--no-such-flag", "3"], r"--no-such-flag"),
])
def test_a_flag_tyro_cannot_parse_is_one_line_and_exit_2(argv, expect, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pretrain.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        plumbing.run_cli(lambda args: pytest.fail("main ran"), pretrain.Args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(expect, err) and "--help" in err and "│" not in err, err


# --- inputs read true --------------------------------------------------------------------------------

def person(height=60, width=40) -> np.ndarray:
    """(H, W, 3) uint8: a red figure, taller than wide, off-centre on a white background."""
    pixels = np.full((height, width, 3), 255, np.uint8)
    pixels[8:52, 6:16] = (200, 40, 40)
    return pixels


def test_a_photo_is_read_upright_by_its_exif_orientation(tmp_path):
    upright = person()
    Image.fromarray(upright).save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored rows must be turned 90 degrees clockwise to view
    Image.fromarray(np.rot90(upright).copy()).save(tmp_path / "phone.jpg", exif=exif, quality=98)
    want = rc.load_image(tmp_path / "upright.png", RES)
    got = rc.load_image(tmp_path / "phone.jpg", RES)
    assert (got - want).abs().max() < 0.1  # JPEG noise only; sideways, the figure lies across the frame


def test_a_16_bit_image_is_scaled_not_clipped_and_a_float_one_refused_for_its_reason(tmp_path):
    grey = person()[..., 1].astype(np.uint16) * 257  # the same picture in 16 bits (0..65535)
    Image.fromarray(grey).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    Image.fromarray(person()[..., 1]).save(tmp_path / "plain.png")
    assert torch.allclose(rc.load_image(tmp_path / "deep.png", RES), rc.load_image(tmp_path / "plain.png", RES),
                          atol=2 / 255)
    Image.fromarray(grey.astype(np.float32) / 65535).save(tmp_path / "float.tiff")
    assert "32-bit float" in refusal(rc.load_image, tmp_path / "float.tiff", RES)


def write_split(folder: Path, name: str, manifest: dict, **arrays) -> Path:
    np.savez(folder / name, **arrays)
    pd.write_json(folder / "manifest.json", dict(manifest, views=list(pd.VIEW_AZIMUTHS), resolution=RES))
    return folder / name


@pytest.mark.parametrize("claim, expect", [
    (dict(count=1000), "count = 1000 does not match the 6"),
    (dict(files={"bench.npz": 9999}), r"files\[bench.npz\] = 9999"),
    (dict(splits={"dynamic": 9999, "extreme": 2}), "splits = 10001"),
    (dict(splits={"dynamic": 2, "extreme": 4}), "splits .* do not match"),
    (dict(count="six"), "count = 'six'"),
])
def test_a_manifest_is_believed_only_when_its_arrays_agree(tmp_path, claim, expect):
    joints = np.zeros((6, 55, 3), np.float32)
    split = np.array(["dynamic"] * 4 + ["extreme"] * 2)
    truth = dict(files={"bench.npz": 6}, count=6, splits={"dynamic": 4, "extreme": 2})
    pd.load_split(write_split(tmp_path, "bench.npz", truth, joints=joints, split=split))
    message = refusal(pd.load_split, write_split(tmp_path, "bench.npz", dict(truth, **claim), joints=joints, split=split))
    assert "manifest.json" in message and re.search(expect, message), message


def test_a_pairs_manifest_claiming_other_anchors_is_refused(tmp_path):
    arrays = dict(joints=np.zeros((6, 55, 3), np.float32), anchor=np.repeat(np.arange(3), 2))
    pd.load_split(write_split(tmp_path, "pairs.npz", dict(files={"pairs.npz": 6}, anchors=3), **arrays))
    message = refusal(pd.load_split, write_split(tmp_path, "pairs.npz", dict(files={"pairs.npz": 6}, anchors=1000),
                                                 **arrays))
    assert "anchors = 1000" in message


def test_motion_angles_beyond_two_turns_are_refused_naming_the_file(tmp_path):
    poses = np.zeros((40, 322), np.float32)
    poses[:, 3:66] = 0.5  # radians: a pose
    np.save(tmp_path / "clip.npy", poses)
    pd.load_motion(tmp_path / "clip.npy", "motionx")
    poses[5, 10] = 1e6
    np.save(tmp_path / "clip.npy", poses)
    message = refusal(pd.load_motion, tmp_path / "clip.npy", "motionx")
    assert "clip.npy" in message and "'body_pose'" in message and "4 pi" in message


def tiny_unet():
    torch.manual_seed(0)
    return pretrain.build_unet(pretrain.unet_config(RES, (8, 16), 1, 1, 2, 16))


def poison(module):
    with torch.no_grad():
        next(p for name, p in module.named_parameters() if name.endswith("weight")).view(-1)[0] = float("nan")
    return module


def test_nan_weights_are_refused_when_loaded(tmp_path):
    record = dict(resolution=RES, num_views=pd.NUM_VIEWS, sampling=dict(num_steps=2, guidance=1.0))
    pretrain.save_model(tmp_path / "base", poison(tiny_unet()), record)
    assert "base: the weights hold NaN or Inf" in refusal(pretrain.load_model, tmp_path / "base")
    poison(posescore.build_gskel(RES, (8, 8))).save_pretrained(tmp_path / "posescore")
    pd.write_json(tmp_path / "posescore" / "posescore_config.json", dict(resolution=RES, width=1.0))
    assert "posescore: the weights hold NaN or Inf" in refusal(posescore.load_gskel, tmp_path / "posescore")


@pytest.mark.parametrize("damage, expect", [
    (dict(step="four"), "step 'four' is not the folder's step number"),
    (dict(step=7), "step 7 is not the folder's step number"),
    (dict(rng="none"), "'rng' is not a list"),
    ("nan weights", "model.safetensors: the weights hold NaN"),
])
def test_a_damaged_checkpoint_state_is_refused_in_one_line(tmp_path, damage, expect):
    unet = tiny_unet()
    optimizer = torch.optim.AdamW(unet.parameters())
    folder = plumbing.save_checkpoint(tmp_path / "ckpt", 2, poison(tiny_unet()) if damage == "nan weights" else unet,
                                      optimizer, ["state"], dict(resume_key={}), keep=2)
    if isinstance(damage, dict):
        state = json.loads((folder / "state.json").read_text())
        (folder / "state.json").write_text(json.dumps(dict(state, **damage)))
    assert expect in refusal(plumbing.load_checkpoint, folder, unet, optimizer, {})


# --- a failing stage leaves nothing that looks finished -----------------------------------------------

def test_a_failing_reconstruction_leaves_no_manifest_json(tmp_path, monkeypatch):
    color = np.full((2, pd.NUM_VIEWS, 3, RES, RES), 255, np.uint8)
    (tmp_path / "data" / "bench").mkdir(parents=True)
    write_split(tmp_path / "data" / "bench", "bench.npz", dict(files={"bench.npz": 2}), image=color[:, 0], color=color,
                normal=color, joints=np.zeros((2, 55, 3), np.float32))
    monkeypatch.setattr(rc, "load_body_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(rc, "Proxy", lambda body: None)
    monkeypatch.setattr(rc, "SubsetSkinner", lambda body: None)

    def fails(*args, **kwargs):
        raise pd.UserError("the fit stopped")

    monkeypatch.setattr(rc, "reconstruct_sample", fails)
    with pytest.raises(pd.UserError, match="the fit stopped"):
        rc.main(rc.Args(run_dir=tmp_path, oracle=True, skeleton="ideal", fit_every=1))
    out = tmp_path / "recon" / "oracle"
    assert not (out / "manifest.json").exists()  # nothing says "done"
    partial = json.loads((out / rc.PARTIAL_MANIFEST).read_text())
    assert partial["complete"] is False and plumbing.folder_stage(out) == "reconstruct"
    with pytest.raises(pd.UserError, match="made differently"):  # its recipe still guards a re-run
        rc.main(rc.Args(run_dir=tmp_path, oracle=True, skeleton="ideal", fit_every=1, seed=4))


# --- a run records what made it ---------------------------------------------------------------------

def test_each_model_config_records_seed_flags_and_code_version(tmp_path, monkeypatch):
    count = 4
    rng = np.random.default_rng(0)
    pd.save_npz(tmp_path / "data/drpose/pairs.npz", image=rng.integers(0, 256, (count, 3, RES, RES), dtype=np.uint8),
                joints=rng.normal(0, 0.3, (count, 55, 3)).astype(np.float32))
    pd.write_json(tmp_path / "data/drpose/manifest.json", dict(files={"pairs.npz": count}, resolution=RES,
                                                               views=list(pd.VIEW_AZIMUTHS)))
    base_args = pretrain.Args(run_dir=tmp_path, seed=3).resolved()
    record = pretrain.model_record(RES, pretrain.LatentCodec(), base_args, 0)
    pretrain.save_model(tmp_path / "base", tiny_unet(), dict(record, sampling=dict(num_steps=2, guidance=1.0)))
    assert record["stage"] == "pretrain" and record["run"]["seed"] == 3 and record["train_args"]["seed"] == 3
    monkeypatch.setitem(posescore.REWARDS, "mean", lambda views, batch, ctx: (views.mean((1, 2, 3, 4)), {}))
    monkeypatch.setattr(posescore, "load_reward_context", lambda *args, **kwargs: SimpleNamespace(resolution=RES))
    configs = []
    for seed in (0, 1):
        out = finetune.drpose(finetune.Args(
            run_dir=tmp_path, out=tmp_path / f"drpose_{seed}", reward="mean", steps=1, batch_size=2, lr=1e-3,
            lora_rank=2, ddim_steps=2, grad_steps=1, early_stop_max=0, num_eval=0, seed=seed, device="cpu"))
        configs.append(json.loads((out / pretrain.CONFIG_NAME).read_text()))
        assert plumbing.folder_stage(out) == "finetune"
    for seed, config in enumerate(configs):
        assert config["stage"] == "finetune" and config["run"]["seed"] == seed == config["drpose"]["seed"]
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", config["run"]["code"]) and config["run"]["started"]
    assert configs[0]["run"]["code"] == plumbing.code_version() and configs[0]["drpose"] != configs[1]["drpose"]
