"""The yardstick's table: model folders read by the judge on held-out scans, the DrPose poses and each
bench split, with the base -> GT gap each closes. Learning curves are this table over a list of ceilings.

    python bench/yardstick.py --run-dir runs/demo --models base ceiling drpose --out bench/results/yardstick.json

Each model generates views of the first --count subjects of every set with its own sampling settings and
the same noise (reconstruct.generate_set); the judge's readers (<run-dir>/pose_reader and pose_reader2, or
--readers) read the side views (evaluate.judge): view joint error, solidity, sureness, judged error, each reader's
quantities with its suffix (evaluate.READERS). `gt` is the GT renders read the same way.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import posescore  # noqa: E402
from evaluate import JUDGE_SETS, READERS, judge_set  # noqa: E402
from plumbing import write_json  # noqa: E402

SETS = {**{name: (path, None) for name, path in JUDGE_SETS.items()},
        "dynamic": ("data/bench/bench.npz", "dynamic"), "extreme": ("data/bench/bench.npz", "extreme")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--models", nargs="+", required=True, help="model folders, or names under --run-dir")
    parser.add_argument("--readers", type=Path, nargs="+", default=None,
                        help="the first and second reader (default <run-dir>/pose_reader <run-dir>/pose_reader2)")
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--count", type=int, default=48, help="subjects per set (the first N)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling noise")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    folders = {Path(m).name: (Path(m) if Path(m).is_dir() else args.run_dir / m) for m in args.models}
    for name, folder in folders.items():
        if not folder.is_dir():
            parser.error(f"--models {name}: {folder} is not a model folder")
    paths = args.readers or [args.run_dir / folder for folder in READERS]
    readers = {suffix: posescore.load_gskel(path, args.device) for path, suffix in zip(paths, READERS.values())
               if path.exists() or args.readers}
    table = {}
    for name in args.sets:
        path, split = SETS[name]
        table[name] = judge_set(args.run_dir, args.run_dir / path, folders, readers, args.count, args.seed,
                                args.device, split)
        print(f"{name} ({table[name]['count']}), judged px per reader: " + " | ".join(
            f"{tag} " + " / ".join(f"{v['judged_px' + s]:.2f}" for s in readers)
            + f" (sure {v['sureness']:.2f}, solid {v['solidity']:.2f})"
            for tag, v in table[name]["models"].items()), flush=True)
    write_json(args.out, dict(run_dir=str(args.run_dir), readers={s: str(p) for p, s in zip(paths, READERS.values())
                                                                  if s in readers},
                              count=args.count, seed=args.seed, sets=table))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
