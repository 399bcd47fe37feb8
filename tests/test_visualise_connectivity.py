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
