"""Fixed views for the judge's known answers: what a gamed DrPose model draws, and what the base draws, from the
input images of the first DrPose poses, stored once so that the case never changes.

    python bench/pose_free_views.py --run-dir runs/demo --gamed DRPOSE_MODEL --count 48 \
        --out bench/results/judge/pose_free_views.npz

DRPOSE_MODEL is a model folder (`pretrain.load_model`) that draws a dense blob in every side view: the one
stored here is DrPose with the paper's recipe, `bench/effect_gpu.sh` row `paper`, seed 0, 12,800 samples
(batch 16, 800 steps, lr 5e-4) on one H100 from `pretrained/demo_base`. Both models sample the same inputs with
the same noise (`reconstruct.generate_set`, --seed). The npz holds, as uint8 ((views + 1) / 2 * 255):
    gamed   (N, V, 6, H, W)  the gamed model's views          base   (N, V, 6, H, W)  the base's views
    rows    (N,)             the rows of data/drpose/pairs.npz (= data/drpose_gt/train.npz) they were drawn from
and, as text, the command and the two models' configs. bench/judge_check.py reads it.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reconstruct import generate_set  # noqa: E402
from plumbing import atomic_write  # noqa: E402
from prepare_data import from_uint8, load_split, to_uint8  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--gamed", type=Path, required=True, help="a model folder that draws pose-free blobs")
    parser.add_argument("--base", type=Path, default=Path("pretrained/demo_base"))
    parser.add_argument("--count", type=int, default=48, help="the first N DrPose poses")
    parser.add_argument("--seed", type=int, default=0, help="the sampling noise (reconstruct.generate_set)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/judge/pose_free_views.npz"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    pairs = load_split(args.run_dir / "data" / "drpose" / "pairs.npz", expect_keys=("image",))
    images = from_uint8(pairs["image"][:args.count])  # (N, 3, H, W) the single input images DrPose sees
    arrays = {name: to_uint8((generate_set(folder, images, args.seed, "cpu") + 1) / 2)
              for name, folder in (("gamed", args.gamed), ("base", args.base))}
    configs = {name: json.loads((folder / "model_config.json").read_text())
               for name, folder in (("gamed", args.gamed), ("base", args.base))}
    meta = dict(command="python " + " ".join(sys.argv), seed=args.seed,
                gamed_run=configs["gamed"].get("run"), base_run=configs["base"].get("run"))
    with atomic_write(args.out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays, rows=np.arange(len(images)), meta=np.array(json.dumps(meta)))
    print(f"wrote {args.out}: {len(images)} subjects, views {arrays['gamed'].shape[1:]}")


if __name__ == "__main__":
    main()
