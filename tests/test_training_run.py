"""Tests for ipu_sparse_ops/training_run.py's command-line and file helpers (the
scripts' own tests run them end to end)."""

import os

import pytest

from ipu_sparse_ops.cli import ArgumentParser
from ipu_sparse_ops.training_run import (
    TEMP_PREFIX, TrainingError, UsageError, check_writable_dir, parse_flags, remove_stale_temps,
    report_failure, write_atomically)


def test_check_failure_reads_like_a_bad_flag(capsys):
    parser = ArgumentParser(prog="script.py")
    parser.add_argument("--n", type=int, default=1)

    def check(args):
        if args.n < 1:
            raise UsageError(f"--n must be >= 1, got {args.n}")

    assert parse_flags(parser, ["--n", "3"], check).n == 3
    for argv, message in ((["--n", "0"], "--n must be >= 1, got 0"),
                          (["--n", "x"], "argument --n: invalid int value: 'x'")):
        with pytest.raises(SystemExit) as exit_info:
            parse_flags(parser, argv, check)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"script.py: error: {message}\n"


@pytest.mark.parametrize("error, status, line", [
    (UsageError("bad flag"), 2, "p.py: error: bad flag"),
    (TrainingError("NaN loss"), 1, "p.py: training stopped: NaN loss"),
    (OSError("disk full"), 1, "p.py: error: disk full"),
    (RuntimeError("no data"), 1, "p.py: error: no data"),
])
def test_report_failure(error, status, line, capsys):
    assert report_failure("p.py", error) == status
    assert capsys.readouterr() == ("", line + "\n")


def test_writable_dir_and_stale_temps(tmp_path):
    folder = tmp_path / "a" / "b"
    check_writable_dir(folder, "--out")  # made, and left without temp files
    assert folder.is_dir() and not list(folder.iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UsageError, match=r"^--out .*file/x is not a writable folder \(.+\)$"):
        check_writable_dir(blocker / "x", "--out")

    write_atomically(folder / "kept.bin", lambda f: f.write(b"data"))
    (folder / f"{TEMP_PREFIX}kept.bin1234").write_bytes(b"half")  # what a kill leaves
    remove_stale_temps(folder)
    assert [p.name for p in folder.iterdir()] == ["kept.bin"]
    assert (folder / "kept.bin").read_bytes() == b"data"


def test_write_atomically_mode(tmp_path):
    old_umask = os.umask(0o027)
    try:
        write_atomically(tmp_path / "usual", lambda f: f.write(b"x"))
        write_atomically(tmp_path / "shared", lambda f: f.write(b"x"), mode=0o644)
    finally:
        os.umask(old_umask)
    assert (tmp_path / "usual").stat().st_mode & 0o777 == 0o640  # 0666 less the umask
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o644


def test_batch_dataset_cuts_keyed_passes_and_resumes_at_any_step():
    """Step g is batch g % B of pass g // B, each pass a permutation (no image twice);
    a dataset started at step k yields what the full one yields from step k on."""
    import numpy as np

    from ipu_sparse_ops.training_run import batch_dataset

    x = np.arange(10, dtype=np.int32)
    y = -x

    def steps(first_step, count, seed=7):
        data = batch_dataset(x, y, batch_size=3, batches_per_pass=3, seed=seed,
                             first_step=first_step)
        return [(xb.numpy(), yb.numpy()) for xb, yb in data.take(count)]

    full = steps(0, 9)
    for xb, yb in full:
        np.testing.assert_array_equal(yb, -xb)
    passes = [np.concatenate([xb for xb, _ in full[p * 3:p * 3 + 3]]) for p in range(3)]
    for images in passes:
        assert len(set(images)) == 9  # 9 of the 10, each at most once
    assert not all(np.array_equal(passes[0], other) for other in passes[1:])
    for first in (1, 3, 5):
        for (a, _), (b, _) in zip(steps(first, 9 - first), full[first:]):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(steps(0, 3, seed=8)[0][0], full[0][0])
    with pytest.raises(ValueError, match="need more than 10 samples"):
        batch_dataset(x, y, batch_size=3, batches_per_pass=4, seed=0)
