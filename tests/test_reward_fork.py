"""Forking a reward from the README alone: a reward's first call is checked everywhere a reward runs, so a
malformed or detached one ends in one line before any work; `posescore.py check-reward` runs the README's
tests on GT renders; the helpers beside the signature (soft mask, views by azimuth, the batch's keys) do
what the README says; the README's example runs verbatim and passes; the hacking gate forks cleanly.

One tiny run folder (16 px data made by prepare_data, a random g_skel as posescore/ and pose_reader/, a
random 2-step base/) is built once; nothing here trains.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune
import plumbing
import posescore as ps
import prepare_data as pd
import pretrain
from test_reliability import folder_hashes

ROOT = Path(__file__).resolve().parents[1]
RES = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fork") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pd.main(pd.Args(run_dir=root, resolution=RES, num_scans=4, num_val_scans=6, num_anchors=2, neighbours=1,
                        num_bench_dynamic=2, num_bench_extreme=1, pose_pool_clips=2, ceiling=False))
    finally:
        torch.set_num_threads(threads)
    for name in ("posescore", "pose_reader"):
        torch.manual_seed(0)
        ps.build_gskel(RES, (16, 32)).save_pretrained(root / name)  # 2 channels a group: the view label shows
        pd.write_json(root / name / "posescore_config.json", dict(stage="posescore", resolution=RES, width=1.0))
    torch.manual_seed(0)
    unet = pretrain.build_unet(pretrain.unet_config(RES, (16, 32), 1, 1, 2, 16))
    pretrain.save_model(root / "base", unet, dict(resolution=RES, num_views=pd.NUM_VIEWS, scheduler=pretrain.SCHEDULER,
                                                  sampling=dict(sampler="ddim", num_steps=2, guidance=1.0)))
    return root


def readme_reward() -> str:
    """The README's example reward, verbatim: the first python block of its reward section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Writing a new reward"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


# The mistakes a forker made following the README, and the detached reward that trained silently.
MISTAKES = '''
import torch


def plain_float(views, batch, ctx):
    return 0.5


def float_in_pair(views, batch, ctx):
    return 0.5, {"ink": 0.5}


def without_ctx(views, batch):
    return views.mean((1, 2, 3, 4)), {}


def zero_dim_from_float(views, batch, ctx):
    return torch.tensor(float(views.mean())), {}


def detached(views, batch, ctx):
    return torch.tensor(views.mean().item()).repeat(len(views)), {}


def parts_not_per_subject(views, batch, ctx):
    rewards = views.mean((1, 2, 3, 4))
    return rewards, {"mean": rewards.mean()}
'''
EXPECTED = {"plain_float": "returned a float;", "float_in_pair": "returned rewards as a float;",
            "without_ctx": "without_ctx(views, batch) cannot be called as",
            "zero_dim_from_float": "returned rewards as a float32 tensor of shape ();",
            "detached": "returned rewards with no gradient path to the views",
            "parts_not_per_subject": "returned parts 'mean': a float32 tensor of shape ();"}
CLI_MISTAKES = ("plain_float", "float_in_pair", "without_ctx", "zero_dim_from_float", "detached")


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "bad_rewards.py"
    path.write_text(MISTAKES)
    return path


def in_process(main_fn, args_type, argv: list[str], capsys) -> tuple[int, str, str]:
    """A stage's CLI entry point (plumbing.run_cli) in this process: exit status, stdout, stderr."""
    old, sys.argv = sys.argv, ["script.py", *argv]
    try:
        plumbing.run_cli(main_fn, args_type)
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return status, out.out, out.err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if not line.startswith("WARNING")]  # smplx's shape-count notice
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --- the first call, checked -----------------------------------------------------------------------

def test_check_reward_refuses_each_malformed_output_naming_function_output_and_signature(run, mistakes):
    ctx = ps.load_reward_context(run / "posescore")
    data = ps.load_view_latents(run / "data/bench/bench.npz")
    views, batch = data["latents"][:2].requires_grad_(True), {k: v[:2] for k, v in data["batch"].items()}
    for name, expected in EXPECTED.items():
        spec = f"{mistakes}:{name}"
        with pytest.raises(pd.UserError) as err:
            fn = ps.resolve_reward(spec)  # a wrong signature is refused here, when --reward is read
            ps.check_reward(fn, spec, views, batch, ctx)
        message = str(err.value)
        assert expected in message and f"--reward {spec}" in message and "\n" not in message, message
        assert ps.REWARD_SIGNATURE in message
    # a function handed over directly: the wrong signature shows at the call, and is refused the same way
    with pytest.raises(pd.UserError, match="cannot be called as fn\\(views, batch, ctx\\)"):
        ps.check_reward(ps._import_reward(f"{mistakes}:without_ctx"), "without_ctx", views, batch, ctx)
    # non-finite rewards on the first batch, and a good reward passes through with its output
    nan = lambda v, b, c: (v.mean((1, 2, 3, 4)) / 0 * 0, {})  # noqa: E731
    with pytest.raises(pd.UserError, match="non-finite rewards"):
        ps.check_reward(nan, "nan", views, batch, ctx)
    rewards, parts = ps.check_reward(ps.posescore_reward, "posescore", views, batch, ctx)
    assert torch.equal(rewards, ps.posescore_reward(views, batch, ctx)[0]) and "view_000" in parts
    # the same detached reward passes where no gradient is asked (views without grad, as in `score`'s loop)
    ps.check_reward(ps.resolve_reward(f"{mistakes}:detached"), "detached", views.detach(), batch, ctx)


@pytest.mark.parametrize("name", CLI_MISTAKES)
def test_finetune_refuses_each_mistake_in_one_line_before_base_evaluation_and_training(name, run, mistakes, capsys,
                                                                                       monkeypatch):
    evaluated = []
    monkeypatch.setattr(finetune, "eval_reward", lambda *a, **k: evaluated.append(1) or 0.0)
    before = folder_hashes(run)
    status, _, err = in_process(finetune.main, finetune.Args, [
        "--run-dir", str(run), "--reward", f"{mistakes}:{name}", "--steps", "2", "--batch-size", "2",
        "--lora-rank", "2", "--num-eval", "2", "--device", "cpu"], capsys)
    assert status == 2 and EXPECTED[name] in one_line(err)
    assert not evaluated  # refused before the base evaluation
    assert folder_hashes(run) == before and not (run / "drpose").exists() and not (run / "drpose_ckpt").exists()


def test_finetune_cli_refuses_a_plain_float_reward_in_a_real_process(run, mistakes):
    proc = subprocess.run([sys.executable, "finetune.py", "--run-dir", str(run), "--reward", f"{mistakes}:plain_float",
                           "--steps", "2", "--batch-size", "2", "--lora-rank", "2", "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and EXPECTED["plain_float"] in one_line(proc.stderr)
    assert "Traceback" not in proc.stderr and not (run / "drpose").exists()


@pytest.mark.parametrize("name", CLI_MISTAKES)
def test_score_refuses_each_mistake_in_one_line(name, run, mistakes, capsys):
    status, out, err = in_process(ps.main, ps.Command, [
        "score", "--views-dir", str(run / "data/bench/bench.npz"), "--run-dir", str(run),
        "--reward", f"{mistakes}:{name}"], capsys)
    assert status == 2 and EXPECTED[name] in one_line(err) and "mean" not in out


# --- check-reward: the README's tests of a reward --------------------------------------------------

def test_the_readmes_example_runs_verbatim_on_side_views_and_soft_mask_and_passes_check_reward(run, tmp_path,
                                                                                                capsys):
    code = readme_reward()
    assert "posescore.soft_views_mask(" in code and "posescore.select_views(views, posescore.SIDE_AZIMUTHS)" in code
    path = tmp_path / "my_rewards.py"
    path.write_text(code)
    spec = f"{path}:bones_inked"
    reward = ps.resolve_reward(spec)
    ctx = ps.load_reward_context(run / "posescore")
    data = ps.load_view_latents(run / "data/scans/val.npz")
    views = data["latents"][:2].clone().requires_grad_(True)
    rewards, parts = reward(views, {k: v[:2] for k, v in data["batch"].items()}, ctx)
    (grad,) = torch.autograd.grad(rewards.sum(), views)
    assert grad[:, 0].abs().sum() == 0 and grad[:, 1:].abs().sum() > 0  # the side views only
    assert grad[:, :, :3].abs().sum() == 0  # the soft mask reads the normals, not the colour
    assert set(parts) == {"covered", "stray"}

    status, out, _ = in_process(ps.main, ps.Command, ["check-reward", "--reward", spec, "--run-dir", str(run),
                                                      "--count", "6"], capsys)
    lines = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert status == 0 and len(lines) == 3 and all(line.startswith("PASS ") for line in lines), out


class DoubledGradient(torch.autograd.Function):
    """The identity whose backward doubles the gradient: autograd that disagrees with the function."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def side_ink(views, batch, ctx):  # blind to the pose: how much figure the side views draw
    return ps.soft_views_mask(views[:, 1:]).mean((1, 2, 3)), {}


def wrong_gradient(views, batch, ctx):
    rewards = ps.posescore_reward(DoubledGradient.apply(views), batch, ctx)[0]
    return rewards, {}


def batch_normalised(views, batch, ctx):  # each subject's reward depends on the others in its batch
    rewards = -ps.keypoints_reward(views, batch, ctx)[0]
    return rewards - rewards.mean(), {}


@pytest.mark.parametrize("reward, failing", [(side_ink, "ranks the true pose higher"),
                                             (wrong_gradient, "gradients match finite differences"),
                                             (batch_normalised, "batched equals looped")])
def test_check_reward_fails_the_reward_that_breaks_each_test(reward, failing, run, capsys, monkeypatch):
    monkeypatch.setitem(ps.REWARDS, reward.__name__, reward)
    status, out, _ = in_process(ps.main, ps.Command, ["check-reward", "--reward", reward.__name__, "--run-dir",
                                                      str(run), "--count", "6"], capsys)
    assert status == 1, out
    assert f"FAIL {failing}:" in out, out
    if reward is wrong_gradient:  # a factor of two: a relative gap of 1/2 between the two derivatives
        assert "worst relative gap 5.0e-01" in out


def test_check_reward_refuses_bad_flags_and_malformed_rewards_in_one_line(run, mistakes, capsys):
    for argv, expected in [(["--count", "1"], "--count 1 is out of range"),
                           (["--levels", "0"], "--levels 0.0: pass one or more noise levels"),
                           (["--reward", f"{mistakes}:detached"], EXPECTED["detached"])]:
        status, out, err = in_process(ps.main, ps.Command, ["check-reward", "--run-dir", str(run), *argv], capsys)
        assert status == 2 and expected in one_line(err) and "PASS" not in out


# --- the helpers beside the signature ---------------------------------------------------------------

def test_soft_views_mask_is_views_mask_with_a_gradient(run):
    views = ps.load_view_latents(run / "data/scans/val.npz")["latents"]  # (N, V, 6, H, W) GT renders
    soft, hard = ps.soft_views_mask(views), pd.views_mask(views)
    assert torch.equal((soft > 0.5).float(), hard)  # the same threshold
    assert soft[hard == 0].max() <= 0.5 and soft[hard == 1].mean() > 0.9
    rendered = torch.from_numpy(pd.load_split(run / "data/scans/val.npz")["mask"]).float()  # (N, V, H, W)
    colour_ink = (1 - views[:, :, :3].mean(2)) / 2  # what the README's earlier example measured the figure with
    share = lambda m: ((m * rendered).sum() / rendered.sum()).item()  # noqa: E731
    assert share(soft) > 0.85 and share(soft) > share(colour_ink) + 0.2
    # the gradient: through the normal channels only, and equal to finite differences (float64) wherever the
    # smallest normal channel is unique (no exact 8-bit ties: generated views have none)
    jitter = 0.01 * torch.randn(views[:2].shape, generator=torch.Generator().manual_seed(2))
    x = (views[:2] + jitter).double().requires_grad_(True)
    weights = torch.rand(x.shape[:2] + x.shape[3:], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (grad,) = torch.autograd.grad((ps.soft_views_mask(x) * weights).sum(), x)
    assert grad[:, :, :3].abs().sum() == 0 and grad[:, :, 3:].abs().sum() > 0
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        plus, minus = ((ps.soft_views_mask(x + s * 1e-7 * direction) * weights).sum() for s in (1, -1))
    assert torch.allclose((plus - minus) / 2e-7, (grad * direction).sum(), rtol=1e-4)


def test_select_views_keeps_gskel_view_labels(run):
    ctx = ps.load_reward_context(run / "posescore")
    views = ps.load_view_latents(run / "data/scans/val.npz")["latents"][:2]
    sides, view_ids = ps.select_views(views, (90, 270))
    assert view_ids.tolist() == [2, 4] and torch.equal(sides, views[:, [2, 4]])
    full = ps.gskel_logits(ctx.gskel, views)  # (B, 6, K, H, W)
    assert torch.allclose(ps.gskel_logits(ctx.gskel, sides, view_ids=view_ids), full[:, [2, 4]], atol=1e-6)
    # labels by position would read the left and right sides as the front and the 45-degree view: other maps
    assert (ps.gskel_logits(ctx.gskel, sides, view_ids=torch.tensor([0, 1])) - full[:, [2, 4]]).abs().max() > 1e-3
    with pytest.raises(pd.UserError, match="2 views and no view_ids"):
        ps.gskel_logits(ctx.gskel, sides)  # a slice without its ids is refused, not read with wrong labels
    with pytest.raises(pd.UserError, match="azimuths \\[30\\] must be one or more of VIEW_AZIMUTHS"):
        ps.select_views(views, (30,))
    assert ps.select_views(views)[1].tolist() == [1, 2, 3, 4, 5]  # SIDE_AZIMUTHS: all but the front


@pytest.mark.parametrize("rows, file", [("pairs", "data/drpose/pairs.npz"), ("bench", "data/bench/bench.npz")])
def test_batch_keys_are_the_keys_shapes_and_dtypes_a_reward_gets_from_a_prepared_run(rows, file, run):
    arrays = pd.load_split(run / file)
    batch = ps.reward_batch(arrays, [1, 0])  # two rows, as a step takes them
    expected = ps.batch_keys(rows)
    assert set(batch) == set(expected), (rows, set(batch) ^ set(expected))
    sizes = {"B": 2, "H": RES, "W": RES}
    for key, (shape, dtype) in expected.items():
        assert tuple(batch[key].shape) == tuple(sizes.get(n, n) for n in shape) and batch[key].dtype == dtype, key
    # the held-out scans' rows (check-reward's) have every key the two share, the image their front view
    arrays = pd.load_split(run / "data/scans/val.npz")
    scans = ps.reward_batch(arrays)
    assert set(scans) == set(ps.batch_keys("pairs")) - {"anchor"}
    assert torch.equal(scans["image"], torch.from_numpy(arrays["color"][:, 0]).float() / 255)


def test_the_readmes_batch_table_is_batch_keys():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| key | shape, dtype | what | rows |"):].split("\n\n")[0].splitlines()[2:]
    rows = {}
    for line in table:
        key, shape_dtype, _, which = (cell.strip() for cell in line.strip("|").split("|"))
        rows[key.strip("`")] = (shape_dtype, which)
    assert list(rows) == list(ps.BATCH_KEYS)
    for key, (shape, dtype, _, which) in ps.BATCH_KEYS.items():
        written = "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ") " + \
            str(dtype).removeprefix("torch.")
        assert rows[key] == (written, {"both": "pairs, bench", "pairs": "pairs", "bench": "bench"}[which]), key


# --- the hacking gate -------------------------------------------------------------------------------

def load_gate():
    spec = importlib.util.spec_from_file_location("reward_probe", ROOT / "bench" / "reward_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gate_reads_views_from_an_npz_and_writes_under_the_run_folder(run, tmp_path, capsys):
    gate = load_gate()
    bench = ps.load_view_latents(run / "data/bench/bench.npz")
    noise = torch.randn(bench["latents"].shape, generator=torch.Generator().manual_seed(0))
    views = (bench["latents"] + 0.3 * noise).clamp(-1, 1)  # (N, 6, 6, H, W): "generated" views
    np.savez(tmp_path / "views.npz", latents=views.numpy())
    results = sorted((ROOT / "bench" / "results").iterdir())
    gate.main(["--run-dir", str(run), "--views", str(tmp_path / "views.npz"), "--steps", "1", "--log-every", "1"])
    out = run / "gate" / "reward_gate_posescore.json"
    record = json.loads(out.read_text())
    assert record["subjects"] == len(views) and sorted((ROOT / "bench" / "results").iterdir()) == results
    ctx = ps.load_reward_context(run / "posescore")
    expected = ps.posescore_reward(views, bench["batch"], ctx)[0].mean().item()  # the npz's views were scored
    assert record["probes"]["base views"]["reward"] == pytest.approx(expected, abs=1e-5)
    assert f"wrote {out}" in capsys.readouterr().out


def test_gate_refusals_are_one_line_naming_the_fix(run, mistakes, tmp_path, capsys):
    gate = load_gate()
    np.savez(tmp_path / "one.npz", latents=np.zeros((1, pd.NUM_VIEWS, 6, RES, RES), np.float32))
    for argv, expected in [(["--count", "1"], "--count 1: the swap probe"),
                           (["--views", str(tmp_path / "one.npz")], "the gate needs views of 2 or more bench subjects"),
                           (["--views", str(tmp_path / "views.npz")], "views.npz is missing"),
                           (["--reward", f"{mistakes}:without_ctx"], EXPECTED["without_ctx"]),
                           (["--reward", f"{mistakes}:detached", "--views", str(tmp_path / "zero.npz")],
                            EXPECTED["detached"])]:
        np.savez(tmp_path / "zero.npz", latents=np.zeros((3, pd.NUM_VIEWS, 6, RES, RES), np.float32))
        with pytest.raises(SystemExit) as exit_:
            with plumbing.one_line_errors():
                gate.main(["--run-dir", str(run), *argv])
        assert exit_.value.code == 2 and expected in one_line(capsys.readouterr().err), argv
    assert not (run / "gate" / "reward_gate_bad_rewards.py_detached.json").exists()
    # the script itself, without recon/base: one line naming the command that makes it, and --views
    proc = subprocess.run([sys.executable, "bench/reward_probe.py", "--run-dir", str(run)], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = one_line(proc.stderr)
    assert proc.returncode == 2 and f"`python reconstruct.py --run-dir {run} --model base`" in line
    assert "--views FILE.npz" in line


def test_the_gates_docs_name_only_flags_it_has():
    flags = {flag for action in load_gate().build_parser()._actions for flag in action.option_strings}
    texts = [(ROOT / "bench/results/reward_probe.md").read_text(), (ROOT / "docs/results.md").read_text(),
             (ROOT / "README.md").read_text(), (ROOT / "bench/reward_probe.py").read_text()]
    commands = [c for t in texts for c in re.findall(r"python bench/reward_probe\.py[^`\n]*", t)]
    assert len(commands) >= 8
    for command in commands:
        for flag in re.findall(r"(--[a-z][a-z-]*)", command):
            assert flag in flags, f"{flag} in `{command}`"


def test_gate_passes_only_where_every_reader_closes_40_percent_on_every_split():
    """The verdict is read at the first step whose reward reaches the GT renders' value: every reader on every
    bench split must have closed 40% of the base -> GT gap in judged error there; the last step is reported."""
    gate = load_gate()
    readers, splits = ("pose_reader", "pose_reader2"), {"all": None, "dynamic": None, "extreme": None}
    flat = lambda v: {f"judged_{r}_{s}": v for r in readers for s in splits}  # noqa: E731
    table = {"base views": flat(5.0), "GT renders": flat(1.0)}
    log = [dict(step=0, reached_gt=False, **flat(5.0)), dict(step=10, reached_gt=True, **flat(3.0)),
           dict(step=20, reached_gt=True, **flat(1.0))]
    result = gate.verdict(log, table, readers, splits)
    assert result["judged_at_step"] == 10 and result["passes"]  # 50% everywhere at step 10
    assert result["gap_closed"]["pose_reader2_extreme"] == pytest.approx(0.5)
    assert result["gap_closed_last_step"]["pose_reader_dynamic"] == pytest.approx(1.0)
    log[1]["judged_pose_reader2_extreme"] = 3.6  # the second reader closes 35% on extreme: no pass
    assert not gate.verdict(log, table, readers, splits)["passes"]
    log[1]["judged_pose_reader2_extreme"] = 3.0
    log[1]["judged_pose_reader_all"] = 4.9  # "all" is not a split of its own: it does not decide
    assert gate.verdict(log, table, readers, splits)["passes"]
    never = [dict(line, reached_gt=False) for line in log]  # the reward never reaches GT: judged at the last step
    assert gate.verdict(never, table, readers, splits)["judged_at_step"] == 20
