"""Render throughput of prepare_data.render_subjects (six views at 2x, area-downsampled).

    python bench/render_throughput.py                 # CPU, demo and full resolution
    python bench/render_throughput.py --device cuda   # GPU

Prints views per second; numbers depend on the machine and on what else runs on it."""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prepare_data as pd  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--body-dir", type=Path, default=Path("runs/bench_body"))
    args = parser.parse_args()
    if not (args.body_dir / "SMPLX_NEUTRAL.npz").exists():
        pd.export_mannequin_smplx(args.body_dir / "SMPLX_NEUTRAL.npz")
    body = pd.load_body_model(args.body_dir, args.device)
    rng = np.random.default_rng(0)
    poses = pd.generate_poses("broad", args.batch, rng)
    outfits = pd.sample_outfits(args.batch, rng, held_out=False)
    regions = pd.vertex_regions(body)
    print(f"device={args.device} torch_threads={torch.get_num_threads()} batch={args.batch} "
          f"mesh={body.v_template.shape[0]} vertices")
    for preset, resolution in (("demo", pd.PRESETS["demo"]["resolution"]), ("full", pd.PRESETS["full"]["resolution"])):
        pd.render_subjects(body, poses, outfits, resolution, args.device, regions=regions)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            pd.render_subjects(body, poses, outfits, resolution, args.device, regions=regions)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.repeats
        views = args.batch * pd.NUM_VIEWS
        print(f"{preset:5s} {resolution:4d} px (rendered at {2 * resolution}): {views / seconds:8.1f} views/s "
              f"({seconds / args.batch * 1000:.1f} ms per six-view subject)")


if __name__ == "__main__":
    main()
