"""Probe a reward for hedging: does it pay for blurring views without changing the pose?

    python bench/reward_probe.py --run-dir runs/demo --models base drpose [--reward NAME]

Scores edited views of the bench with the reward (`--reward`, any name in posescore.REWARDS, default
the paper's PoseScore, on the g_skel of posescore/ or --posescore-dir) and with the pose reader
(pose_reader/: its 2D joint error per view, px). The edits keep the front view and change only the
five other views:
    blur sides      a Gaussian blur (skimage.filters.gaussian, sigma --sigma px) of colour and normal:
                    the same pose, less certain
    other subject   the side views of the next bench subject: sharp, but the wrong pose
A reward that ranks "blur sides" above the sharp originals rewards uncertainty: a generator pushed
up such a reward can gain by blurring views it cannot get right (README, "reward hacking").
Reads <run-dir>/data/bench/, recon/<model>/ (views.npz), posescore/ and pose_reader/."""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import posescore  # noqa: E402
from evaluate import NETWORK_METRICS  # noqa: E402
from prepare_data import from_uint8, load_split, views_to_latents  # noqa: E402


def blur_sides(views: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, V, C, H, W) in [-1, 1] -> the same with views 1.. blurred over H, W."""
    from skimage.filters import gaussian

    out = views.clone()
    side = views[:, 1:].numpy()
    out[:, 1:] = torch.from_numpy(gaussian(side, sigma=(0, 0, 0, sigma, sigma), mode="nearest",
                                           preserve_range=True)).to(views.dtype)
    return out


def other_sides(views: torch.Tensor) -> torch.Tensor:
    out = views.clone()
    out[:, 1:] = views.roll(1, 0)[:, 1:]
    return out


def scores(views: torch.Tensor, joints: torch.Tensor, reward: str, reward_ctx, reader_ctx) -> tuple[float, float]:
    """Mean reward (reward g_skel) and mean view joint error (reader, px, as evaluate.py has it)."""
    rewards, _ = posescore.reward_in_chunks(posescore.REWARDS[reward], views, joints, reward_ctx)
    _, reader_reward, to_metric = NETWORK_METRICS["view_joint_error_px"]
    errors, _ = posescore.reward_in_chunks(posescore.REWARDS[reader_reward], views, joints, reader_ctx)
    return float(rewards.mean()), float(to_metric(errors, reader_ctx).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--models", nargs="*", default=["base", "drpose"])
    parser.add_argument("--sigma", type=float, default=2.0)
    parser.add_argument("--reward", default="posescore", help="a name in posescore.REWARDS")
    parser.add_argument("--posescore-dir", type=Path, default=None, help="the reward's g_skel (default <run-dir>/posescore)")
    args = parser.parse_args()
    if args.reward not in posescore.REWARDS:
        parser.error(f"--reward {args.reward} is not one of {sorted(posescore.REWARDS)}")
    torch.set_num_threads(1)
    bench = load_split(args.run_dir / "data/bench/bench.npz", expect_keys=("color", "normal", "joints"))
    gt = views_to_latents(from_uint8(bench["color"]), from_uint8(bench["normal"]))
    joints = torch.from_numpy(bench["joints"]).float()
    reward_ctx = posescore.load_reward_context(args.posescore_dir or args.run_dir / "posescore")
    reader_ctx = posescore.load_reward_context(args.run_dir / "pose_reader")
    rows = [("GT renders", gt), (f"GT, side views blurred (sigma {args.sigma:g} px)", blur_sides(gt, args.sigma)),
            ("GT, side views of another subject", other_sides(gt))]
    for tag in args.models:
        views, _, _ = posescore.read_scored_views(posescore.ScoreArgs(views_dir=args.run_dir / "recon" / tag,
                                                                      run_dir=args.run_dir))
        rows += [(f"{tag} views", views), (f"{tag}, side views blurred", blur_sides(views, args.sigma))]
    print(f"{len(gt)} bench subjects, {args.run_dir}")
    print(f"| views | {args.reward} (reward, higher is better) | view joint error, pose reader (px, lower is better) |")
    print("|---|---|---|")
    for name, views in rows:
        reward, error = scores(views, joints, args.reward, reward_ctx, reader_ctx)
        print(f"| {name} | {reward:.4f} | {error:.2f} |")


if __name__ == "__main__":
    main()
