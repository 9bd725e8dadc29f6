"""Seconds per reconstruction stage and per subject, on this machine (CPU or GPU).

    python bench/reconstruct_stages.py                          # CPU, demo preset, 4 bench subjects
    python bench/reconstruct_stages.py --device cuda --count 8  # generation and g_skel on the GPU
    python bench/reconstruct_stages.py --preset full --run-dir runs/full --device cuda

Runs the real `reconstruct.py` path (`reconstruct.main`) on the first --count subjects of
<run-dir>/data/bench with the model <run-dir>/<model>, into a scratch tag that is deleted first so
every subject is timed, and prints the per-stage means the manifest records:
generate (DDIM sampling of the six views), maps (g_skel on the views), fit (SMPL-X body fit),
carve (surface offsets), colour (vertex colours), write (files). The fit and the carving always run
on the CPU: their tensors are a few thousand vertices, where kernel launches would dominate a GPU.
Needs a run folder with body/, data/bench/, the model and the pose reader (`make demo` makes one)."""

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reconstruct  # noqa: E402

STAGES = ("generate", "maps", "fit", "carve", "colour", "write")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--model", default="base")
    parser.add_argument("--preset", default="demo", choices=("demo", "full"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--count", type=int, default=4)
    args = parser.parse_args()
    tag = f"bench_stages_{args.device.replace(':', '')}"
    shutil.rmtree(args.run_dir / "recon" / tag, ignore_errors=True)
    out = reconstruct.main(reconstruct.Args(preset=args.preset, run_dir=args.run_dir, model=args.model,
                                            device=args.device, count=args.count, tag=tag))
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "none"
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"GPU {gpu}; preset {args.preset}, model {args.model}, {args.count} subjects, device {args.device}")
    stages = manifest["seconds_per_stage"]
    print(" | ".join(f"{name} {stages[name]:.2f} s" for name in STAGES)
          + f" | total {manifest['seconds_per_sample']:.2f} s per subject")


if __name__ == "__main__":
    main()
