"""The original's optimizer names and options, as stock Keras optimizers.

`--optimizer` takes TensorFlow 1's names and `--optimizer-arg name=<json>`
their option names; this maps them onto Keras 3 optimizers, whose slots
`ipu_sparse_ops.keras.RigL` re-aligns after every pattern update:

    GradientDescent                      keras.optimizers.SGD
    Momentum(momentum, use_nesterov)     ipu_sparse_ops.keras.Momentum(momentum, nesterov)
    Adam(beta1, beta2, epsilon)          keras.optimizers.Adam(beta_1, beta_2, epsilon)

`Momentum` is Keras's SGD with TensorFlow 1's accumulator (raw gradients
summed, times the current rate), which Keras's own velocity (lr * g summed)
matches only while the rate is constant; the scripts step it down. Adam is
TensorFlow 1's rule (bias correction folded into the step size).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

OPTIMIZER_OPTIONS = {  # name: {option: default}
    "GradientDescent": {},
    "Momentum": {"momentum": 0.9, "use_nesterov": False},
    "Adam": {"beta1": 0.9, "beta2": 0.999, "epsilon": None},
}
ADAM_EPSILON = 1e-8  # TensorFlow 1's default
# 1e-8 is 0 in float16, and a weight whose gradient is 0 (an always-blank pixel)
# would then step by 0/0; 1e-4 is a normal float16 (the smallest is 6.1e-5).
ADAM_FLOAT16_EPSILON = 1e-4


def optimizer_name(text: str) -> str:
    """The original's name for `text` (case-insensitive); ValueError if unknown."""
    names = {name.lower(): name for name in OPTIMIZER_OPTIONS}
    try:
        return names[text.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown optimizer {text!r}; choose one of "
                         f"{', '.join(OPTIMIZER_OPTIONS)}") from None


def check_options(name: str, options: dict) -> dict:
    """`options` of optimizer `name`, checked, with the unset ones at their defaults."""
    name = optimizer_name(name)
    allowed = OPTIMIZER_OPTIONS[name]
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise ValueError(f"{name} has no option {unknown[0]!r}; it takes "
                         f"{', '.join(allowed) or 'none'}")
    full = {**allowed, **options}
    if name == "Momentum":
        _number("momentum", full["momentum"], minimum=0.0, maximum=1.0)
        if not isinstance(full["use_nesterov"], bool):
            raise ValueError(f"use_nesterov must be true or false, got {full['use_nesterov']!r}")
    if name == "Adam":
        for beta in ("beta1", "beta2"):
            _number(beta, full[beta], minimum=0.0, below=1.0)
        if full["epsilon"] is not None:
            _number("epsilon", full["epsilon"], minimum=0.0)
    return full


def adam_epsilon(options: dict, dtype: str) -> float:
    """The given epsilon, else TensorFlow 1's, raised for float16 weights."""
    if options.get("epsilon") is not None:
        return float(options["epsilon"])
    return ADAM_FLOAT16_EPSILON if dtype == "float16" else ADAM_EPSILON


def make_optimizer(name: str, learning_rate, *, dtype: str = "float32",
                   gradient_accumulation_steps: int = 1, **options):
    """The Keras optimizer for the original's `name` and `options` (see `check_options`).

    `learning_rate` is a float or a `keras.optimizers.schedules.LearningRateSchedule`;
    `dtype` is the weights' (it picks Adam's default epsilon); with
    `gradient_accumulation_steps` N > 1 the optimizer applies the mean gradient
    of every N batches once.
    """
    import keras

    name = optimizer_name(name)
    full = check_options(name, options)
    common = {"gradient_accumulation_steps": gradient_accumulation_steps
              if gradient_accumulation_steps > 1 else None}
    if name == "GradientDescent":
        return keras.optimizers.SGD(learning_rate, **common)
    if name == "Momentum":
        from ipu_sparse_ops.keras import Momentum

        return Momentum(learning_rate, momentum=float(full["momentum"]),
                        nesterov=full["use_nesterov"], **common)
    return keras.optimizers.Adam(learning_rate, beta_1=float(full["beta1"]),
                                 beta_2=float(full["beta2"]), epsilon=adam_epsilon(full, dtype),
                                 **common)


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


def _number(name: str, value, *, minimum: float, below: float | None = None,
            maximum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if (not np.isfinite(value) or value < minimum or (below is not None and value >= below)
            or (maximum is not None and value > maximum)):
        bounds = (f"[{minimum}, {below})" if below is not None else
                  f"in [{minimum:g}, {maximum:g}]" if maximum is not None else f">= {minimum}")
        raise ValueError(f"{name} must be finite and {bounds}, got {value}")
