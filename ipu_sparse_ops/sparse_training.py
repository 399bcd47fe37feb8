"""Rig-L on the host: prune, regrow and their schedules, in plain numpy on triplets.

Rig-L ("Rigging the Lottery", Evci et al. 2020, arXiv 1911.11134) keeps the
number of non-zeros fixed: at each pattern update it drops the k weakest
connections and grows k new ones where the dense gradient is largest. SET
does the same but grows at random. Both share one mechanism here
(`prune_and_regrow`); only the score that ranks candidate positions differs.

Everything works on `Triplets` with no TensorFlow, so the logic is testable in
milliseconds. For block sparsity the indices are block coordinates, `values` is
[n, bs, bs] and the gradient is the op's block-pooled [input_blocks,
output_blocks] one; element-wise, `values` is [n] and the gradient is
[input_size, output_size].

When to update and how many connections to move are separate concerns:
`UpdateSchedule` answers the first, the prune-count schedules
(`prune_schedule`) the second.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import operator
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ipu_sparse_ops.sparse import Triplets


def smallest(keys: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest of `keys`, ties to the lower index, in ascending order
    of (key, index): `np.argsort(keys, kind="stable")[:k]` in linear time, since an
    update ranks every unconnected position (10^5 and more) to move a few thousand."""
    keys = np.asarray(keys).ravel()
    k = operator.index(k)
    if k >= keys.size or np.isnan(keys).any():  # a partition cannot rank NaN
        return np.argsort(keys, kind="stable")[:k]
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    kth = _kth_smallest(keys, k)
    below = np.flatnonzero(keys < kth)
    # Both parts ascend by index, so the stable sort breaks ties by it.
    chosen = np.concatenate([below, np.flatnonzero(keys == kth)[:k - below.size]])
    return chosen[np.argsort(keys[chosen], kind="stable")]


_SAMPLE_SIZE = 2048


def _kth_smallest(keys: np.ndarray, k: int) -> float:
    """The k-th smallest key (1-based), exactly; NaN-free keys.

    A partition of 2 * 10^5 keys costs about 2 ms, most of an update. So a strided
    sample first bounds the k-th key from above, and only the keys at or below that
    bound, a few times k, are partitioned. Were fewer than k of them at or below it
    (a sample unlike the whole), the whole is partitioned.
    """
    stride = keys.size // _SAMPLE_SIZE
    if stride >= 4:
        sample = keys[::stride]
        # Twice the sample's share of k, and some: an unlucky sample rarely falls short.
        rank = min(sample.size - 1, 2 * k // stride + 16)
        bound = np.partition(sample, rank)[rank]
        at_or_below = keys[keys <= bound]
        if at_or_below.size >= k:  # then they hold the k smallest
            return np.partition(at_or_below, k - 1)[k - 1]
    return np.partition(keys, k - 1)[k - 1]



def prune(triplets: Triplets, k: int) -> np.ndarray:
    """Indices of the connections left after dropping the k of smallest magnitude.

    A block's magnitude is the sum of |w| over the block. Ties go by position:
    among equal magnitudes the earlier connection is dropped first, so the
    result never depends on the sort algorithm. The survivors come back in
    their original order.
    """
    nnz = len(triplets.values)
    k = operator.index(k)
    if not 0 <= k <= nnz:
        raise ValueError(f"prune count must be in [0, {nnz}] (the non-zero count), got {k}")
    # float64 so that summing a float16 block cannot overflow and tie falsely.
    magnitudes = np.abs(triplets.values.astype(np.float64)).reshape(nnz, -1).sum(axis=1)
    kept = np.ones(nnz, dtype=bool)
    kept[smallest(magnitudes, k)] = False
    return np.flatnonzero(kept)


def _gradient_scores(shape: tuple[int, int], grad: np.ndarray | None,
                     rng: np.random.Generator | None) -> np.ndarray:
    """Rig-L: grow where |dL/dW| is largest, the connections that would cut the loss fastest."""
    if grad is None:
        raise ValueError("regrow='rigl' needs the dense gradient (grad)")
    grad = np.asarray(grad)
    if grad.shape != shape:
        raise ValueError(f"dense gradient has shape {grad.shape}, expected {shape}")
    if not np.all(np.isfinite(grad)):
        # Ranking NaNs would grow arbitrary connections; stop training instead.
        raise ValueError(
            f"dense gradient contains {np.count_nonzero(~np.isfinite(grad))} NaN/Inf "
            "entries; refusing to regrow from it")
    return np.abs(grad)


def _random_scores(shape: tuple[int, int], grad: np.ndarray | None,
                   rng: np.random.Generator | None) -> np.ndarray:
    """SET: i.i.d. uniform scores, so the top k unconnected positions are a uniform random pick."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError("regrow='random' needs a seeded np.random.Generator (rng)")
    return rng.random(shape)


_GROW_SCORES = {"rigl": _gradient_scores, "random": _random_scores}
REGROW_METHODS = tuple(_GROW_SCORES)


def prune_and_regrow(triplets: Triplets, n_prune: int, regrow: str, *,
                     shape: tuple[int, int], grad: np.ndarray | None = None,
                     rng: np.random.Generator | None = None) -> tuple[Triplets, np.ndarray]:
    """One pattern update: drop the n_prune weakest connections, grow as many new ones.

    New connections are chosen among positions that were unconnected *before*
    this update, so a connection just pruned cannot come straight back. They
    are ranked by their score, highest first, ties by row-major position, and
    start with value 0.

    Asking to grow more connections than there are unconnected positions raises
    rather than clipping: a silently smaller update would hide a misconfigured
    prune ratio or density.

    Args:
        triplets: current pattern; indices are (block) coordinates within shape.
        n_prune: number of connections to move, 0 <= n_prune <= non-zero count.
        regrow: "rigl" (largest |grad|) or "random" (uniform, from rng).
        shape: (input_blocks, output_blocks), or (input_size, output_size)
            element-wise.
        grad: dense gradient of shape `shape`, block-pooled for blocks; rigl
            only. NaN or Inf raises ValueError.
        rng: seeded generator; random only.

    Returns:
        The new triplets (kept connections in their old order, then the grown
        ones) and kept_from: for each new connection its index in the old
        triplets, or -1 if it was grown. Pass kept_from to `follow_pattern` to
        carry optimizer slots over.
    """
    if regrow not in _GROW_SCORES:
        raise ValueError(f"unknown regrow method {regrow!r}; expected one of {REGROW_METHODS}")
    nnz = len(triplets.values)
    if not len(triplets.row_indices) == len(triplets.col_indices) == nnz:
        raise ValueError(
            f"triplets disagree on their length: {len(triplets.row_indices)} rows, "
            f"{len(triplets.col_indices)} columns, {nnz} values")
    shape = tuple(shape)
    connected = np.ravel_multi_index((triplets.row_indices, triplets.col_indices), shape)
    unconnected = np.ones(math.prod(shape), dtype=bool)
    unconnected[connected] = False
    candidates = np.flatnonzero(unconnected)
    if unconnected.size - candidates.size != nnz:
        raise ValueError("triplets hold the same position more than once")
    kept = prune(triplets, n_prune)
    if n_prune > candidates.size:
        raise ValueError(
            f"cannot grow {n_prune} connections: only {candidates.size} of the "
            f"{unconnected.size} positions are unconnected")

    scores = _GROW_SCORES[regrow](shape, grad, rng).ravel()[candidates]
    grown = candidates[smallest(-scores, n_prune)]

    kept_from = np.concatenate([kept, np.full(len(grown), -1)])
    grown_rows, grown_cols = np.unravel_index(grown, shape)
    new_triplets = Triplets(
        np.concatenate([triplets.row_indices[kept],
                        grown_rows.astype(triplets.row_indices.dtype)]),
        np.concatenate([triplets.col_indices[kept],
                        grown_cols.astype(triplets.col_indices.dtype)]),
        follow_pattern(triplets.values, kept_from))
    return new_triplets, kept_from


def follow_pattern(slot: np.ndarray, kept_from: np.ndarray) -> np.ndarray:
    """Re-align per-connection values (weights or optimizer slots) with a new pattern.

    Kept connections keep their values; grown ones (kept_from == -1) start at
    zero, so a new weight's momentum or Adam moments do not inherit another
    connection's history. Works for [n] and [n, bs, bs].
    """
    kept_from = np.asarray(kept_from)
    aligned = np.zeros((len(kept_from),) + slot.shape[1:], dtype=slot.dtype)
    is_kept = kept_from >= 0
    aligned[is_kept] = slot[kept_from[is_kept]]
    return aligned


@dataclass(frozen=True)
class UpdateSchedule:
    """Which training steps update the pattern: every `interval` steps, `num_updates` times.

    `step` counts the training steps completed so far. The first update comes
    after `begin_step + interval` steps. `update_index` numbers the updates
    t = 1 .. num_updates, which is what the prune-count schedules take
    (with T = num_updates).
    """

    interval: int
    num_updates: int
    begin_step: int = 0

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.num_updates < 0 or self.begin_step < 0:
            raise ValueError(
                f"num_updates and begin_step must be >= 0, got {self.num_updates} "
                f"and {self.begin_step}")

    def is_update_step(self, step: int) -> bool:
        """Whether the pattern changes after `step` completed training steps."""
        done = step - self.begin_step
        return done > 0 and done % self.interval == 0 and done // self.interval <= self.num_updates

    def update_index(self, step: int) -> int:
        """t of the update due after `step` steps; ValueError if none is due."""
        if not self.is_update_step(step):
            raise ValueError(f"step {step} is not a pattern update step")
        return (step - self.begin_step) // self.interval


def _ceil(x: float) -> int:
    # Values that are integers in exact arithmetic can land a hair above in
    # floating point (0.07 * 100, or 0.5 * 4 * (1 + cos(2 * pi / 3))); a plain ceil
    # would then move one connection too many.
    return math.ceil(x - 1e-9)


def _check_schedule_args(t: int, T: int, prune_ratio: float, nnz: int) -> None:
    if T < 1 or not 0 <= t <= T:
        raise ValueError(f"need T >= 1 and 0 <= t <= T, got t={t}, T={T}")
    if not 0.0 <= prune_ratio <= 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1], got {prune_ratio}")
    if nnz < 0:
        raise ValueError(f"nnz must be >= 0, got {nnz}")


def constant_prune_count(t: int, T: int, prune_ratio: float, nnz: int) -> int:
    """ceil(prune_ratio * nnz) at every update, as in SET."""
    _check_schedule_args(t, T, prune_ratio, nnz)
    return _ceil(prune_ratio * nnz)


def cosine_schedule(t: int, T: int, *, zero_steps: int = 0, phase_delay: float = 0.0,
                    period: float = 0.5) -> float:
    """The original's cosine schedule: the fraction of the prune ratio update t of T moves.

    Updates are numbered t = 1 .. T. Those with t < zero_steps move nothing; the
    others follow 0.5 * (1 + cos(phase_delay + 2 pi * period * (t - zero_steps) /
    (T - zero_steps))), with phase_delay in radians and period in whole cosine
    cycles. The default (period 0.5, half a cycle) starts just under 1 at t = 1
    and reaches 0 at t = T.
    """
    if T < 1 or not 0 <= t <= T:
        raise ValueError(f"need T >= 1 and 0 <= t <= T, got t={t}, T={T}")
    if not 0 <= zero_steps < T:
        raise ValueError(f"zero_steps must be in [0, T={T}), got {zero_steps}")
    if t < zero_steps:
        return 0.0
    angle = phase_delay + period * ((t - zero_steps) * (2.0 * math.pi / (T - zero_steps)))
    return 0.5 * (1.0 + math.cos(angle))


def cosine_prune_count(t: int, T: int, prune_ratio: float, nnz: int, *, zero_steps: int = 0,
                       phase_delay: float = 0.0, period: float = 0.5) -> int:
    """ceil(ceil(prune_ratio * nnz) * cosine_schedule(t, T, ...)), as the original counts."""
    _check_schedule_args(t, T, prune_ratio, nnz)
    fraction = cosine_schedule(t, T, zero_steps=zero_steps, phase_delay=phase_delay,
                               period=period)
    return _ceil(_ceil(prune_ratio * nnz) * fraction)


COSINE_DEFAULTS = {"zero_steps": 0, "phase_delay": 0, "period": 0.5}  # the original's


def cosine_options(text: str) -> dict:
    """'{"zero_steps": 2}' (the --cosine-prune-schedule JSON) -> all three options.

    Missing keys take the original's defaults. ValueError, in one line, for
    JSON that is not an object of these keys with numbers (zero_steps a
    whole number >= 0).
    """
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(options, dict):
        raise ValueError('must be a JSON object such as {"zero_steps": 0, "phase_delay": 0, '
                         '"period": 0.5}')
    unknown = sorted(set(options) - set(COSINE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; the keys are "
                         f"{', '.join(COSINE_DEFAULTS)}")
    merged = dict(COSINE_DEFAULTS, **options)
    for key, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key} must be a number, got {value!r}")
    if merged["zero_steps"] != int(merged["zero_steps"]) or merged["zero_steps"] < 0:
        raise ValueError(f"zero_steps must be a whole number >= 0, got {merged['zero_steps']!r}")
    merged["zero_steps"] = int(merged["zero_steps"])
    return merged


PruneCount = Callable[[int, int, float, int], int]
_PRUNE_COUNTS = {"constant": constant_prune_count, "cosine": cosine_prune_count}
PRUNE_SCHEDULES = tuple(_PRUNE_COUNTS)


def prune_schedule(name: str, **options) -> PruneCount:
    """The prune-count schedule called `name`, as k = f(t, T, prune_ratio, nnz).

    `options` are bound now (e.g. zero_steps for "cosine"), and one the
    schedule does not take is a TypeError now rather than at the first update.
    """
    if name not in _PRUNE_COUNTS:
        raise ValueError(f"unknown prune schedule {name!r}; expected one of {PRUNE_SCHEDULES}")
    schedule = _PRUNE_COUNTS[name]
    inspect.signature(schedule).bind_partial(**options)
    return functools.partial(schedule, **options)
