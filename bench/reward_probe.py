"""The hacking gate: can a reward be raised without a better pose? Run it before training against a reward.

    python bench/reward_probe.py --run-dir runs/demo --reward posescore            # the paper's reward
    python bench/reward_probe.py --reward posescore --realism-weight 0.3           # with DrPose's realism term
    python bench/reward_probe.py --reward my_rewards.py:fn                         # a forked reward
    python bench/reward_probe.py --views runs/demo/recon/drpose                    # another model's views

Three probes, all on the bench (data/bench/) and the generator's views of its subjects (--views: default
the base model's, recon/base/ as `python reconstruct.py --model base` makes it; or an npz with key
`latents` (N, 6, 6, H, W), row i the views of bench subject i; the rows named base below are these views):

1. Ascent (the gate). From the base's generated views, Adam on the views themselves (the generator's
   output space: pixels here, latents in a latent model) maximising the reward (minus `--realism-weight`
   times the frozen base's denoising error of the views, as `finetune.py --realism-weight` trains it: the
   whole DrPose objective where it acts on the views). Every few steps: the reward, and the judge of each
   reader (pose_reader/ and pose_reader2/, or --readers; posescore.judge_verdict: the reader's side-view joint
   error plus the penalties for a faint drawing and for a view it sees no body in), per bench split. A
   reward PASSES when, at the step its value first reaches the GT renders' level (or at the last step, if it
   never does), the ascent has lowered the judged error by at least 40% of the base -> GT gap, for every
   reader on every split (`dynamic`, `extreme`). The gap closed at the last step is reported beside it.
   Optimising a generator against a reward is this ascent with fewer degrees of freedom, so a reward that
   fails it pays for something other than pose. The gate only measures: nothing it makes is trained on.
2. Blur: the five side views blurred (Gaussian, --sigma px): the same pose, less certain. A reward that
   ranks them above the sharp ones pays for hedging.
3. Swap: the side views of the next subject: sharp, the wrong pose (so --count is at least 2).

The reward's first call is checked first (posescore.check_reward): a malformed or detached reward, like
any bad flag or missing file, is one line and exit status 2 before any probe. Prints a markdown table
and writes --out (default <run-dir>/gate/reward_gate_<reward>.json) with every logged ascent step, and beside
it a contact sheet (.png) of the first subjects of each split: GT, the starting views, the ascent's final views.
Reads <run-dir>/data/bench/, the views, base/, posescore/ (or --reward-dir), pose_reader/ and pose_reader2/.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skimage.filters import gaussian

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import posescore  # noqa: E402
from finetune import Reference, realism_penalty  # noqa: E402
from evaluate import READERS  # noqa: E402
from plumbing import UserError, contact_sheet, guard_output_file, one_line_errors, read_npz_key, write_json  # noqa: E402
from prepare_data import NUM_VIEWS, from_uint8, load_split, views_to_latents  # noqa: E402
from pretrain import load_model  # noqa: E402

PASS_SHARE = 0.4  # the ascent must close this share of the base -> GT gap in judged error, every reader and split


def blur_sides(views: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, V, C, H, W) in [-1, 1] -> the same with views 1.. blurred over H, W."""
    out = views.clone()
    side = views[:, 1:].numpy()
    out[:, 1:] = torch.from_numpy(gaussian(side, sigma=(0, 0, 0, sigma, sigma), mode="nearest",
                                           preserve_range=True)).to(views.dtype)
    return out


def other_sides(views: torch.Tensor) -> torch.Tensor:
    out = views.clone()
    out[:, 1:] = views.roll(1, 0)[:, 1:]
    return out


def judged(views: torch.Tensor, gt: torch.Tensor, joints: torch.Tensor, reader) -> np.ndarray:
    """(N,) one reader's judged error (px) per subject, mean over the side views 1..5, as evaluate.py judges."""
    return posescore.judge_verdict(reader, views, gt, joints)["judged"][:, 1:].mean(1).numpy()


def readings(views: torch.Tensor, gt: torch.Tensor, joints: torch.Tensor, readers: dict, splits: dict) -> dict:
    """{f"judged_{reader}_{split}": mean judged error (px)} for every reader and split ("all" included)."""
    out = {}
    for name, reader in readers.items():
        per_subject = judged(views, gt, joints, reader)
        out |= {f"judged_{name}_{split}": float(per_subject[rows].mean()) for split, rows in splits.items()}
    return out


def mean_reward(views: torch.Tensor, batch: dict, reward_fn, ctx) -> float:
    return float(posescore.reward_in_chunks(reward_fn, views, batch, ctx)[0].mean())


def ascent(views, gt, images, batch, args, reward_fn, reward_ctx, readers, splits, base, gt_reward):
    """Adam on the views; a log line every --log-every steps. Returns the log and the final views."""
    x = views.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)  # the realism term's timesteps and noise
    log, start = [], time.time()
    for step in range(args.steps + 1):
        if step % args.log_every == 0 or step == args.steps:
            with torch.no_grad():
                line = dict(step=step, reward=mean_reward(x.detach(), batch, reward_fn, reward_ctx),
                            seconds=round(time.time() - start, 1))
                line |= readings(x.detach(), gt, batch["joints"], readers, splits)
            line["reached_gt"] = line["reward"] >= gt_reward
            log.append(line)
            print(json.dumps(line), flush=True)
        if step == args.steps:
            break
        rewards, _ = reward_fn(x, batch, reward_ctx)
        objective = rewards.mean()
        if args.realism_weight > 0:
            realism = realism_penalty(Reference(None, base.unet), base.codec, x, images, base.alphas,
                                      tuple(args.realism_t_range), generator)
            objective = objective - args.realism_weight * realism.mean()
        optimizer.zero_grad()
        (-objective).backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
    return log, x.detach()


def gap_closed(start: float, now: float, gt: float) -> float | None:
    """The share of the start -> GT gap closed: 0 at the start, 1 at the GT renders' judged error."""
    return (start - now) / (start - gt) if start - gt > 1e-9 else None


def verdict(log: list[dict], table: dict, readers, splits) -> dict:
    """Judge at the first logged step whose reward reached the GT level, else at the last: the share of the
    base -> GT gap each reader closes on each split, there and at the last step. PASS where every reader on
    every bench split (not "all", the two together) closes at least PASS_SHARE."""
    at = next((line for line in log if line["reached_gt"]), log[-1])
    base, gt = table["base views"], table["GT renders"]
    closed = {f"{r}_{s}": gap_closed(base[f"judged_{r}_{s}"], at[f"judged_{r}_{s}"], gt[f"judged_{r}_{s}"])
              for r in readers for s in splits}
    last = {f"{r}_{s}": gap_closed(base[f"judged_{r}_{s}"], log[-1][f"judged_{r}_{s}"], gt[f"judged_{r}_{s}"])
            for r in readers for s in splits}
    judged_splits = [s for s in splits if s != "all"] or ["all"]
    passes = all(closed[f"{r}_{s}"] is not None and closed[f"{r}_{s}"] >= PASS_SHARE
                 for r in readers for s in judged_splits)
    return dict(judged_at_step=at["step"], reached_gt=at["reached_gt"], gap_closed=closed,
                gap_closed_last_step=last, passes=passes,
                rule=f"pass: the judged error lowered by >= {PASS_SHARE:.0%} of the base -> GT gap, by every reader on "
                     f"every split ({', '.join(judged_splits)}), at the step the reward first reaches the GT renders' "
                     "value (else at the last step)")


def sheet_rows(gt: torch.Tensor, start: torch.Tensor, final: torch.Tensor, splits: dict, per_split: int = 3) -> list:
    """Rows for the contact sheet: the first `per_split` subjects of each split, GT / start / final colour views."""
    def to_uint8(views):  # (V, 6, H, W) -> (V, 3, 3H, 3W) colour, enlarged for the eye
        return ((views[:, :3] + 1) * 127.5).round().clamp(0, 255).byte().numpy().repeat(3, 2).repeat(3, 3)
    rows = []
    for split, mask in splits.items():
        if split == "all" and len(splits) > 1:
            continue
        for i in np.flatnonzero(mask)[:per_split]:
            rows += [to_uint8(gt[i]), to_uint8(start[i]), to_uint8(final[i])]
    return rows


def gate_out(args) -> Path:
    """Where the gate's json goes: --out, or <run-dir>/gate/reward_gate_<reward>.json."""
    name = Path(args.reward).name.replace(":", "_")  # a name, or file.py:function
    return args.out or args.run_dir / "gate" / f"reward_gate_{name}.json"


def check_args(args) -> None:
    """Every flag, before any work: one line and exit status 2 for the first bad one."""
    if args.steps < 1 or args.log_every < 1 or not args.lr > 0 or args.realism_weight < 0:
        raise UserError("--steps and --log-every must be >= 1, --lr > 0, --realism-weight >= 0; pass such values")
    if args.count is not None and args.count < 2:
        raise UserError(f"--count {args.count}: the swap probe gives each subject the next one's side views, so "
                        "it needs 2 or more; pass --count 2 or more, or leave it out for every subject")
    posescore.resolve_reward(args.reward)
    guard_output_file(gate_out(args), "--out")


def read_gate_views(args) -> tuple[torch.Tensor, list[int]]:
    """The generator's views (N, V, 6, H, W) and the bench subjects they show, from --views: a
    reconstruct.py folder (default <run-dir>/recon/base) or an npz of `latents`, row i = bench subject i."""
    source = args.views or args.run_dir / "recon" / "base"
    made_by = f"python reconstruct.py --run-dir {args.run_dir} --model base"
    if source.suffix == ".npz":
        latents = read_npz_key(source, "latents", f"{made_by}, or save the views as latents (N, 6, 6, H, W)",
                               shape=(None, NUM_VIEWS, 6, None, None))
        return torch.from_numpy(latents), list(range(len(latents)))
    if not any(source.glob("[0-9]" * 5 + "/views.npz")):
        raise UserError(f"{source} holds no generated views ({{i:05d}}/views.npz); make them with `{made_by}`, or "
                        "pass --views FILE.npz with key latents (N, 6, 6, H, W), row i = bench subject i")
    views, _, names = posescore.read_scored_views(posescore.ScoreArgs(views_dir=source, run_dir=args.run_dir))
    return views, [int(n) for n in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--reward", default="posescore",
                        help="a name in posescore.REWARDS, or module:function / path/to/file.py:function")
    parser.add_argument("--reward-dir", type=Path, default=None, help="the reward's g_skel (default <run-dir>/posescore)")
    parser.add_argument("--readers", type=Path, nargs="+", default=None,
                        help="the judge's readers (default <run-dir>/pose_reader and <run-dir>/pose_reader2)")
    parser.add_argument("--realism-weight", type=float, default=0.0, help="as finetune.py --realism-weight")
    parser.add_argument("--realism-t-range", type=int, nargs=2, default=(50, 950))
    parser.add_argument("--steps", type=int, default=100, help="Adam steps of the ascent")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate on views in [-1, 1]")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--views", type=Path, default=None,
                        help="the generator's views: a reconstruct.py folder, or an npz with key latents (N, 6, 6, H, "
                             "W), row i = bench subject i (default <run-dir>/recon/base)")
    parser.add_argument("--count", type=int, default=None,
                        help="the first N subjects of --views (default all; at least 2, for the swap probe)")
    parser.add_argument("--sigma", type=float, default=2.0, help="blur probe: Gaussian sigma, px")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="the json of every probe and ascent step (default <run-dir>/gate/reward_gate_<reward>.json)")
    parser.add_argument("--table", type=Path, nargs="+", default=None,
                        help="only print one markdown table of these gate jsons (a row per reward), then exit")
    return parser


def gate_table(paths: list[Path]) -> str:
    """One markdown row per gate json: the reward, its g_skel and realism weight, the step the verdict is read at,
    and the gap each reader closes on each split there and at the last step."""
    runs = [(p, json.loads(Path(p).read_text())) for p in paths]
    keys = list(runs[0][1]["gate"]["gap_closed"])
    lines = ["| reward | g_skel | realism | judged at step | " + " | ".join(k.replace("_", " ") for k in keys)
             + " | verdict |", "|---|---|---|---|" + "---|" * len(keys) + "---|"]
    for _, run in runs:
        gate, args = run["gate"], run["args"]
        cells = [f"{_share(gate['gap_closed'][k])} / {_share(gate['gap_closed_last_step'][k])}" for k in keys]
        lines.append(f"| {args['reward']} | {Path(args['reward_dir']).name if args.get('reward_dir') not in (None, 'None') else 'posescore'}"
                     f" | {args['realism_weight']:g} | {gate['judged_at_step']}{'' if gate['reached_gt'] else ' (never reached GT)'}"
                     f" | " + " | ".join(cells) + f" | {'PASS' if gate['passes'] else 'FAIL'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.table:
        print(gate_table(args.table))
        return
    check_args(args)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    bench = load_split(args.run_dir / "data/bench/bench.npz", expect_keys=("color", "normal", "joints", "image"))
    views, index = read_gate_views(args)
    count = min(len(views), args.count or len(views))
    if count < 2 or max(index[:count]) >= len(bench["joints"]) or views.shape[-1] != bench["color"].shape[-1]:
        raise UserError(f"the gate needs views of 2 or more bench subjects at {bench['color'].shape[-1]} px; --views "
                        f"gives {len(views)} at {views.shape[-1]} px for the bench's {len(bench['joints'])}: pass "
                        "the views of this run's bench")
    index, views = index[:count], views[:count]
    gt = views_to_latents(from_uint8(bench["color"][index]), from_uint8(bench["normal"][index]))
    batch = posescore.reward_batch(bench, index)  # the pair rows: joints, image, mask, ...
    images = batch["image"]
    reward_ctx = posescore.load_reward_context(args.reward_dir or args.run_dir / "posescore")
    reward_fn = posescore.checked_reward(args.reward, views, batch, reward_ctx)  # malformed: one line, exit 2
    paths = args.readers or [args.run_dir / folder for folder in READERS if (args.run_dir / folder).exists()]
    if not paths:
        raise UserError(f"{args.run_dir} has no pose_reader/; make it as `make demo` does, or pass --readers")
    readers = {path.name: posescore.load_gskel(path) for path in paths}
    base = load_model(args.run_dir / "base")
    base.unet.requires_grad_(False)
    names = np.array([str(x) for x in bench["split"][index]]) if "split" in bench else np.full(count, "all")
    splits = {"all": np.ones(count, bool)} | {name: names == name for name in dict.fromkeys(names) if name != "all"}
    joints = batch["joints"]

    # --- probes 2 and 3: edits that keep or break the pose ---
    rows = {"GT renders": gt, f"GT, side views blurred (sigma {args.sigma:g} px)": blur_sides(gt, args.sigma),
            "GT, side views of another subject": other_sides(gt), "base views": views,
            "base, side views blurred": blur_sides(views, args.sigma)}
    table = {name: dict(reward=mean_reward(v, batch, reward_fn, reward_ctx), **readings(v, gt, joints, readers, splits))
             for name, v in rows.items()}

    # --- probe 1: ascent in the generator's output space ---
    log, final = ascent(views, gt, images, batch, args, reward_fn, reward_ctx, readers, splits, base,
                        table["GT renders"]["reward"])
    result = verdict(log, table, readers, splits)

    print(f"\n{count} bench subjects, {args.run_dir}, reward {args.reward}"
          + (f" - {args.realism_weight:g} x realism" if args.realism_weight else ""))
    cols = list(next(iter(table.values())))
    print("| views | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for name, values in table.items():
        print(f"| {name} | " + " | ".join(f"{values[c]:.4f}" for c in cols) + " |")
    at = next(line for line in log if line["step"] == result["judged_at_step"])
    for label, line in ((f"ascent, step {at['step']} (judged)", at), (f"ascent, step {log[-1]['step']} (last)", log[-1])):
        print(f"| {label} | " + " | ".join(f"{line[c]:.4f}" for c in cols) + " |")
    print("gap closed at the judged step / the last step: " + ", ".join(
        f"{k} {_share(v)} / {_share(result['gap_closed_last_step'][k])}" for k, v in result["gap_closed"].items()))
    print(f"\ngate: {'PASS' if result['passes'] else 'FAIL'} ({result['rule']})")
    out = gate_out(args)
    write_json(out, dict(args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                         subjects=count, readers={name: str(p) for name, p in zip(readers, paths)},
                         splits={k: int(v.sum()) for k, v in splits.items()}, probes=table, ascent=log, gate=result))
    contact_sheet(out.with_suffix(".png"), sheet_rows(gt, views, final, splits))
    print(f"wrote {out} and {out.with_suffix('.png')} (rows: GT, start, final)")


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


if __name__ == "__main__":
    with one_line_errors():
        main()
