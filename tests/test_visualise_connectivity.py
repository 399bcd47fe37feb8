"""Tests for mnist_rigl/visualise_connectivity.py on small synthetic records."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_rigl import visualise_connectivity as vc

SCRIPT = Path(__file__).resolve().parents[1] / "mnist_rigl" / "visualise_connectivity.py"
HIDDEN = 64


def random_pattern(rng, block_size, density=0.2):
    """Distinct random (block) positions of a [784, HIDDEN] weight."""
    rows, cols = 784 // block_size, HIDDEN // block_size
    flat = rng.choice(rows * cols, size=int(density * rows * cols), replace=False)
    row_indices, col_indices = np.divmod(flat, cols)
    shape = (len(flat),) if block_size == 1 else (len(flat), block_size, block_size)
    values = rng.normal(size=shape).astype(np.float32)
    return row_indices.astype(np.int32), col_indices.astype(np.int32), values


def save_record(folder, step, row_indices, col_indices, values, block_size=None, **extra):
    arrays = dict(row_indices=row_indices, col_indices=col_indices, values=values, **extra)
    if block_size is not None:
        arrays["block_size"] = np.array(block_size)
    np.savez(folder / f"weights_fc1_{step:06d}.npz", **arrays)


def write_run(folder, block_size, steps=5, seed=0):
    """Records for steps 0..steps, each a fresh random pattern; returns the patterns."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patterns = []
    for step in range(steps + 1):
        pattern = random_pattern(rng, block_size)
        save_record(folder, step, *pattern, block_size=None if block_size == 1 else block_size)
        patterns.append(pattern)
    return patterns


def reference_counts(row_indices, col_indices, block_size):
    """Connections per pixel from the dense 784 x HIDDEN mask, summed over columns."""
    mask = np.zeros((784, HIDDEN), dtype=bool)
    for r, c in zip(row_indices, col_indices):
        mask[r * block_size:(r + 1) * block_size, c * block_size:(c + 1) * block_size] = True
    return mask.sum(axis=1).reshape(28, 28)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_counts_match_dense_mask(tmp_path, block_size):
    patterns = write_run(tmp_path, block_size, steps=2)
    records = vc.load_records(tmp_path)
    assert [step for step, _ in records] == [0, 1, 2]
    for (_, record), (rows, cols, _) in zip(records, patterns):
        assert record.block_size == block_size
        counts = vc.connections_per_pixel(record)
        assert counts.shape == (28, 28)
        np.testing.assert_array_equal(counts, reference_counts(rows, cols, block_size))


def test_pixel_order_is_row_major():
    # Pixel 28 is row 1, column 0 of the image; a 4-block at block row 7 covers pixels 28..31.
    element = vc.Record(np.array([28, 28, 0]), np.array([0, 1, 5]), np.ones(3))
    block = vc.Record(np.array([7]), np.array([2]), np.ones((1, 4, 4)), block_size=4)
    expected_element = np.zeros((28, 28), int)
    expected_element[1, 0], expected_element[0, 0] = 2, 1
    expected_block = np.zeros((28, 28), int)
    expected_block[1, 0:4] = 4
    np.testing.assert_array_equal(vc.connections_per_pixel(element), expected_element)
    np.testing.assert_array_equal(vc.connections_per_pixel(block), expected_block)


def test_zero_values_still_count_as_connections():
    record = vc.Record(np.array([3]), np.array([0]), np.zeros(1))
    assert vc.connections_per_pixel(record)[0, 3] == 1


def test_pictures_keep_row_0_at_top(tmp_path):
    # Top half unconnected (black in "gray"), bottom half connected (white).
    counts = np.zeros((28, 28), int)
    counts[14:] = 8
    vc.plot_frame(counts, 3, tmp_path / "frame.png", cmap="gray")
    vc.plot_initial_final(np.zeros((28, 28), int), counts, 0, 3, tmp_path / "pair.png",
                          cmap="gray")
    frame = np.asarray(Image.open(tmp_path / "frame.png").convert("L"))
    pair = np.asarray(Image.open(tmp_path / "pair.png").convert("L"))
    assert frame.shape == (440, 500) and pair.shape == (440, 900)
    assert frame[100, 200] < 30 and frame[380, 200] > 225
    assert pair[100, 200] < 30 and pair[380, 200] < 30  # Initial: all unconnected
    assert pair[120, 600] < 30 and pair[380, 600] > 225  # Final


def test_records_sorted_by_step_and_other_files_ignored(tmp_path):
    rng = np.random.default_rng(1)
    for step in (10, 2, 0):
        save_record(tmp_path, step, *random_pattern(rng, 1))
    (tmp_path / "notes.txt").write_text("not a record")
    (tmp_path / "weights_fc2_000000.npz").write_bytes(b"other layer")
    assert [step for step, _ in vc.load_records(tmp_path)] == [0, 2, 10]


@pytest.mark.parametrize("block_size", [1, 4])
def test_initial_final_png(tmp_path, capsys, block_size):
    records = tmp_path / "records"
    patterns = write_run(records, block_size)
    assert vc.main(["--records-path", str(records)]) == 0
    assert (records / "connectivity.png").is_file()
    assert not list(records.glob("connectivity_*.png"))
    unconnected = int((reference_counts(*patterns[-1][:2], block_size) == 0).sum())
    out = capsys.readouterr().out
    assert f"{unconnected} of 784 pixels are unconnected" in out
    assert str(records) in out


def test_animate_writes_one_frame_per_record(tmp_path, capsys):
    records, output = tmp_path / "records", tmp_path / "pictures"
    write_run(records, block_size=4, steps=5)
    assert vc.main(["--records-path", str(records), "--animate",
                    "--cmap", "viridis", "--output-dir", str(output)]) == 0
    frames = sorted(output.glob("connectivity_*.png"))
    assert [f.name for f in frames] == [f"connectivity_{i:06d}.png" for i in range(6)]
    with Image.open(output / "connectivity.gif") as gif:
        assert gif.n_frames == 6
    assert not (records / "connectivity.gif").exists()
    assert str(output) in capsys.readouterr().out


def test_animate_single_record(tmp_path):
    write_run(tmp_path, block_size=1, steps=0)
    assert vc.main(["--records-path", str(tmp_path), "--animate"]) == 0
    with Image.open(tmp_path / "connectivity.gif") as gif:
        assert gif.n_frames == 1


def _bad_element_record(folder, **arrays):
    base = dict(row_indices=np.array([0, 1]), col_indices=np.array([0, 1]), values=np.ones(2))
    base.update(arrays)
    np.savez(folder / "weights_fc1_000000.npz", **{k: v for k, v in base.items() if v is not None})


def _make_bad(case, folder):
    """Create the records folder for one error case; returns the --records-path."""
    if case == "missing folder":
        return folder / "does_not_exist"
    folder.mkdir()
    if case == "no records":
        (folder / "readme.txt").write_text("empty run")
    elif case == "not npz":
        (folder / "weights_fc1_000000.npz").write_text("definitely not a zip")
    elif case == "truncated npz":
        _bad_element_record(folder, values=np.ones(2000), row_indices=np.arange(2000) % 784,
                            col_indices=np.arange(2000))
        path = folder / "weights_fc1_000000.npz"
        path.write_bytes(path.read_bytes()[:3000])
    elif case == "missing array":
        _bad_element_record(folder, col_indices=None)
    elif case == "row out of range":
        _bad_element_record(folder, row_indices=np.array([0, 784]))
    elif case == "block row out of range":
        np.savez(folder / "weights_fc1_000000.npz", row_indices=np.array([49]),
                 col_indices=np.array([0]), values=np.ones((1, 16, 16)), block_size=np.array(16))
    elif case == "negative index":
        _bad_element_record(folder, col_indices=np.array([0, -3]))
    elif case == "mismatched lengths":
        _bad_element_record(folder, col_indices=np.array([0, 1, 2]))
    elif case == "float indices":
        _bad_element_record(folder, row_indices=np.array([0.0, 1.0]))
    elif case == "bad block size":
        _bad_element_record(folder, values=np.ones((2, 3, 3)), block_size=np.array(3))
    elif case == "values vs block size":
        _bad_element_record(folder, values=np.ones((2, 4, 4)))
    elif case == "mixed block sizes":
        write_run(folder, block_size=1, steps=1)
        np.savez(folder / "weights_fc1_000002.npz", row_indices=np.array([0]),
                 col_indices=np.array([0]), values=np.ones((1, 4, 4)), block_size=np.array(4))
    else:
        raise AssertionError(case)
    return folder


ERROR_CASES = ["missing folder", "no records", "not npz", "truncated npz", "missing array",
               "row out of range", "block row out of range", "negative index",
               "mismatched lengths", "float indices", "bad block size",
               "values vs block size", "mixed block sizes"]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_input_is_one_line_error(tmp_path, capsys, case):
    records = _make_bad(case, tmp_path / "records")
    assert vc.main(["--records-path", str(records)]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("visualise_connectivity: error: ")
    assert not list(tmp_path.rglob("connectivity*"))


def test_script_runs_as_command(tmp_path):
    """Exit codes and stderr of the real command line, without importing the module."""
    helped = subprocess.run([sys.executable, str(SCRIPT), "--help"],
                            capture_output=True, text=True, check=True)
    assert "--records-path" in helped.stdout and "--animate" in helped.stdout

    bad = _make_bad("truncated npz", tmp_path / "bad")
    failed = subprocess.run([sys.executable, str(SCRIPT), "--records-path", str(bad)],
                            capture_output=True, text=True)
    assert failed.returncode != 0
    assert len(failed.stderr.strip().splitlines()) == 1
    assert "Traceback" not in failed.stderr

    good = tmp_path / "good"
    write_run(good, block_size=16, steps=1)
    ran = subprocess.run([sys.executable, str(SCRIPT), "--records-path", str(good)],
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert "pixels are unconnected" in ran.stdout
    assert (good / "connectivity.png").is_file()


# --- Dense .npy records of the original Graphcore example -------------------


def write_dense_run(folder, steps=3, seed=0, permutation=None, hidden=HIDDEN, dtype=np.float64):
    """Dense [784, hidden] weights as the original saved them; returns the matrices.

    Rows are in network input order: with a permutation, row j is image pixel
    permutation[j]. Some rows are left empty so unconnected pixels show up.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    matrices = []
    for step in range(steps + 1):
        dense = rng.normal(size=(784, hidden)) * (rng.random((784, hidden)) < 0.1)
        dense[rng.choice(784, size=50, replace=False)] = 0
        dense = dense.astype(dtype)
        np.save(folder / f"weights_fc1_{step:06d}.npy", dense)
        matrices.append(dense)
    if permutation is not None:
        np.save(folder / "pixel_permutation.npy", permutation)
    return matrices


def image_order_counts(dense, permutation):
    """Independent reference: permute the network input back, then count per pixel."""
    x = np.arange(784)  # a "flattened image" whose entries are pixel numbers
    seen = x[permutation]  # what the network's input row j held: pixel permutation[j]
    counts = np.zeros(784, int)
    for j in range(784):
        counts[seen[j]] = np.count_nonzero(dense[j])
    return counts.reshape(28, 28)


def drawn_counts(monkeypatch, argv):
    """Run main and capture the count images it hands to the plotting functions."""
    drawn = []
    real_frame, real_pair = vc.plot_frame, vc.plot_initial_final

    def frame(counts, *args, **kwargs):
        drawn.append(counts)
        return real_frame(counts, *args, **kwargs)

    def pair(initial, final, *args, **kwargs):
        drawn.extend([initial, final])
        return real_pair(initial, final, *args, **kwargs)

    monkeypatch.setattr(vc, "plot_frame", frame)
    monkeypatch.setattr(vc, "plot_initial_final", pair)
    assert vc.main(argv) == 0
    return drawn


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_dense_records_with_permutation_are_drawn_in_image_order(tmp_path, monkeypatch,
                                                                   capsys, dtype):
    permutation = np.random.default_rng(7).permutation(784)
    matrices = write_dense_run(tmp_path, steps=3, permutation=permutation, dtype=dtype)
    drawn = drawn_counts(monkeypatch, ["--records-path", str(tmp_path), "--animate"])
    expected = [image_order_counts(m, permutation) for m in matrices]
    assert len(drawn) == 4
    for got, want, dense in zip(drawn, expected, matrices):
        np.testing.assert_array_equal(got, want)
        # The permutation matters: input-order counts would be a different picture.
        assert not np.array_equal(got, (dense != 0).sum(axis=1).reshape(28, 28))
    frames = sorted(tmp_path.glob("connectivity_*.png"))
    assert [f.name for f in frames] == [f"connectivity_{i:06d}.png" for i in range(4)]
    with Image.open(tmp_path / "connectivity.gif") as gif:
        assert gif.n_frames == 4
    out = capsys.readouterr().out
    assert "Undid the input pixel permutation" in out
    unconnected = int((expected[-1] == 0).sum())
    assert f"{unconnected} of 784 pixels are unconnected" in out


def test_dense_records_initial_final_png(tmp_path, monkeypatch):
    permutation = np.random.default_rng(3).permutation(784)
    matrices = write_dense_run(tmp_path, steps=2, permutation=permutation)
    drawn = drawn_counts(monkeypatch, ["--records-path", str(tmp_path)])
    np.testing.assert_array_equal(drawn[0], image_order_counts(matrices[0], permutation))
    np.testing.assert_array_equal(drawn[1], image_order_counts(matrices[-1], permutation))
    assert (tmp_path / "connectivity.png").is_file()


def test_dense_records_without_permutation_count_non_zeros(tmp_path):
    matrices = write_dense_run(tmp_path, steps=1)
    records = vc.load_records(tmp_path)
    assert vc.load_permutation(tmp_path) is None
    assert [step for step, _ in records] == [0, 1]
    for (_, record), dense in zip(records, matrices):
        np.testing.assert_array_equal(vc.connections_per_pixel(record),
                                      (dense != 0).sum(axis=1).reshape(28, 28))


def test_permutation_is_undone_for_npz_records(tmp_path, monkeypatch):
    patterns = write_run(tmp_path, block_size=4, steps=1)
    permutation = np.random.default_rng(5).permutation(784)
    np.save(tmp_path / "pixel_permutation.npy", permutation)
    drawn = drawn_counts(monkeypatch, ["--records-path", str(tmp_path)])
    for got, (rows, cols, _) in zip(drawn, (patterns[0], patterns[-1])):
        in_input_order = reference_counts(rows, cols, 4).reshape(-1)
        expected = np.zeros(784, int)
        for j in range(784):
            expected[permutation[j]] = in_input_order[j]
        np.testing.assert_array_equal(got, expected.reshape(28, 28))


def test_permutation_moves_a_known_pixel():
    # The network's input 0 held image pixel 29 (row 1, column 1): its count goes there.
    # A 3-cycle, so that applying the permutation the wrong way round fails.
    permutation = np.arange(784)
    permutation[[0, 29, 5]] = [29, 5, 0]
    record = vc.Record(np.array([0, 0, 0]), np.array([0, 1, 2]), np.ones(3))
    counts = vc.connections_per_pixel(record, permutation)
    assert counts[1, 1] == 3 and counts[0, 0] == 0 and counts.sum() == 3


def test_npz_records_take_precedence_over_npy(tmp_path):
    write_dense_run(tmp_path, steps=4)
    write_run(tmp_path, block_size=16, steps=1)
    records = vc.load_records(tmp_path)
    assert [step for step, _ in records] == [0, 1]
    assert records[0][1].block_size == 16


def _make_bad_dense(case, folder):
    """Create the records folder for one error case of the original's .npy records."""
    folder.mkdir()
    if case == "corrupt npy":
        (folder / "weights_fc1_000000.npy").write_bytes(b"\x93NUMPY garbage")
    elif case == "truncated npy":
        write_dense_run(folder, steps=0)
        path = folder / "weights_fc1_000000.npy"
        path.write_bytes(path.read_bytes()[:5000])
    elif case == "npz named npy":
        np.savez(folder / "weights_fc1_000000.npy", a=np.ones(3))
        (folder / "weights_fc1_000000.npy.npz").rename(folder / "weights_fc1_000000.npy")
    elif case == "pickled npy":
        np.save(folder / "weights_fc1_000000.npy", np.array([{}], dtype=object))
    elif case == "dense wrong rows":
        np.save(folder / "weights_fc1_000000.npy", np.ones((783, HIDDEN)))
    elif case == "dense 1-d":
        np.save(folder / "weights_fc1_000000.npy", np.ones(784))
    elif case == "dense mixed shapes":
        write_dense_run(folder, steps=1)
        np.save(folder / "weights_fc1_000002.npy", np.ones((784, HIDDEN + 1)))
    elif case == "dense strings":
        np.save(folder / "weights_fc1_000000.npy", np.full((784, 2), "x"))
    elif case == "permutation repeats":
        write_dense_run(folder, steps=0, permutation=np.zeros(784, int))
    elif case == "permutation too short":
        write_dense_run(folder, steps=0, permutation=np.arange(783))
    elif case == "permutation out of range":
        write_dense_run(folder, steps=0, permutation=np.arange(1, 785))
    elif case == "permutation floats":
        write_dense_run(folder, steps=0, permutation=np.arange(784.0))
    elif case == "permutation corrupt":
        write_dense_run(folder, steps=0)
        (folder / "pixel_permutation.npy").write_bytes(b"not numpy")
    elif case == "permutation with npz records":
        write_run(folder, block_size=1, steps=1)
        np.save(folder / "pixel_permutation.npy", np.arange(784).reshape(28, 28))
    else:
        raise AssertionError(case)
    return folder


DENSE_ERROR_CASES = ["corrupt npy", "truncated npy", "npz named npy", "pickled npy",
                     "dense wrong rows", "dense 1-d", "dense mixed shapes", "dense strings",
                     "permutation repeats", "permutation too short",
                     "permutation out of range", "permutation floats", "permutation corrupt",
                     "permutation with npz records"]


@pytest.mark.parametrize("case", DENSE_ERROR_CASES)
def test_bad_dense_input_is_one_line_error(tmp_path, capsys, case):
    records = _make_bad_dense(case, tmp_path / "records")
    assert vc.main(["--records-path", str(records)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("visualise_connectivity: error: ")
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("connectivity*"))


def test_dense_records_from_the_command_line(tmp_path):
    """Real exit codes for the original's records: a bad permutation, then a good run."""
    folder = tmp_path / "run"
    write_dense_run(folder, steps=1, permutation=np.arange(784)[::-1].copy())
    ran = subprocess.run([sys.executable, str(SCRIPT), "--records-path", str(folder)],
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert "Undid the input pixel permutation" in ran.stdout
    assert (folder / "connectivity.png").is_file()

    np.save(folder / "pixel_permutation.npy", np.arange(700))
    failed = subprocess.run([sys.executable, str(SCRIPT), "--records-path", str(folder)],
                            capture_output=True, text=True)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        "visualise_connectivity: error: pixel_permutation.npy: not a permutation of "
        "0..783 (700 entries, 700 distinct, values 0..699)"]
