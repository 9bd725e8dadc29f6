"""Hard negatives for the reward's g_skel: hacked side views, mined from the DrPose poses' input images, never the bench.

    python bench/mine_negatives.py --run-dir runs/demo --reward-dir runs/demo/posescore --out runs/demo/negatives/round1.npz
    python bench/mine_negatives.py --reward-dir runs/demo/posescore_neg1 --rows 192 96 --out runs/demo/negatives/round2.npz
    python posescore.py train --preset demo --init runs/demo/posescore --out runs/demo/posescore_neg2 \\
        --negatives runs/demo/negatives/round1.npz runs/demo/negatives/round2.npz

Two sources, both from the rows `--rows START COUNT` of data/drpose/pairs.npz (the DrPose poses; rows 0-95 are
left to the evaluation and the judge's known answers):
1. An ascent on the reward (bench/reward_probe.py's, without the readers): Adam on the base's generated views of
   those inputs, raising the reward of `--reward-dir`'s g_skel for `--steps`. What it ends on is what that g_skel
   pays for without a better pose (the gate shows the ascent does not draw the pose): its side views are the
   negatives. Mining again with the g_skel retrained on them (`--reward-dir` the new one, other rows) is one
   round more, as reward models are retrained on their policy's samples.
2. `--models`: the side views of model folders that game the reward (e.g. DrPose trained with the paper's
   recipe, which draws a blob in every side view), sampled from the same inputs as they are.

Writes `--out` (npz: `views` (M, 6, H, W) uint8, `view_ids` (M,), the index of each view in VIEW_AZIMUTHS;
`posescore.py train --negatives` reads it, with empty maps as the target) and beside it a json with the command
and the ascent's log, and a contact sheet (.png: the base's views, the final views, per model its views). Only the
reward's g_skel trains on these: the judge's readers never see a model's output.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import posescore  # noqa: E402
from reconstruct import generate_set  # noqa: E402
from plumbing import UserError, atomic_write, contact_sheet, guard_output_file, one_line_errors, write_json  # noqa: E402
from prepare_data import from_uint8, load_split, to_uint8, views_to_latents  # noqa: E402
from reward_probe import ascent  # noqa: E402

FIRST_FREE_ROW = 96  # rows below are the evaluation's DrPose poses (48) and the judge's gamed-views case (48)


def side_views(views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V, 6, H, W) -> (N * 5, 6, H, W) single side views and their (N * 5,) view ids."""
    sides, view_ids = posescore.select_views(views)  # (N, 5, 6, H, W), (5,)
    return sides.flatten(0, 1), view_ids.repeat(len(views))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--reward", default="posescore", help="a name of posescore.REWARDS or file.py:function")
    parser.add_argument("--reward-dir", type=Path, default=None, help="the g_skel to attack (default <run-dir>/posescore)")
    parser.add_argument("--rows", type=int, nargs=2, default=(FIRST_FREE_ROW, 96), metavar=("START", "COUNT"),
                        help=f"rows of data/drpose/pairs.npz to mine from (START >= {FIRST_FREE_ROW})")
    parser.add_argument("--models", type=Path, nargs="*", default=[], help="model folders whose side views are taken as they are")
    parser.add_argument("--steps", type=int, default=60, help="Adam steps of the ascent (0: no ascent)")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate on views in [-1, 1]")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    start, count = args.rows
    if start < FIRST_FREE_ROW or count < 1:
        raise UserError(f"--rows {start} {count}: pass START >= {FIRST_FREE_ROW} (the rows below are evaluated) and "
                        "COUNT >= 1")
    if args.steps < 0 or not args.lr > 0:
        raise UserError("--steps must be >= 0 and --lr > 0")
    for folder in args.models:
        if not (folder / "model_config.json").is_file():
            raise UserError(f"--models {folder} is not a model folder (no model_config.json); pass folders that "
                            "pretrain.load_model reads")
    guard_output_file(args.out, "--out")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    pairs = load_split(args.run_dir / "data" / "drpose" / "pairs.npz", expect_keys=("image", "joints"))
    gt_set = load_split(args.run_dir / "data" / "drpose_gt" / "train.npz", expect_keys=("color", "normal"))
    rows = np.arange(start, min(start + count, len(pairs["image"])))
    if not len(rows):
        raise UserError(f"--rows {start} {count}: data/drpose/pairs.npz has {len(pairs['image'])} rows")
    images = from_uint8(pairs["image"][rows])  # (N, 3, H, W) the single input images DrPose sees
    batch = posescore.reward_batch(pairs, rows)
    gt = views_to_latents(from_uint8(gt_set["color"][rows]), from_uint8(gt_set["normal"][rows]))  # (N, V, 6, H, W)
    reward_ctx = posescore.load_reward_context(args.reward_dir or args.run_dir / "posescore")
    base_views = generate_set(args.run_dir / "base", images, args.seed, "cpu")  # (N, V, 6, H, W)
    reward_fn = posescore.checked_reward(args.reward, base_views, batch, reward_ctx)
    gt_reward = float(posescore.reward_in_chunks(reward_fn, gt, batch, reward_ctx)[0].mean())

    # --- 1. the ascent: what this g_skel pays for, from the base's views ---
    log, final = [], None
    if args.steps:
        ascent_args = argparse.Namespace(lr=args.lr, seed=args.seed, steps=args.steps, log_every=args.log_every,
                                         realism_weight=0.0)
        log, final = ascent(base_views, gt, images, batch, ascent_args, reward_fn, reward_ctx, {}, {}, None, gt_reward)
    # --- 2. models that game the reward, as they are ---
    model_views = {str(folder): generate_set(folder, images, args.seed, "cpu") for folder in args.models}

    sources = ([final] if final is not None else []) + list(model_views.values())
    if not sources:
        raise UserError("nothing to mine: pass --steps >= 1 or --models")
    views, view_ids = zip(*(side_views(v) for v in sources))
    views, view_ids = torch.cat(views), torch.cat(view_ids)
    with atomic_write(args.out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, views=to_uint8((views + 1) / 2), view_ids=view_ids.numpy())
    write_json(args.out.with_suffix(".json"), dict(
        command="python " + " ".join(sys.argv), rows=[int(rows[0]), int(rows[-1]) + 1], reward=args.reward,
        reward_dir=str(args.reward_dir or args.run_dir / "posescore"), gt_reward=gt_reward, ascent=log,
        models=list(model_views), negatives=len(views)))
    sheet = [to_uint8((v[i, :, :3] + 1) / 2) for v in (gt, base_views, *sources) for i in range(3)]
    contact_sheet(args.out.with_suffix(".png"), sheet)
    reached = next((line["step"] for line in log if line["reached_gt"]), None)
    print(f"wrote {args.out}: {len(views)} side views from rows {rows[0]}-{rows[-1]}"
          + (f"; the ascent {'reached the GT renders reward at step ' + str(reached) if reached is not None else 'never reached the GT renders reward'}"
             f" ({log[-1]['reward']:.4f} against {gt_reward:.4f})" if log else ""))


if __name__ == "__main__":
    with one_line_errors():
        main()
