"""The supervised ceiling's learning curves, from a bench/yardstick.py json whose models are named
ceil_<recipe>_<budget>_s<seed> (bench/yardstick_gpu.sh): the judged error (px) against samples seen, per
set (held-out scans, the ceiling's own training poses, bench dynamic and extreme), one line per recipe,
the base and the GT renders as flat references. Mean over seeds, with min-max bars when there are several.

    python bench/ceiling_curve.py bench/results/yardstick/yardstick.json --png bench/results/yardstick/ceiling_curve.png
"""

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = re.compile(r"^ceil_(?P<recipe>.+)_(?P<budget>\d+)_s(?P<seed>\d+)$")


def curves(sets: dict, quantity: str = "judged_px") -> dict:
    """{set: {recipe: {budget: [value per seed]}}} from the yardstick's sets."""
    out = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for name, entry in sets.items():
        for tag, values in entry["models"].items():
            match = NAME.match(tag)
            if match:
                out[name][match["recipe"]][int(match["budget"])].append(values[quantity])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("yardstick", type=Path)
    parser.add_argument("--png", type=Path, required=True)
    args = parser.parse_args()
    sets = json.loads(args.yardstick.read_text())["sets"]
    data = curves(sets)
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.6), squeeze=False)
    for ax, (name, entry) in zip(axes[0], sets.items()):
        for recipe, points in sorted(data[name].items()):
            budgets = sorted(points)
            means = [sum(points[b]) / len(points[b]) for b in budgets]
            low = [m - min(points[b]) for m, b in zip(means, budgets)]
            high = [max(points[b]) - m for m, b in zip(means, budgets)]
            ax.errorbar(budgets, means, yerr=[low, high], marker="o", capsize=3, label=recipe)
        for ref, style in (("base", "--"), ("gt", ":")):
            if ref in entry["models"]:
                ax.axhline(entry["models"][ref]["judged_px"], color="k", linestyle=style, label=ref)
        ax.set_xscale("log")
        ax.set_title(f"{name} ({entry['count']})")
        ax.set_xlabel("samples seen")
        ax.set_ylabel("judged error, side views (px)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")
    for name in sets:
        for recipe, points in sorted(data[name].items()):
            row = "  ".join(f"{b}: {sum(v) / len(v):.2f}" for b, v in sorted(points.items()))
            print(f"{name:10s} {recipe:16s} {row}")


if __name__ == "__main__":
    main()
