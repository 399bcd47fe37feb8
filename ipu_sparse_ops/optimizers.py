"""Small optimizers over tf.Variables whose slots can follow a changing sparsity pattern.

Each optimizer keeps, for every variable it trains, one plain `tf.Variable`
per entry of its `slot_names` (Momentum: "momentum"; Adam: "m" and "v"), of
the variable's shape and dtype. For a sparse layer's values variable the
slots are therefore aligned slot by slot with the connections, and after a
Rig-L update `follow_pattern` re-aligns every slot the same way: a kept
connection keeps its history, a new one (and padding) starts at zero, as in
Evci et al. 2020. It loops over `slot_names`, so no optimizer is special-cased.

The update rules are those of TensorFlow 1's `tf.train` optimizers (which the
original example used):

    GradientDescent  w -= lr * g
    Momentum         a = momentum * a + g;  w -= lr * a
                     (use_nesterov: w -= lr * (g + momentum * a))
    Adam             t += 1;  m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g^2
                     w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + epsilon)

Adam's epsilon, unless given, depends on the variable's dtype (see
`Adam.epsilon_for`): TF1's 1e-8 is 0 in float16.

Options come from the command line as `--optimizer-arg name=<json>` and are
parsed by `parse_optimizer_args`; `make_optimizer` builds one by name.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Sequence
from typing import ClassVar

import numpy as np
from ipu_sparse_ops.tf_startup import tf

from ipu_sparse_ops import sparse_training


class Optimizer:
    """Base class: slot bookkeeping, pattern following and checkpoint state.

    Subclasses set `name` and `slot_names` and implement `_apply(grad, var,
    slots, learning_rate)`. The learning rate is given to the constructor or,
    per call, to `apply_gradients` (a float or a scalar tensor, so a schedule
    computed inside a tf.function needs no re-trace).
    """

    name: ClassVar[str] = ""
    slot_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, learning_rate: float = 0.01):
        self.learning_rate = _number("learning_rate", learning_rate, minimum=0.0)
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
        self._variables: list[tf.Variable] = []
        self._slots: dict[object, dict[str, tf.Variable]] = {}

    # ---- slots ---------------------------------------------------------------------------

    def build(self, variables: Iterable[tf.Variable]) -> None:
        """Create the (zero) slots of `variables`, in order; already known ones are skipped.

        Call it before tracing a tf.function that applies gradients (it is
        also done lazily on first use).
        """
        with tf.init_scope():
            for var in variables:
                if var.ref() in self._slots:
                    continue
                base = var.name.split(":")[0]
                self._slots[var.ref()] = {
                    slot: tf.Variable(tf.zeros(var.shape, var.dtype), trainable=False,
                                      name=f"{base}/{slot}")
                    for slot in self.slot_names}
                self._variables.append(var)

    @property
    def variables(self) -> list[tf.Variable]:
        """The trained variables, in the order they were first seen."""
        return list(self._variables)

    def get_slot(self, var: tf.Variable, slot: str) -> tf.Variable:
        if slot not in self.slot_names:
            raise KeyError(f"{self.name} has no slot {slot!r}; its slots are {self.slot_names}")
        return self._slots[var.ref()][slot]

    def follow_pattern(self, var: tf.Variable, slot_kept_from: np.ndarray) -> None:
        """Re-align every slot of `var` with a new pattern (host side, an assign per slot).

        Args:
            var: a variable this optimizer trains (e.g. SparseFcLayer.nz_values).
            slot_kept_from: for each index of var's first axis, the index it
                held before the pattern changed, or -1 for a new connection
                or padding (what SparseFcLayer.push_triplets returns).
        """
        for slot in self.slot_names:
            slot_var = self.get_slot(var, slot)
            slot_var.assign(sparse_training.follow_pattern(slot_var.numpy(), slot_kept_from))

    # ---- updates -------------------------------------------------------------------------

    def apply_gradients(self, grads_and_vars: Iterable[tuple[tf.Tensor, tf.Variable]],
                        learning_rate=None) -> None:
        """One update of each variable; `learning_rate` overrides the constructor's."""
        grads_and_vars = [(g, v) for g, v in grads_and_vars if g is not None]
        self.build(v for _, v in grads_and_vars)
        lr = self.learning_rate if learning_rate is None else learning_rate
        lr = tf.cast(lr, tf.float32)
        self.iterations.assign_add(1)
        for grad, var in grads_and_vars:
            if isinstance(grad, tf.IndexedSlices):
                grad = tf.convert_to_tensor(grad)
            self._apply(tf.cast(grad, var.dtype), var, self._slots[var.ref()], lr)

    def _apply(self, grad, var, slots, learning_rate) -> None:
        raise NotImplementedError

    # ---- checkpoints ---------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        """Step counter and slots as numpy arrays, keyed by variable position and slot name."""
        state = {"iterations": self.iterations.numpy()}
        for index, var in enumerate(self._variables):
            for slot in self.slot_names:
                state[f"{index}/{slot}"] = self._slots[var.ref()][slot].numpy()
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore `state()` output into an optimizer built over the same variables."""
        expected = {f"{i}/{s}" for i in range(len(self._variables)) for s in self.slot_names}
        missing = sorted(expected - set(state))
        if missing or "iterations" not in state:
            raise ValueError(f"optimizer state lacks {missing or ['iterations']}")
        for index, var in enumerate(self._variables):
            for slot in self.slot_names:
                slot_var = self._slots[var.ref()][slot]
                value = np.asarray(state[f"{index}/{slot}"])
                if value.shape != tuple(slot_var.shape):
                    raise ValueError(f"optimizer slot {index}/{slot} has shape {value.shape}, "
                                     f"expected {tuple(slot_var.shape)}")
                slot_var.assign(value.astype(slot_var.dtype.as_numpy_dtype))
        self.iterations.assign(int(np.asarray(state["iterations"])))

    def get_config(self) -> dict:
        return {"learning_rate": self.learning_rate}


class GradientDescent(Optimizer):
    """Plain SGD: w -= lr * g. No slots."""

    name = "GradientDescent"
    slot_names = ()

    def _apply(self, grad, var, slots, learning_rate):
        var.assign_sub(tf.cast(learning_rate, var.dtype) * grad)


class Momentum(Optimizer):
    """Heavy-ball momentum (TF1 form, optionally Nesterov); slot "momentum"."""

    name = "Momentum"
    slot_names = ("momentum",)

    def __init__(self, learning_rate: float = 0.01, momentum: float = 0.9,
                 use_nesterov: bool = False):
        super().__init__(learning_rate)
        self.momentum = _number("momentum", momentum, minimum=0.0)
        self.use_nesterov = _boolean("use_nesterov", use_nesterov)

    def _apply(self, grad, var, slots, learning_rate):
        accum = slots["momentum"]
        momentum = tf.constant(self.momentum, var.dtype)
        new_accum = momentum * accum + grad
        accum.assign(new_accum)
        step = grad + momentum * new_accum if self.use_nesterov else new_accum
        var.assign_sub(tf.cast(learning_rate, var.dtype) * step)

    def get_config(self) -> dict:
        return {**super().get_config(), "momentum": self.momentum,
                "use_nesterov": self.use_nesterov}


class Adam(Optimizer):
    """Adam with TF1's bias correction folded into the step size; slots "m" and "v".

    `epsilon` is used for every variable when given; when it is None (the
    default) each variable gets the default of its dtype, `epsilon_for`.
    """

    name = "Adam"
    slot_names = ("m", "v")
    DEFAULT_EPSILON = 1e-8  # TF1's
    # TF1's 1e-8 rounds to 0 in float16, and a weight whose gradient is 0 (padding, an
    # always-blank pixel) would then step by 0/0 = NaN. 1e-4 is a normal float16
    # (the smallest is 6.1e-5).
    FLOAT16_EPSILON = 1e-4

    def __init__(self, learning_rate: float = 0.001, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float | None = None):
        super().__init__(learning_rate)
        self.beta1 = _number("beta1", beta1, minimum=0.0, below=1.0)
        self.beta2 = _number("beta2", beta2, minimum=0.0, below=1.0)
        self.epsilon = None if epsilon is None else _number("epsilon", epsilon, minimum=0.0)

    def epsilon_for(self, dtype) -> float:
        """The epsilon of variables of `dtype` (a tf.DType or its name): the one given to
        the constructor, else FLOAT16_EPSILON for float16 and DEFAULT_EPSILON otherwise."""
        if self.epsilon is not None:
            return self.epsilon
        return self.FLOAT16_EPSILON if tf.as_dtype(dtype) == tf.float16 else self.DEFAULT_EPSILON

    def _apply(self, grad, var, slots, learning_rate):
        # iterations was already incremented for this step: t = 1 on the first update.
        t = tf.cast(self.iterations, tf.float32)
        # The bias correction in float32 even for fp16 weights: 1 - b2^t underflows in half.
        scale = tf.sqrt(1.0 - tf.pow(self.beta2, t)) / (1.0 - tf.pow(self.beta1, t))
        lr_t = tf.cast(learning_rate * scale, var.dtype)
        dtype = var.dtype
        m, v = slots["m"], slots["v"]
        new_m = tf.constant(self.beta1, dtype) * m + tf.constant(1.0 - self.beta1, dtype) * grad
        new_v = (tf.constant(self.beta2, dtype) * v
                 + tf.constant(1.0 - self.beta2, dtype) * tf.square(grad))
        m.assign(new_m)
        v.assign(new_v)
        epsilon = tf.constant(self.epsilon_for(dtype), dtype)
        var.assign_sub(lr_t * new_m / (tf.sqrt(new_v) + epsilon))

    def get_config(self) -> dict:
        return {**super().get_config(), "beta1": self.beta1, "beta2": self.beta2,
                "epsilon": self.epsilon}


OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.name: cls for cls in (GradientDescent, Momentum, Adam)}


def optimizer_class(name: str) -> type[Optimizer]:
    """The optimizer class called `name` (case-insensitive); ValueError if unknown."""
    by_lower = {key.lower(): cls for key, cls in OPTIMIZERS.items()}
    try:
        return by_lower[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown optimizer {name!r}; choose one of "
                         f"{', '.join(OPTIMIZERS)}") from None


def optimizer_options(name: str) -> tuple[str, ...]:
    """The options `--optimizer-arg` may set for optimizer `name` (not the learning rate)."""
    params = inspect.signature(optimizer_class(name).__init__).parameters
    return tuple(p for p in params if p not in ("self", "learning_rate"))


def make_optimizer(name: str, learning_rate: float, **options) -> Optimizer:
    """Build optimizer `name` with `options` (from `parse_optimizer_args`).

    Raises ValueError for an unknown name, an option the optimizer does not
    take, or a value of the wrong type or range. The learning rate is not an
    option: the training script's schedule sets it.
    """
    cls = optimizer_class(name)
    allowed = optimizer_options(name)
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise ValueError(f"{cls.name} has no option {unknown[0]!r}; it takes "
                         f"{', '.join(allowed) or 'none'}")
    return cls(learning_rate, **options)


def parse_optimizer_args(args: Sequence[str] | None) -> dict[str, object]:
    """["momentum=0.9", "use_nesterov=true"] -> {"momentum": 0.9, "use_nesterov": True}.

    Each value is JSON (numbers, true/false, quoted strings). ValueError, with
    the offending argument in the message, for a missing "=", an empty name,
    bad JSON or a name given twice.
    """
    options: dict[str, object] = {}
    for arg in args or ():
        name, sep, text = arg.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"optimizer argument {arg!r} is not of the form name=<json>")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"optimizer argument {arg!r}: the value is not valid JSON "
                             f"({e.msg})") from None
        if name in options:
            raise ValueError(f"optimizer argument {name!r} is given twice")
        options[name] = value
    return options


def _number(name: str, value, *, minimum: float | None = None,
            below: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or (minimum is not None and value < minimum) or (
            below is not None and value >= below):
        bounds = f"[{minimum}, {below})" if below is not None else f">= {minimum}"
        raise ValueError(f"{name} must be finite and {bounds}, got {value}")
    return value


def _boolean(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)
