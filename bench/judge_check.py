"""The judge's known answers: does the pose reader read a correct pose drawn messily as correct, a wrong
pose drawn cleanly as wrong, and a faint drawing of the right pose as no body at all?

    python bench/judge_check.py --run-dir runs/demo                        # runs/demo/pose_reader
    python bench/judge_check.py --reader pretrained/demo_reader --out bench/results/judge_check.json

GT renders of the DrPose poses (data/drpose_gt/train.npz) are drawn again under known edits, and each
case is read on the side views (1..5; the front view is the input's own). Three numbers per case:
    error      the reader's view joint error, px (posescore.view_joint_error)
    solidity   the share of the GT render's ink the views draw (posescore.solidity)
    judged     the judge's verdict: error plus the penalty for a faint drawing (posescore.judged_error)
The rules a fair judge meets (printed PASS / FAIL, written to --out):
    1. every solid artefact case reads within 1.5x of clean (judged);
    2. every wrong-pose case reads at least 3x clean;
    3. the worst solid artefact case sits at least 2 px below the best wrong-pose case;
    4. faint and fuzzy drawings of the correct pose read no better than the best wrong-pose case.
Edits draw their randomness from one fixed generator (--seed), so every reader sees the same cases.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import posescore  # noqa: E402
from plumbing import write_json  # noqa: E402
from prepare_data import from_uint8, load_split, views_to_latents  # noqa: E402

SOLID = ("speckle 5%", "speckle 10%", "blur 3x3 twice + speckle 5%", "blob (blur 3x3 six times)",
         "blotches, missing and extra pixels, colour shift")
WRONG = ("wrong pose: an upright held-out scan", "wrong pose: another DrPose anchor")
FAINT = ("faint (70% towards the background)", "fuzz (faint + blur + speckle 10%)")


def side_only(edited: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Keep the front view (view 0) clean: it is the input image, never generated."""
    return torch.cat([clean[:, :1], edited[:, 1:]], 1)


def cases(gt: torch.Tensor, scans: torch.Tensor, anchor_stride: int, seed: int) -> dict[str, torch.Tensor]:
    """name -> (N, V, 6, H, W) views, the GT renders `gt` edited; `scans` are upright wrong poses."""
    g = torch.Generator().manual_seed(seed)
    flat = gt.flatten(0, 1)  # (N * V, 6, H, W)
    per_view = lambda fn: fn(flat).unflatten(0, gt.shape[:2])  # noqa: E731
    faint = posescore.fade(gt, 0.7)
    edited = {
        "clean": gt,
        SOLID[0]: posescore.speckle(gt, 0.05, g),
        SOLID[1]: posescore.speckle(gt, 0.10, g),
        SOLID[2]: posescore.speckle(posescore.box_blur(gt, 2), 0.05, g),
        SOLID[3]: posescore.box_blur(gt, 6),
        SOLID[4]: per_view(lambda x: posescore.solid_mess(x, g)),
        WRONG[0]: scans[torch.arange(len(gt)) % len(scans)],
        WRONG[1]: gt.roll(anchor_stride, 0),  # pairs are stored anchor by anchor: this is another anchor
        FAINT[0]: faint,
        FAINT[1]: posescore.speckle(posescore.box_blur(faint, 2), 0.10, g),
    }
    return {name: side_only(views, gt) for name, views in edited.items()}


def read_cases(views: dict, gt: torch.Tensor, joints: torch.Tensor, ctx) -> dict[str, dict]:
    table = {}
    for name, v in views.items():
        error = posescore.view_joint_error(ctx, v, joints)[:, 1:]  # (N, 5) side views
        solid = posescore.solidity(v, gt)[:, 1:]
        judged = posescore.judged_error(error, solid)
        table[name] = dict(error=error.mean().item(), solidity=solid.mean().item(), judged=judged.mean().item())
    return table


def rules(table: dict) -> dict[str, dict]:
    clean = table["clean"]["judged"]
    worst_solid = max(table[n]["judged"] for n in SOLID)
    best_wrong = min(table[n]["judged"] for n in WRONG)
    best_faint = min(table[n]["judged"] for n in FAINT)
    return {
        "solid artefacts within 1.5x of clean": dict(value=worst_solid / clean, passes=worst_solid <= 1.5 * clean),
        "wrong poses at least 3x clean": dict(value=best_wrong / clean, passes=best_wrong >= 3 * clean),
        "worst solid at least 2 px below best wrong": dict(value=best_wrong - worst_solid,
                                                           passes=best_wrong - worst_solid >= 2.0),
        "faint and fuzzy no better than best wrong": dict(value=best_faint - best_wrong, passes=best_faint >= best_wrong),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--reader", type=Path, default=None, help="a g_skel folder (default <run-dir>/pose_reader)")
    parser.add_argument("--count", type=int, default=96, help="the first N DrPose GT subjects")
    parser.add_argument("--seed", type=int, default=0, help="the edits' random draws")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="json of the table and the rules")
    args = parser.parse_args()
    if args.count < 2:
        parser.error("--count must be >= 2 (the wrong-anchor case needs another subject)")

    data = args.run_dir / "data"
    pairs = load_split(data / "drpose_gt" / "train.npz", expect_keys=("color", "normal", "joints", "anchor"))
    scans = load_split(data / "scans" / "val.npz", expect_keys=("color", "normal"))
    stride = int((pairs["anchor"] == pairs["anchor"][0]).sum())  # subjects per anchor, stored together
    count = min(args.count, len(pairs["joints"]))
    gt = views_to_latents(from_uint8(pairs["color"][:count]), from_uint8(pairs["normal"][:count]))
    joints = torch.from_numpy(pairs["joints"][:count]).float()
    upright = views_to_latents(from_uint8(scans["color"]), from_uint8(scans["normal"]))
    reader = args.reader or args.run_dir / "pose_reader"
    ctx = posescore.load_gskel(reader, args.device)

    table = read_cases(cases(gt, upright, max(1, stride), args.seed), gt, joints, ctx)
    verdicts = rules(table)
    print(f"reader {reader}, {count} DrPose GT subjects, side views")
    print("| case | error (px) | solidity | judged (px) |\n|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['error']:.2f} | {row['solidity']:.2f} | {row['judged']:.2f} |")
    for name, rule in verdicts.items():
        print(f"{'PASS' if rule['passes'] else 'FAIL'}  {name} ({rule['value']:.2f})")
    if args.out is not None:
        write_json(args.out, dict(reader=str(reader), subjects=count, seed=args.seed, table=table, rules=verdicts,
                                  solid_share=posescore.SOLID_SHARE, unsolid_penalty_px=posescore.UNSOLID_PENALTY_PX))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
