"""Turn experiment.py's results JSON into a markdown table and PNG plots.

results.md and results.png: one row (one point) per recipe, densities, block
size and variant (dense, static, random regrowth, Rig-L) of the seeds sweep
(of every run if the file has no seeds sweep): mean and standard deviation of
the test accuracy over seeds, its range, the mean test loss and throughput.

sweep_density.png and sweep_block.png, when the file has runs of those sweeps:
test accuracy against fc1 density and against fc1 block size, one line per
sparse variant and the dense model as a horizontal line at its mean.

Example:
    python -m mnist_rigl.result_plotter --results sweep/results.json --output-dir docs
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PROG = "result_plotter.py"
RESULTS_VERSION = 2
VARIANTS = ("dense", "static", "random", "rigl")
RECIPES = ("original", "project")
LABELS = {"dense": "Dense", "static": "Static sparse", "random": "Random regrowth (SET)",
          "rigl": "Rig-L"}
COLOURS = {"dense": "0.4", "static": "tab:blue", "random": "tab:orange", "rigl": "tab:green"}


class ResultsError(Exception):
    """Unusable results; one line for the user."""


def load_runs(path: Path) -> list[dict]:
    """The finished runs, checked for the fields the table and plots read."""
    try:
        results = json.loads(Path(path).read_text())
        if results.get("version") != RESULTS_VERSION:
            raise ValueError(f"version {results.get('version')}, not {RESULTS_VERSION}")
        done = [run for run in results["runs"].values() if run.get("status") == "done"]
        for run in done:
            float(run["test_accuracy"]), float(run["test_loss"]), int(run["seed"])
            fc1, fc2 = map(float, run["densities"])
            if run["variant"] not in VARIANTS or run["recipe"] not in RECIPES:
                raise ValueError(f"unknown variant or recipe in {run['args']}")
            int(run["block_size"]), int(run["epochs"]), list(run["extra"]), list(run["sweeps"])
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such file (run experiment.py first)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ResultsError(f"{path}: not an experiment.py results file ({e})") from None
    if not done:
        raise ResultsError(f"{path}: no finished runs yet")
    return done


def _setting(run: dict) -> tuple:
    """What besides variant and densities makes runs comparable: same recipe, epochs, flags."""
    return (RECIPES.index(run["recipe"]), run["epochs"], tuple(run["extra"]))


def _setting_label(run: dict) -> str:
    extra = f" + {shlex.join(run['extra'])}" if run["extra"] else ""
    return f"{run['recipe']}{extra}, {run['epochs']} epochs"


def _stats(runs: list[dict]) -> dict:
    acc = np.array([r["test_accuracy"] for r in runs]) * 100.0
    return {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "min": float(acc.min()), "max": float(acc.max()), "accuracies": acc,
            "seeds": sorted(r["seed"] for r in runs)}


def summary(runs: list[dict]) -> list[dict]:
    """One row per configuration of the seeds sweep (of all runs if there is none)."""
    chosen = [r for r in runs if "seeds" in r["sweeps"]] or runs
    groups = {}
    for run in chosen:
        key = (*_setting(run), run["variant"] != "dense", *run["densities"],
               run["block_size"], VARIANTS.index(run["variant"]))
        groups.setdefault(key, []).append(run)
    rows = []
    for key in sorted(groups):
        group = groups[key]
        first = group[0]
        speeds = [r["samples_per_second"] for r in group if r.get("samples_per_second")]
        rows.append({"variant": first["variant"], "setting": _setting_label(first),
                     "densities": " / ".join(f"{d:g}" for d in first["densities"]),
                     "block": first["block_size"], **_stats(group),
                     "loss": float(np.mean([r["test_loss"] for r in group])),
                     "speed": float(np.mean(speeds)) if speeds else None})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| Recipe | Variant | Densities (fc1 / fc2) | Block | Seeds "
             "| Test accuracy % (mean ± std) | Min – max % | Test loss | Samples/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        speed = f"{row['speed']:.0f}" if row["speed"] else "–"
        lines.append(
            f"| {row['setting']} | {LABELS[row['variant']]} | {row['densities']} "
            f"| {row['block']} | {len(row['seeds'])} | {row['mean']:.2f} ± {row['std']:.2f} "
            f"| {row['min']:.2f} – {row['max']:.2f} | {row['loss']:.3f} | {speed} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(max(7.0, 1.3 * len(rows)), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    # Means with error bars rather than bars: a bar's length would read from the
    # zoomed-in axis, not from zero.
    for i, row in enumerate(rows):
        ax.errorbar(i, row["mean"], yerr=row["std"], fmt="s", markersize=9, capsize=8,
                    color=COLOURS[row["variant"]])
        ax.scatter(np.full(len(row["accuracies"]), i + 0.12), row["accuracies"], color="k",
                   s=12, zorder=3)
    low = min(r["min"] for r in rows)
    high = max(r["max"] for r in rows)
    ax.set_ylim(max(0.0, low - 1.0), min(100.0, high + 0.5))
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_xticks(np.arange(len(rows)), [
        f"{LABELS[r['variant']]}\n{r['densities']}"
        + (f", block {r['block']}" if r["block"] > 1 else "") + f"\n{r['setting']}"
        for r in rows], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MNIST 784-320-10: test accuracy (square: mean ± std; dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)


SWEEP_AXES = {"density": ("fc1 density", lambda r: r["densities"][0],
                          lambda r: (r["densities"][1], r["block_size"]),
                          lambda r: f"fc2 density {r['densities'][1]:g}"
                          + (f", block {r['block_size']}" if r["block_size"] > 1 else "")),
              "block": ("fc1 block size", lambda r: r["block_size"],
                        lambda r: tuple(r["densities"]),
                        lambda r: "densities {:g} / {:g}".format(*r["densities"]))}


def sweep_series(runs: list[dict], sweep: str) -> list[dict]:
    """The points of a sweep's plot: one panel per setting (recipe, epochs, flags, fixed
    densities), in each the sparse variants' (x, mean, std, seeds) and the dense baseline.

    The baseline is every dense run of the same recipe, epochs and flags, whichever
    sweep ran it: the dense model has no density or block size to sweep.
    """
    _, x_of, fixed_of, fixed_label = SWEEP_AXES[sweep]
    sparse = [r for r in runs if sweep in r["sweeps"] and r["variant"] != "dense"]
    panels = {}
    for run in sparse:
        panel = panels.setdefault((*_setting(run), fixed_of(run)), {
            "title": f"{_setting_label(run)}, {fixed_label(run)}", "setting": _setting(run),
            "points": {}})
        panel["points"].setdefault(run["variant"], {}).setdefault(x_of(run), []).append(run)
    result = []
    for key in sorted(panels):
        panel = panels[key]
        dense = [r for r in runs if r["variant"] == "dense" and _setting(r) == panel["setting"]]
        series = {}
        for variant in VARIANTS:
            by_x = panel["points"].get(variant)
            if by_x:
                series[variant] = [{"x": x, **_stats(by_x[x])} for x in sorted(by_x)]
        result.append({"title": panel["title"], "series": series,
                       "dense": _stats(dense) if dense else None})
    return result


def plot_sweep(panels: list[dict], sweep: str, path: Path) -> None:
    x_label = SWEEP_AXES[sweep][0]
    fig = Figure(figsize=(7.5 * len(panels), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    for ax, panel in zip(axes, panels):
        xs = sorted({p["x"] for points in panel["series"].values() for p in points})
        if panel["dense"]:
            dense = panel["dense"]
            ax.axhline(dense["mean"], color=COLOURS["dense"], linestyle="--",
                       label=f"{LABELS['dense']} ({len(dense['seeds'])} seeds)")
            if dense["std"] > 0:
                ax.axhspan(dense["mean"] - dense["std"], dense["mean"] + dense["std"],
                           color=COLOURS["dense"], alpha=0.15)
        for variant, points in panel["series"].items():
            ax.errorbar([p["x"] for p in points], [p["mean"] for p in points],
                        yerr=[p["std"] for p in points], marker="o", capsize=4,
                        color=COLOURS[variant], label=LABELS[variant])
        # Both sweeps step by factors, so a log axis spaces the points evenly.
        ax.set_xscale("log", base=2 if sweep == "block" else 10)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(panel["title"], fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"MNIST 784-320-10: test accuracy against {x_label}, mean ± std over seeds")
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.error = lambda message: parser.exit(2, f"{PROG}: error: {message}\n")
    parser.add_argument("--results", type=Path, default=Path("sweep/results.json"),
                        help="experiment.py's results JSON")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where results.md, results.png and sweep_{density,block}.png "
                        "go (default: beside the JSON)")
    args = parser.parse_args(argv)
    out = args.output_dir or args.results.parent
    written = [out / "results.md", out / "results.png"]
    try:
        runs = load_runs(args.results)
        rows = summary(runs)
        table = markdown_table(rows)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(table)
        plot(rows, out / "results.png")
        for sweep in ("density", "block"):
            panels = sweep_series(runs, sweep)
            if panels:
                plot_sweep(panels, sweep, out / f"sweep_{sweep}.png")
                written.append(out / f"sweep_{sweep}.png")
    except ResultsError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: cannot write the table or plots: {e}", file=sys.stderr)
        return 1
    print(table, end="")
    print("Wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
