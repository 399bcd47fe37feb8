"""Plot how Rig-L rewires the first MNIST layer: connections per input pixel.

The training script saves fc1's sparsity pattern after every Rig-L update as
`weights_fc1_{step:06d}.npz` (step 000000 is the initial pattern). fc1's weight
is [784, hidden], so its row index is an input pixel of the flattened 28x28
image. Counting the non-zeros in each row and folding the counts back into
28x28 shows which parts of the image the network has chosen to look at.

Records of the original Graphcore example also work: it saved fc1 as a dense
[784, hidden] matrix, `weights_fc1_{step:06d}.npy`, counted here by its
non-zeros, and saved `pixel_permutation.npy` (its `--permute-input`, applied as
x[:, perm]). When that file is present, for either kind of record, the counts
are put back in image order so the pictures show the digit's layout.

Examples:
    python -m mnist_rigl.visualise_connectivity --records-path rigl_records
    python -m mnist_rigl.visualise_connectivity --records-path rigl_records --animate
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

IMAGE_SHAPE = (28, 28)
NUM_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
RECORD_NAME = re.compile(r"^weights_fc1_(\d{6,})\.npz$")
DENSE_RECORD_NAME = re.compile(r"^weights_fc1_(\d{6,})\.npy$")
PERMUTATION_FILE = "pixel_permutation.npy"
REQUIRED_ARRAYS = ("row_indices", "col_indices", "values")
GIF_FRAME_MS = 400
GIF_FINAL_FRAME_MS = 2000  # linger on the final pattern before the loop restarts


class RecordError(Exception):
    """Bad or inconsistent records; the message is one line meant for the user."""


@dataclass(frozen=True, eq=False)
class Record:
    """fc1's sparsity pattern at one Rig-L step (validated on construction).

    Indices are element coordinates when `block_size` is 1, else block
    coordinates with `values` of shape [n, block_size, block_size].
    """

    row_indices: np.ndarray
    col_indices: np.ndarray
    values: np.ndarray
    block_size: int = 1

    def __post_init__(self):
        bs = self.block_size
        if bs < 1 or NUM_PIXELS % bs:
            raise RecordError(f"block_size {bs} does not tile {NUM_PIXELS} pixels")
        for name in ("row_indices", "col_indices"):
            indices = getattr(self, name)
            if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
                raise RecordError(f"{name} must be a 1-D integer array, got "
                                  f"{indices.dtype} of shape {list(indices.shape)}")
        n = len(self.row_indices)
        if len(self.col_indices) != n or self.values.shape[:1] != (n,):
            raise RecordError(
                f"mismatched lengths: row_indices {n}, col_indices "
                f"{len(self.col_indices)}, values {list(self.values.shape)}")
        allowed = [(bs, bs), ()] if bs == 1 else [(bs, bs)]
        if self.values.shape[1:] not in allowed:
            raise RecordError(f"values of shape {list(self.values.shape)} do not match "
                              f"block_size {bs} (want [n] or [n, {bs}, {bs}])")
        row_limit = NUM_PIXELS // bs
        if n and (self.row_indices.min() < 0 or self.row_indices.max() >= row_limit):
            unit = "row" if bs == 1 else "block row"
            raise RecordError(f"{unit} indices must lie in [0, {row_limit}) for "
                              f"{NUM_PIXELS} pixels, got {self.row_indices.min()}.."
                              f"{self.row_indices.max()}")
        if n and self.col_indices.min() < 0:
            raise RecordError(f"negative col index {self.col_indices.min()}")

    @property
    def layout(self) -> tuple[int, tuple[int, ...]]:
        """What must agree between records of one run: block size and value shape."""
        return self.block_size, self.values.shape[1:]


def read_record(path: str | os.PathLike) -> Record:
    """Load and check one .npz record; any defect becomes a one-line RecordError."""
    path = Path(path)
    # np.load would also accept .npy and pickles; insist on the archive we expect.
    if not zipfile.is_zipfile(path):
        raise RecordError(f"{path.name}: not an .npz (zip) archive")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in REQUIRED_ARRAYS if name not in data.files]
            if missing:
                raise RecordError(f"{path.name}: missing array(s) {', '.join(missing)}")
            arrays = {name: data[name] for name in REQUIRED_ARRAYS}
            block_size = data["block_size"] if "block_size" in data.files else np.array(1)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise RecordError(f"{path.name}: not a readable .npz file ({error})") from None
    if block_size.size != 1 or not np.issubdtype(block_size.dtype, np.integer):
        raise RecordError(f"{path.name}: block_size must be a single integer, "
                          f"got {block_size.dtype} of shape {list(block_size.shape)}")
    try:
        return Record(**arrays, block_size=int(block_size.item()))
    except RecordError as error:
        raise RecordError(f"{path.name}: {error}") from None


def read_npy(path: Path) -> np.ndarray:
    """Load one .npy array; np.load would also open .npz archives, so read the format directly."""
    try:
        with open(path, "rb") as file:
            return np.lib.format.read_array(file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        message = " ".join(str(error).split())  # keep it to one line
        raise RecordError(f"{path.name}: not a readable .npy file ({message})") from None


def read_dense_record(path: str | os.PathLike) -> np.ndarray:
    """Load and check one dense [784, hidden] weight matrix of the original example."""
    path = Path(path)
    dense = read_npy(path)
    if dense.ndim != 2 or dense.shape[0] != NUM_PIXELS:
        raise RecordError(f"{path.name}: dense weights must have shape [{NUM_PIXELS}, "
                          f"hidden], got {list(dense.shape)}")
    if not (np.issubdtype(dense.dtype, np.number) or dense.dtype == np.bool_):
        raise RecordError(f"{path.name}: dense weights must be numeric, got {dense.dtype}")
    return dense


def record_from_dense(dense: np.ndarray) -> Record:
    """The pattern of a dense matrix: its non-zeros (the original kept no other mask)."""
    row_indices, col_indices = np.nonzero(dense)
    return Record(row_indices, col_indices, dense[row_indices, col_indices])


def _record_files(path: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    return sorted((int(match[1]), child) for child in path.iterdir()
                  if (match := pattern.match(child.name)))


def load_records(path: str | os.PathLike) -> list[tuple[int, Record]]:
    """All records in a folder as (step, Record), ordered by step.

    Reads this project's .npz records; only if there are none, the original's
    dense .npy ones. Raises RecordError if the folder is missing or empty, a
    record is bad, or the records disagree on layout or shape (they would not
    belong to one run).
    """
    path = Path(path)
    if not path.is_dir():
        raise RecordError(f"records folder not found: {path}")
    files = _record_files(path, RECORD_NAME)
    if files:
        records = [(step, read_record(file)) for step, file in files]
    else:
        files = _record_files(path, DENSE_RECORD_NAME)
        if not files:
            raise RecordError(f"no weights_fc1_NNNNNN.npz or .npy records in {path}")
        records = []
        for step, file in files:
            dense = read_dense_record(file)
            if not records:
                first_shape = dense.shape
            elif dense.shape != first_shape:
                raise RecordError(
                    f"records of mixed shapes: {files[0][1].name} is "
                    f"{list(first_shape)}, {file.name} is {list(dense.shape)}")
            records.append((step, record_from_dense(dense)))
    first = records[0][1]
    for (_, file), (_, record) in zip(files, records):
        if record.layout != first.layout:
            raise RecordError(
                f"records of mixed layouts: {files[0][1].name} has block_size "
                f"{first.block_size} and values {_shape(first)}, {file.name} "
                f"has block_size {record.block_size} and values {_shape(record)}")
    return records


def load_permutation(path: str | os.PathLike) -> np.ndarray | None:
    """The input pixel permutation saved with the records, or None if there is none.

    Row j of fc1 then holds image pixel perm[j]; it must be a permutation of
    0..783, else the pictures would be silently wrong.
    """
    file = Path(path) / PERMUTATION_FILE
    if not file.exists():
        return None
    perm = read_npy(file)
    if perm.ndim != 1 or not np.issubdtype(perm.dtype, np.integer):
        raise RecordError(f"{file.name}: must be a 1-D integer array, got "
                          f"{perm.dtype} of shape {list(perm.shape)}")
    if len(perm) != NUM_PIXELS or not np.array_equal(np.sort(perm), np.arange(NUM_PIXELS)):
        span = f", values {perm.min()}..{perm.max()}" if len(perm) else ""
        raise RecordError(f"{file.name}: not a permutation of 0..{NUM_PIXELS - 1} "
                          f"({len(perm)} entries, {len(np.unique(perm))} distinct{span})")
    return perm


def _shape(record: Record) -> str:
    return "[" + ", ".join(["n", *map(str, record.values.shape[1:])]) + "]"


def connections_per_pixel(record: Record, permutation: np.ndarray | None = None) -> np.ndarray:
    """Number of hidden units each input pixel feeds, as a 28x28 int image.

    Counts the pattern, not non-zero values: Rig-L grows connections at zero.
    A block at block row bi gives each of pixels bi*bs .. bi*bs+bs-1 one
    connection per column of the block, i.e. bs each. With a `permutation`
    (the network saw x[:, permutation]), row j's count belongs to image pixel
    permutation[j].
    """
    bs = record.block_size
    per_block_row = np.bincount(record.row_indices, minlength=NUM_PIXELS // bs)
    per_row = np.repeat(per_block_row * bs, bs)
    if permutation is not None:
        per_pixel = np.empty_like(per_row)
        per_pixel[permutation] = per_row
        per_row = per_pixel
    return per_row.reshape(IMAGE_SHAPE)


def _draw_heat_map(ax, counts: np.ndarray, title: str, cmap: str,
                   vmin: float, vmax: float):
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    # origin="upper" keeps pixel row 0 at the top, as the digit is drawn.
    return ax.imshow(counts, cmap=cmap, vmin=vmin, vmax=vmax, origin="upper",
                     interpolation="nearest")


def plot_initial_final(initial: np.ndarray, final: np.ndarray, initial_step: int,
                       final_step: int, path: str | os.PathLike,
                       cmap: str = "magma") -> None:
    """Save side-by-side Initial/Final heat maps on one colour scale with one colour bar."""
    vmin = min(initial.min(), final.min())
    vmax = max(initial.max(), final.max())
    fig = Figure(figsize=(9, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    fig.suptitle("MNIST: Connections per pixel "
                 f"(rig-l steps: {initial_step} \u2192 {final_step})")
    images = [_draw_heat_map(ax, counts, title, cmap, vmin, vmax)
              for ax, counts, title in zip(axes, (initial, final), ("Initial", "Final"))]
    fig.colorbar(images[0], ax=list(axes), label="connections", shrink=0.9)
    fig.savefig(path, dpi=100)


def plot_frame(counts: np.ndarray, step: int, path: str | os.PathLike,
               cmap: str = "magma", vmin: float | None = None,
               vmax: float | None = None) -> None:
    """Save one animation frame; pass a shared vmin/vmax so frames are comparable."""
    fig = Figure(figsize=(5, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    title = f"MNIST: Connections per pixel (rig-l steps: {step})"
    image = _draw_heat_map(ax, counts, title, cmap,
                           counts.min() if vmin is None else vmin,
                           counts.max() if vmax is None else vmax)
    fig.colorbar(image, ax=ax, label="connections")
    fig.savefig(path, dpi=100)


def write_gif(frame_paths: Sequence[str | os.PathLike], gif_path: str | os.PathLike,
              frame_ms: int = GIF_FRAME_MS, final_frame_ms: int = GIF_FINAL_FRAME_MS) -> None:
    """Assemble PNG frames into a looping GIF with Pillow (no ImageMagick needed)."""
    frames = []
    for path in frame_paths:
        with Image.open(path) as frame:
            frames.append(frame.convert("RGB"))
    durations = [frame_ms] * (len(frames) - 1) + [final_frame_ms]
    frames[0].save(gif_path, save_all=True, append_images=frames[1:],
                   duration=durations, loop=0)


def _colormap(name: str) -> str:
    if name not in matplotlib.colormaps:
        raise argparse.ArgumentTypeError(f"unknown matplotlib colormap {name!r}")
    return name


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line: where the records are, what to draw and where to put it."""
    parser = argparse.ArgumentParser(
        description="Draw the number of fc1 connections per MNIST input pixel "
                    "(a 28x28 heat map) from the weights_fc1_NNNNNN.npz records "
                    "written by sparse_mnist.py during Rig-L training, or the "
                    "original example's dense weights_fc1_NNNNNN.npy records.")
    parser.add_argument("--records-path", type=Path, required=True,
                        help="folder holding the weights_fc1_NNNNNN.npz (or .npy) "
                             "records; a pixel_permutation.npy in it is undone")
    parser.add_argument("--animate", action="store_true",
                        help="draw every record as connectivity_NNNNNN.png on one "
                             "colour scale and join them into connectivity.gif; "
                             "without it, draw only the first and last record "
                             "side by side in connectivity.png")
    parser.add_argument("--cmap", type=_colormap, default="magma",
                        help="matplotlib colormap (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where to write the pictures (default: the records folder)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors are one line on stderr)."""
    args = parse_args(argv)
    try:
        records = load_records(args.records_path)
        permutation = load_permutation(args.records_path)
    except RecordError as error:
        print(f"visualise_connectivity: error: {error}", file=sys.stderr)
        return 1
    steps = [step for step, _ in records]
    counts = [connections_per_pixel(record, permutation) for _, record in records]
    print(f"Loaded {len(records)} records (rig-l steps {steps[0]}..{steps[-1]}, "
          f"block_size {records[0][1].block_size}) from {args.records_path}")
    if permutation is not None:
        print(f"Undid the input pixel permutation in {PERMUTATION_FILE}")

    output_dir = args.output_dir or args.records_path
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        if args.animate:
            vmin = min(c.min() for c in counts)
            vmax = max(c.max() for c in counts)
            frame_paths = [output_dir / f"connectivity_{i:06d}.png" for i in range(len(counts))]
            for path, step, frame in zip(frame_paths, steps, counts):
                plot_frame(frame, step, path, args.cmap, vmin, vmax)
            gif_path = output_dir / "connectivity.gif"
            write_gif(frame_paths, gif_path)
            written = (f"{len(frame_paths)} frames {frame_paths[0].name} .. "
                       f"{frame_paths[-1].name} and {gif_path.name}")
        else:
            png_path = output_dir / "connectivity.png"
            plot_initial_final(counts[0], counts[-1], steps[0], steps[-1], png_path,
                               args.cmap)
            written = png_path.name
    except OSError as error:
        print(f"visualise_connectivity: error: cannot write pictures: {error}",
              file=sys.stderr)
        return 1

    unconnected = int(np.count_nonzero(counts[-1] == 0))
    print(f"Final record (rig-l steps: {steps[-1]}): {unconnected} of {NUM_PIXELS} "
          f"pixels are unconnected")
    print(f"Wrote {written} to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
