"""The judge's known answers: does each pose reader read a correct pose drawn messily as correct, a wrong pose
drawn cleanly as wrong, a faint drawing of the right pose as no body at all, and a pose-free image that carries
a body's ink (a blob, the mean of many people, what a gamed DrPose model draws) as no pose?

    python bench/judge_check.py --run-dir runs/demo                       # runs/demo/pose_reader and pose_reader2
    python bench/judge_check.py --readers pretrained/demo_reader pretrained/demo_reader2 \
        --out bench/results/judge/judge_check.json
    python bench/judge_check.py --tables cpu.json gpu.json                # one table of several machines' runs

GT renders of the DrPose poses (data/drpose_gt/train.npz) are drawn again under known edits, and each case is
read on the side views (1..5; the front view is the input's own) with the judge (posescore.judge_verdict):
    error      the reader's view joint error, px
    solidity   the share of the GT render's ink the views draw
    sureness   the reader's confidence as a share of its confidence on the GT render
    judged     the judge's verdict: error plus the penalties for a faint drawing and for no body seen
Pose-free cases (no limbs, a body's ink):
    (a) each side view the mean of the same view of 16 other DrPose subjects' GT renders;
    (b) each side view's ink as one Gaussian of the same mass, centre and spread (posescore.ink_gaussians);
    (c) what DrPose trained with the paper's recipe to 12,800 samples draws from the first 48 DrPose poses' input
        images, and what the base draws from the same inputs with the same noise, stored once by
        bench/pose_free_views.py in bench/results/judge/pose_free_views.npz.
The rules a fair judge meets, for every reader (printed PASS / FAIL, written to --out):
    1. every solid artefact case reads within 1.5x of clean;
    2. every wrong-pose case reads at least 3x clean;
    3. the worst solid artefact case sits at least 2 px below the best wrong-pose case;
    4. faint and fuzzy drawings of the correct pose read no better than the best wrong-pose case;
    5. (a) and (b) read no better than the best wrong-pose case;
    6. (c) reads no better than the base's own views of the same inputs.
Edits draw their randomness from one fixed generator (--seed), so every reader sees the same cases.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import posescore  # noqa: E402
from plumbing import write_json  # noqa: E402
from prepare_data import from_uint8, load_split, views_to_latents  # noqa: E402

SOLID = ("speckle 5%", "speckle 10%", "blur 3x3 twice + speckle 5%", "blob (blur 3x3 six times)",
         "blotches, missing and extra pixels, colour shift")
WRONG = ("wrong pose: an upright held-out scan", "wrong pose: another DrPose anchor")
FAINT = ("faint (70% towards the background)", "fuzz (faint + blur + speckle 10%)")
POSE_FREE = ("(a) mean of 16 other subjects", "(b) one Gaussian of the ink")
GAMED, GAMED_BASE = "(c) a gamed DrPose model's views", "(c) the base's views of the same inputs"
MEAN_OF = 16


def side_only(edited: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Keep the front view (view 0) clean: it is the input image, never generated."""
    return torch.cat([clean[:, :1], edited[:, 1:]], 1)


def mean_of_others(gt: torch.Tensor, count: int = MEAN_OF) -> torch.Tensor:
    """(N, V, 6, H, W) -> each subject's views replaced by the mean of the same views of `count` others (the
    next ones, skipping itself; anchors are stored together, so a long stride reaches other poses)."""
    num = len(gt)
    stride = max(1, num // (count + 1))
    return torch.stack([gt[[(i + stride * (j + 1)) % num for j in range(count)]].mean(0) for i in range(num)])


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
        POSE_FREE[0]: mean_of_others(gt),
        POSE_FREE[1]: per_view(posescore.ink_gaussians),
    }
    return {name: side_only(views, gt) for name, views in edited.items()}


def read_cases(views: dict, gt: torch.Tensor, joints: torch.Tensor, reader) -> dict[str, dict]:
    """name -> {quantity: mean over subjects and side views} of one reader's judge."""
    table = {}
    for name, v in views.items():
        rows = slice(None, len(v))  # the gamed views cover the first 48 subjects only
        verdict = posescore.judge_verdict(reader, v, gt[rows], joints[rows])
        table[name] = {key: value[:, 1:].mean().item() for key, value in verdict.items()}  # side views
    return table


def rules(table: dict) -> dict[str, dict]:
    judged = {name: row["judged"] for name, row in table.items()}
    clean = judged["clean"]
    worst_solid = max(judged[n] for n in SOLID)
    best_wrong = min(judged[n] for n in WRONG)
    out = {
        "solid artefacts within 1.5x of clean": dict(value=worst_solid / clean, passes=worst_solid <= 1.5 * clean),
        "wrong poses at least 3x clean": dict(value=best_wrong / clean, passes=best_wrong >= 3 * clean),
        "worst solid at least 2 px below best wrong": dict(value=best_wrong - worst_solid,
                                                           passes=best_wrong - worst_solid >= 2.0),
        "faint and fuzzy no better than best wrong": dict(value=min(judged[n] for n in FAINT) - best_wrong,
                                                          passes=min(judged[n] for n in FAINT) >= best_wrong),
    }
    if all(n in judged for n in POSE_FREE):
        best_free = min(judged[n] for n in POSE_FREE)
        out["pose-free (a), (b) no better than best wrong"] = dict(value=best_free - best_wrong,
                                                                   passes=best_free >= best_wrong)
    if GAMED in judged:
        out["(c) gamed views no better than the base's"] = dict(value=judged[GAMED] - judged[GAMED_BASE],
                                                               passes=judged[GAMED] >= judged[GAMED_BASE])
    return out


def load_gamed(path: Path, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored views of case (c) (bench/pose_free_views.py), front views kept as the GT's."""
    arrays = np.load(path)
    rows = arrays["rows"]
    if rows.max() >= len(gt) or not np.array_equal(rows, np.arange(len(rows))):
        raise SystemExit(f"{path} holds rows 0..{rows.max()}; pass --count >= {rows.max() + 1}")
    to_views = lambda a: torch.from_numpy(a).float() / 127.5 - 1  # noqa: E731
    return {GAMED: side_only(to_views(arrays["gamed"]), gt[rows]),
            GAMED_BASE: side_only(to_views(arrays["base"]), gt[rows])}


def print_table(runs: dict[str, dict]) -> None:
    """runs: column label -> one run's json (reader -> table, rules). One markdown table of the judged error
    and the sureness, a column per reader and run; then the rules."""
    columns = [(label, reader) for label, run in runs.items() for reader in run["readers"]]
    print("| case | " + " | ".join(f"{label}: {Path(r).name} judged (sure)" for label, r in columns) + " |")
    print("|---|" + "---|" * len(columns))
    names = list(next(iter(runs.values()))["readers"].values())[0]["table"]
    for name in names:
        cells = [runs[label]["readers"][r]["table"].get(name) for label, r in columns]
        print(f"| {name} | " + " | ".join("" if c is None else f"{c['judged']:.2f} ({c['sureness']:.2f})"
                                          for c in cells) + " |")
    rule_names = list(next(iter(runs.values()))["readers"].values())[0]["rules"]
    for rule in rule_names:
        cells = [runs[label]["readers"][r]["rules"][rule] for label, r in columns]
        print(f"| {rule} | " + " | ".join(f"{'PASS' if c['passes'] else 'FAIL'} ({c['value']:.2f})"
                                          for c in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--readers", type=Path, nargs="+", default=None,
                        help="g_skel folders (default <run-dir>/pose_reader and <run-dir>/pose_reader2)")
    parser.add_argument("--count", type=int, default=96, help="the first N DrPose GT subjects")
    parser.add_argument("--gamed", type=Path, default=Path(__file__).parent / "results/judge/pose_free_views.npz",
                        help="case (c)'s stored views (bench/pose_free_views.py); 'none' leaves it out")
    parser.add_argument("--seed", type=int, default=0, help="the edits' random draws")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--machine", default=None, help="a label for this machine in the json (default: cpu/cuda)")
    parser.add_argument("--out", type=Path, default=None, help="json of the tables and the rules")
    parser.add_argument("--tables", type=Path, nargs="+", default=None,
                        help="only print one table of these --out files side by side, e.g. a CPU and a GPU run")
    args = parser.parse_args()
    if args.tables:
        print_table({json.loads(p.read_text()).get("machine", p.stem): json.loads(p.read_text()) for p in args.tables})
        return
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
    views = cases(gt, upright, max(1, stride), args.seed)
    if str(args.gamed) != "none":
        views |= load_gamed(args.gamed, gt)
    readers = args.readers or [args.run_dir / "pose_reader", args.run_dir / "pose_reader2"]

    run = dict(machine=args.machine or ("cuda" if "cuda" in args.device else "cpu"), device=args.device,
               host=platform.processor() or platform.machine(), torch=torch.__version__, subjects=count, seed=args.seed,
               solid_share=posescore.SOLID_SHARE, unsolid_penalty_px=posescore.UNSOLID_PENALTY_PX,
               sure_share=posescore.SURE_SHARE, unsure_penalty_px=posescore.UNSURE_PENALTY_PX, readers={})
    for folder in readers:
        table = read_cases(views, gt, joints, posescore.load_gskel(folder, args.device))
        run["readers"][str(folder)] = dict(table=table, rules=rules(table))
    print(f"{count} DrPose GT subjects (case (c): {len(views.get(GAMED, []))}), side views, {args.device}")
    print_table({run["machine"]: run})
    fails = [f"{Path(r).name}: {name}" for r, entry in run["readers"].items()
             for name, rule in entry["rules"].items() if not rule["passes"]]
    print("every rule passes for every reader" if not fails else "FAIL: " + "; ".join(fails))
    if args.out is not None:
        write_json(args.out, run)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
