"""One row per ablation setting from evaluate.py's results.json: mean ± std over seeds of each
seed's bench mean (models named <setting>_s<seed>; a model without a seed suffix is one row).

    python bench/ablation_table.py runs/demo/eval/results.json > runs/demo/ablation.md"""

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluate import metric_label  # noqa: E402

COLUMNS = ("view_joint_error_px", "mpjpe_mm", "mask_iou", "posescore", "ssim_color", "chamfer_cm")


def main(path: str) -> None:
    results = json.loads(open(path).read())
    groups = defaultdict(list)
    for tag, metrics in results["models"].items():
        groups[re.sub(r"_s\d+$", "", tag)].append(metrics)
    labels = [metric_label(column, results) for column in COLUMNS]
    print("| setting | seeds | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for name, runs in groups.items():
        cells = []
        for column in COLUMNS:
            means = [run[column]["mean"] for run in runs if column in run]
            cells.append("n/a" if not means else f"{np.mean(means):.4g}" if len(means) == 1
                         else f"{np.mean(means):.4g} ± {np.std(means):.2g}")
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    gt = results.get("gt_reference", {})
    print(f"\n{results['subjects']} bench subjects. GT renders: " + ", ".join(
        f"{results['metrics'][k]['label']} {v['mean']:.4g}" for k, v in gt.items()) + ".")


if __name__ == "__main__":
    main(sys.argv[1])
