"""Plot one or several training runs on shared axes (to compare timestep strategies, say).

    python scripts/plot_run.py runs/demo_digits -o demo.png
    python scripts/plot_run.py runs/compare/uniform runs/compare/speed -o strategies.png

Reads each RUN_DIR's logs/train.jsonl (and eval/fid_vs_step.json when `-p evaluate
evaluate.checkpoints=...` wrote it) and draws: training loss, validation loss (data.holdout with
train.eval_every), the eps-MSE per timestep bucket at the last log step (train.loss_buckets), FID
against the step, and img/s. Panels with no data in any run say so. Runs are named by their folder.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BUCKET = re.compile(r"^mse_t(\d{3})-(\d{3})$")


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "logs" / "train.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training run folder?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line torn by a kill
            continue
    return records


def series(records: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def bucket_profile(records: list[dict]) -> tuple[list, list]:
    """(bucket centres, eps-MSE) of the last record that has per-bucket values."""
    for record in reversed(records):
        found = sorted((int(m.group(1)), int(m.group(2)), value) for key, value in record.items()
                       if (m := BUCKET.match(key)))
        if found:
            return [(lo + hi) / 2 for lo, hi, _ in found], [value for _, _, value in found]
    return [], []


def fid_points(run_dir: Path) -> tuple[list, list]:
    path = run_dir / "eval" / "fid_vs_step.json"
    if not path.is_file():
        return [], []
    points = sorted((p["step"], p["fid"]) for p in json.loads(path.read_text())["points"])
    return [s for s, _ in points], [f for _, f in points]


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("training loss", "step", "loss"), ("validation loss (held-out items)", "step", "val_loss"),
              ("MSE per time bucket (last log; eps for diffusion, the prediction for flow)", "timestep t", None), ("FID", "step", None),
              ("throughput", "step", "img/s")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    axes = axes.flatten()
    drawn = [False] * len(panels)
    for number, run_dir in enumerate(run_dirs):
        records, name = read_records(run_dir), run_dir.name
        curves = [series(records, "loss"), series(records, "val_loss"), bucket_profile(records),
                  fid_points(run_dir), series(records, "img/s")]
        for index, (x, y) in enumerate(curves):
            if x:
                axes[index].plot(x, y, marker="o" if index in (2, 3) else None, markersize=3, label=name,
                                 color=f"C{number % 10}")  # one colour per run in every panel
                drawn[index] = True
    for ax, (title, xlabel, key), has_data in zip(axes, panels, drawn):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if has_data:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "no data in these runs", ha="center", va="center", transform=ax.transAxes, color="grey")
    axes[0].set_yscale("log")
    axes[-1].axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        print(plot_runs(args.run_dirs, args.output))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
