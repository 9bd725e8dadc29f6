"""One row per ablation setting from evaluate.py's results.json: mean ± std over seeds of each
seed's bench mean (models named <setting>_s<seed>; a model without a seed suffix is one row), then
per bench split the pose reader's view joint error and the share of the base -> ceiling gap closed.

    python bench/ablation_table.py runs/demo/eval/results.json > runs/demo/ablation.md"""

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluate import GAP_METRIC, metric_label  # noqa: E402

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
    splits = results.get("splits", {})
    if splits:
        print("\n| setting | seeds | " + " | ".join(f"{name} ({entry['count']}): view joint error (px) ↓ | gap closed ↑"
                                                   for name, entry in splits.items()) + " |")
        print("|---|---|" + "---|---|" * len(splits))
        tags = defaultdict(list)
        for tag in results["models"]:
            tags[re.sub(r"_s\d+$", "", tag)].append(tag)
        for name, members in tags.items():
            cells = []
            for entry in splits.values():
                errors = [entry["models"][t][GAP_METRIC] for t in members if entry["models"][t].get(GAP_METRIC) is not None]
                gaps = [entry.get("gap_closed", {}).get(t) for t in members]
                gaps = [100 * g for g in gaps if g is not None]
                cells.append(spread(errors, ".3f"))
                cells.append(spread(gaps, ".0f", "%") if gaps else "-")
            print(f"| {name} | {len(members)} | " + " | ".join(cells) + " |")
    gt = results.get("gt_reference", {})
    print(f"\n{results['subjects']} bench subjects. GT renders: " + ", ".join(
        f"{results['metrics'][k]['label']} {v['mean']:.4g}" for k, v in gt.items()) + ".")


def spread(values: list[float], fmt: str, unit: str = "") -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:{fmt}}{unit}"
    return f"{np.mean(values):{fmt}}{unit} ± {np.std(values):{fmt}}{unit}"


if __name__ == "__main__":
    main(sys.argv[1])
