"""Turn experiment.py's results JSON into a markdown table and a PNG plot.

The table has one row per variant (dense, static, random regrowth, Rig-L):
mean and standard deviation of the test accuracy over seeds, its range, the
mean test loss and throughput. The plot shows each variant's mean with a
standard-deviation bar and every seed as a dot.

Example:
    python mnist_rigl/result_plotter.py --results sweep/results.json
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PROG = "result_plotter.py"
VARIANTS = ("dense", "static", "random", "rigl")
LABELS = {"dense": "Dense", "static": "Static sparse", "random": "Random regrowth (SET)",
          "rigl": "Rig-L"}


class ResultsError(Exception):
    """Unusable results; one line for the user."""


def load_runs(path: Path) -> dict[str, list[dict]]:
    """Finished runs grouped by variant, in the order of VARIANTS."""
    try:
        results = json.loads(Path(path).read_text())
        runs = results["runs"].values()
        done = [run for run in runs if run.get("status") == "done"]
        grouped = {v: [r for r in done if r["variant"] == v] for v in VARIANTS}
        for group in grouped.values():
            for run in group:
                float(run["test_accuracy"]), float(run["test_loss"])
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such file (run experiment.py first)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ResultsError(f"{path}: not an experiment.py results file ({e})") from None
    grouped = {v: sorted(g, key=lambda r: r["seed"]) for v, g in grouped.items() if g}
    if not grouped:
        raise ResultsError(f"{path}: no finished runs yet")
    return grouped


def _densities(run: dict) -> str:
    args = run["args"]
    i = args.index("--densities")
    return f"{args[i + 1]} / {args[i + 2]}"


def summary(grouped: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for variant, runs in grouped.items():
        acc = np.array([r["test_accuracy"] for r in runs]) * 100.0
        loss = np.array([r["test_loss"] for r in runs])
        speeds = [r["samples_per_second"] for r in runs if r.get("samples_per_second")]
        rows.append({"variant": variant, "densities": _densities(runs[0]),
                     "seeds": [r["seed"] for r in runs], "mean": acc.mean(),
                     "std": acc.std(ddof=1) if len(acc) > 1 else 0.0,
                     "min": acc.min(), "max": acc.max(), "loss": loss.mean(),
                     "speed": float(np.mean(speeds)) if speeds else None,
                     "accuracies": acc})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| Variant | Densities (fc1 / fc2) | Seeds | Test accuracy % (mean ± std) "
             "| Min – max % | Test loss | Samples/s |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        speed = f"{row['speed']:.0f}" if row["speed"] else "–"
        lines.append(
            f"| {LABELS[row['variant']]} | {row['densities']} | {len(row['seeds'])} "
            f"| {row['mean']:.2f} ± {row['std']:.2f} | {row['min']:.2f} – {row['max']:.2f} "
            f"| {row['loss']:.3f} | {speed} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(rows))
    # Means with error bars rather than bars: a bar's length would read from the
    # zoomed-in axis, not from zero.
    colours = {"dense": "0.4", "static": "tab:blue", "random": "tab:orange", "rigl": "tab:green"}
    for i, row in enumerate(rows):
        ax.errorbar(i, row["mean"], yerr=row["std"], fmt="s", markersize=9, capsize=8,
                    color=colours[row["variant"]])
        ax.scatter(np.full(len(row["accuracies"]), i + 0.12), row["accuracies"], color="k",
                   s=12, zorder=3)
    low = min(r["min"] for r in rows)
    high = max(r["max"] for r in rows)
    ax.set_ylim(max(0.0, low - 1.0), min(100.0, high + 0.5))
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_xticks(x, [f"{LABELS[r['variant']]}\n{r['densities']}" for r in rows])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MNIST 784-320-10: test accuracy (square: mean ± std; dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.error = lambda message: parser.exit(2, f"{PROG}: error: {message}\n")
    parser.add_argument("--results", type=Path, default=Path("sweep/results.json"),
                        help="experiment.py's results JSON")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where results.md and results.png go (default: beside the JSON)")
    args = parser.parse_args(argv)
    try:
        rows = summary(load_runs(args.results))
        table = markdown_table(rows)
        out = args.output_dir or args.results.parent
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(table)
        plot(rows, out / "results.png")
    except ResultsError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: cannot write the table or plot: {e}", file=sys.stderr)
        return 1
    print(table, end="")
    print(f"Wrote {out / 'results.md'} and {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
