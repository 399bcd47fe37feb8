"""Tests for mnist_rigl/experiment.py and result_plotter.py: sweep planning, recipes,
resuming, and the table and plots drawn from a small synthetic results file. No test
here trains, except the one marked slow."""

import json
import shlex

import pytest
from PIL import Image

from mnist_rigl import experiment, result_plotter


def planned(argv):
    return experiment.planned_runs(experiment.parse_args(argv))


def fake_record(variant, seed, acc, densities=(0.1, 0.3), block=1, recipe="project",
                sweeps=("seeds",), epochs=10):
    """A finished run as experiment.py stores it, under the key it would use."""
    densities = (1.0, 1.0) if variant == "dense" else densities
    args = experiment.variant_args(variant, [f"{d:g}" for d in densities])
    if block > 1:
        args += ["--block-size", str(block)]
    args += ["--seed", str(seed), "--epochs", str(epochs), *experiment.RECIPES[recipe]]
    return shlex.join(args), {
        "variant": variant, "seed": seed, "recipe": recipe, "densities": list(densities),
        "block_size": block, "epochs": epochs, "extra": [], "args": args,
        "sweeps": list(sweeps), "status": "done", "test_accuracy": acc, "test_loss": 0.1,
        "samples_per_second": 1000.0}


def write_results(path, records):
    path.write_text(json.dumps({"version": 2, "runs": dict(records)}))


def test_recipe_flags():
    project = planned(["--variants", "rigl", "--seeds", "1"])[0]["args"]
    assert shlex.join(project[-8:]) == (
        "--pooling-type SUM --optimizer-arg momentum=0.9 --optimizer-arg use_nesterov=false "
        "--cosine-prune-schedule '{\"zero_steps\": 1}'")
    original = planned(["--recipe", "original", "--variants", "rigl", "--seeds", "1"])[0]
    assert original["args"] == ["--densities", "0.1", "0.3", "--regrow", "rigl",
                                "--seed", "1", "--epochs", "10"]
    assert original["recipe"] == "original"
    # Extra flags come last, after the recipe's, so they can override it.
    extra = planned(["--variants", "dense", "--seeds", "1", "--", "--pooling-type", "MAX"])
    assert extra[0]["args"][-2:] == ["--pooling-type", "MAX"]


def test_seeds_sweep_plans_each_variant_and_seed_once():
    runs = planned(["--seeds", "1", "2", "--densities", "0.01", "1"])
    assert [(r["variant"], r["seed"]) for r in runs] == [
        (v, s) for v in experiment.VARIANTS for s in (1, 2)]
    assert all(r["densities"] == ([1.0, 1.0] if r["variant"] == "dense" else [0.01, 1.0])
               for r in runs)
    assert len({r["key"] for r in runs}) == len(runs)
    static = next(r for r in runs if r["variant"] == "static")["args"]
    assert "--disable-pruning" in static and "--regrow" not in static


def test_density_sweep_varies_fc1_with_fc2_dense_by_default():
    runs = planned(["--sweep", "density", "--seeds", "1"])
    dense = [r for r in runs if r["variant"] == "dense"]
    assert len(dense) == 1 and dense[0]["args"][:3] == ["--densities", "1", "1"]
    for variant in ("static", "random", "rigl"):
        points = [r["densities"] for r in runs if r["variant"] == variant]
        assert points == [[d, 1.0] for d in experiment.FC1_DENSITIES]
    rigl = [r["args"] for r in runs if r["variant"] == "rigl"]
    assert rigl[0][:3] == ["--densities", "0.01", "1"] and "--block-size" not in rigl[0]
    # Several fc2 densities give the original's grid.
    grid = planned(["--sweep", "density", "--seeds", "1", "--variants", "random",
                    "--fc1-densities", "0.1", "0.5", "--fc2-densities", "1", "0.3"])
    assert [r["densities"] for r in grid] == [[0.1, 1], [0.5, 1], [0.1, 0.3], [0.5, 0.3]]


def test_block_sweep_passes_block_size_and_the_recipes_pooling():
    runs = planned(["--sweep", "block", "--seeds", "1", "--variants", "dense", "rigl"])
    assert [(r["variant"], r["block_size"]) for r in runs] == [
        ("dense", 1), ("rigl", 1), ("rigl", 4), ("rigl", 8), ("rigl", 16)]
    assert all(r["densities"] == [0.01, 1.0] for r in runs[1:])  # as block_sweep.sh
    args = [r["args"] for r in runs]
    assert "--block-size" not in args[1]  # block 1: the same run as the other sweeps'
    assert args[4][args[4].index("--block-size") + 1] == "16"
    assert args[4][args[4].index("--pooling-type") + 1] == "SUM"
    original = planned(["--sweep", "block", "--recipe", "original", "--seeds", "1"])
    assert not any("--pooling-type" in r["args"] for r in original)  # NONE, the default


@pytest.mark.parametrize("argv, message", [
    (["--fc1-densities", "0.1", "0"], "--fc1-densities must be in (0, 1], got 0"),
    (["--densities", "1.5", "1"], "--densities must be in (0, 1], got 1.5"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, argv, message):
    assert experiment.main(["--output", str(tmp_path / "r.json"), "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"experiment.py: error: {message}\n"


def test_bad_choices_are_one_line(capsys):
    for argv in (["--block-sizes", "3"], ["--sweep", "grid"], ["--recipe", "mine"]):
        with pytest.raises(SystemExit) as exit_info:
            experiment.main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_resume_skips_finished_runs_and_tags_shared_ones(tmp_path, capsys):
    results = tmp_path / "results.json"
    write_results(results, [fake_record("dense", 1, 0.98, sweeps=["seeds"]),
                            fake_record("rigl", 1, 0.97)])
    assert experiment.main(["--output", str(results), "--dry-run", "--seeds", "1", "2"]) == 0
    todo = [line for line in capsys.readouterr().out.splitlines() if "mnist_rigl.sparse_mnist" in line]
    assert len(todo) == 6 and not any("--densities 1 1 --seed 1 " in t for t in todo)
    # The block sweep needs the same dense run: not rerun, but tagged as the block's too.
    assert experiment.main(["--output", str(results), "--sweep", "block", "--seeds", "1",
                            "--variants", "dense"]) == 0
    stored = json.loads(results.read_text())["runs"]
    assert len(stored) == 2
    assert stored[fake_record("dense", 1, 0)[0]]["sweeps"] == ["seeds", "block"]


def test_failed_run_is_recorded_and_resume_refuses_a_broken_file(tmp_path, capsys):
    results = tmp_path / "results.json"
    key, done = fake_record("dense", 1, 0.98)
    write_results(results, [(key, done)])
    # sparse_mnist.py rejects the flag at once, before any training.
    code = experiment.main(["--output", str(results), "--variants", "static", "--seeds", "1",
                            "--", "--droprate", "1"])
    assert code == 1
    assert capsys.readouterr().err == "experiment.py: error: 1 run(s) failed; rerun to retry them\n"
    stored = json.loads(results.read_text())["runs"]
    failed = [r for r in stored.values() if r["status"] == "failed"]
    assert len(failed) == 1 and "--droprate must be in [0, 1)" in failed[0]["error"]
    assert stored[key]["status"] == "done"  # earlier results kept
    results.write_text("{broken")
    assert experiment.main(["--output", str(results), "--dry-run"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ---- result_plotter ----------------------------------------------------------------------

def sweep_records():
    """Made-up accuracies: two seeds of dense, a density sweep and a block sweep."""
    records = [fake_record("dense", 1, 0.984, sweeps=["density", "block"]),
               fake_record("dense", 2, 0.986, sweeps=["density"])]
    for i, d in enumerate((0.01, 0.1, 0.5)):
        records.append(fake_record("static", 1, 0.90 + 0.02 * i, (d, 1), sweeps=["density"]))
        records.append(fake_record("rigl", 1, 0.93 + 0.02 * i, (d, 1), sweeps=["density"]))
        records.append(fake_record("rigl", 2, 0.95 + 0.02 * i, (d, 1), sweeps=["density"]))
    for i, block in enumerate((1, 4, 16)):
        records.append(fake_record("random", 1, 0.95 - 0.01 * i, (0.01, 1), block,
                                   sweeps=["block"]))
    return records


def test_sweep_series_match_the_results():
    runs = [record for _, record in sweep_records()]
    (density,) = result_plotter.sweep_series(runs, "density")
    assert density["dense"]["mean"] == pytest.approx(98.5)
    assert density["dense"]["seeds"] == [1, 2]
    assert list(density["series"]) == ["static", "rigl"]
    rigl = density["series"]["rigl"]
    assert [p["x"] for p in rigl] == [0.01, 0.1, 0.5]
    assert [p["mean"] for p in rigl] == pytest.approx([94.0, 96.0, 98.0])
    assert [p["seeds"] for p in rigl] == [[1, 2]] * 3
    assert [p["mean"] for p in density["series"]["static"]] == pytest.approx([90, 92, 94])
    (block,) = result_plotter.sweep_series(runs, "block")
    assert [(p["x"], p["mean"]) for p in block["series"]["random"]] == [
        (1, pytest.approx(95.0)), (4, pytest.approx(94.0)), (16, pytest.approx(93.0))]
    # The dense baseline is every dense run of the setting, whichever sweep ran it.
    assert block["dense"]["seeds"] == [1, 2]
    assert "densities 0.01 / 1" in block["title"]


def test_plotter_draws_both_sweeps(tmp_path, capsys):
    results = tmp_path / "results.json"
    write_results(results, sweep_records())
    out = tmp_path / "docs"
    assert result_plotter.main(["--results", str(results), "--output-dir", str(out)]) == 0
    for name in ("sweep_density.png", "sweep_block.png", "results.png"):
        path = out / name
        assert path.stat().st_size > 10_000, name
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size[0] >= 600 and png.size[1] >= 400
            png.verify()
    assert "sweep_density.png" in capsys.readouterr().out


def test_plotter_table(tmp_path, capsys):
    results = tmp_path / "results.json"
    write_results(results, [
        fake_record("dense", 1, 0.984), fake_record("dense", 2, 0.986),
        fake_record("static", 1, 0.970), fake_record("static", 2, 0.972),
        fake_record("rigl", 2, 0.978), fake_record("rigl", 1, 0.976),
        fake_record("rigl", 1, 0.90, (0.01, 1), recipe="original"),
        fake_record("rigl", 1, 0.50, (0.01, 1), sweeps=["density"])])  # not the table's
    assert result_plotter.main(["--results", str(results)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "| project, 10 epochs | Dense | 1 / 1 | 1 | 2 | 98.50 ± 0.14 | 98.40 – 98.60 |" in table
    assert "| project, 10 epochs | Rig-L | 0.1 / 0.3 | 1 | 2 | 97.70 ± 0.14 |" in table
    assert "| original, 10 epochs | Rig-L | 0.01 / 1 | 1 | 1 | 90.00 ± 0.00 |" in table
    assert "Random" not in table and "50.00" not in table
    assert table.index("original") < table.index("Dense") < table.index("Static")
    with Image.open(tmp_path / "results.png") as png:
        assert png.size[0] > 300
    assert result_plotter.main(["--results", str(tmp_path / "missing.json")]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_workers_run_on_a_local_cluster_and_are_other_runs():
    single = planned(["--variants", "rigl", "--seeds", "1"])
    one, two = (planned(["--variants", "rigl", "--seeds", "1", "--workers", n]) for n in "12")
    assert "--distribute" not in single[0]["args"] and single[0]["workers"] is None
    for run, n in ((one[0], "1"), (two[0], "2")):
        assert run["args"][-2:] == ["--distribute", "multi-worker"]
        assert "ipu_sparse_ops.tools.local_cluster --workers " + n + " --threads 1 --" in run["key"]
    assert len({single[0]["key"], one[0]["key"], two[0]["key"]}) == 3


@pytest.mark.slow
@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_sweep_runs_the_script(tmp_path, monkeypatch, workers):
    monkeypatch.chdir(tmp_path)  # where sparse_mnist.py's default checkpoints/ would go
    results = tmp_path / "results.json"
    argv = ["--output", str(results), "--variants", "rigl", "--seeds", "1", "--epochs", "1",
            *workers, "--", "--train-samples", "2000", "--steps-per-epoch", "2"]
    assert experiment.main(argv) == 0
    (run,) = json.loads(results.read_text())["runs"].values()
    assert run["status"] == "done" and 0.1 < run["test_accuracy"] <= 1.0
    assert run["samples_per_second"] > 0 and run["sweeps"] == ["seeds"]
    assert not (tmp_path / "checkpoints").exists()
