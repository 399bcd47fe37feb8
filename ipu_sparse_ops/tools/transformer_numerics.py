"""Numerics check: sparse transformer pieces against an equal dense model.

For each part (the feed-forward block, self-attention, a whole pre-norm
encoder layer) it builds the sparse part as a Keras model and its dense twin
holding the same weights densified (`ipu_sparse_ops.keras.to_dense`), runs
both in training mode on the same input and upstream gradient, and compares

- the activations,
- the gradient with respect to the input,
- every projection's non-zero gradient against the dense kernel gradient at the
  pattern's positions, its bias gradient, and the op's dense gradient (or the
  SUM/AVG/MAX of |dL/dW| per block) against the dense kernel gradient,
- the layer-norm gamma and beta gradients.

Each result must be within `tolerance * max|dense result|` of the dense one
(the error of a float32, or float16, dot product grows with the magnitudes
summed; the two models sum in different orders). Bias gradients are measured
against their layer's kernel gradient too: the key bias gradient is zero in
exact arithmetic, so only its round-off is left to compare. Prints `All results match.`
and exits 0, or prints every mismatch and exits 1.

    python -m ipu_sparse_ops.tools.transformer_numerics
    python -m ipu_sparse_ops.tools.transformer_numerics --data-type fp16 --block-size 8 \\
        --sparsity 0.5 --pooling-type SUM
"""

from __future__ import annotations

import os
import sys

import numpy as np

from ipu_sparse_ops.cli import ArgumentParser

PARTS = ("ffn", "attention", "encoder")
# Relative to the largest |value| of each dense result.
TOLERANCES = {"fp32": 1e-5, "fp16": 5e-3}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=PARTS + ("all",), default="all",
                        help="which piece to check (default all)")
    parser.add_argument("--data-type", choices=("fp32", "fp16", "both"), default="both",
                        help="data type(s) to check (default both)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences (default 2)")
    parser.add_argument("--tokens", type=int, default=28, help="tokens per sequence (default 28)")
    parser.add_argument("--hidden-length", type=int, default=96, help="default 96")
    parser.add_argument("--qkv-length", type=int, default=32, help="per head (default 32)")
    parser.add_argument("--ff-length", type=int, default=48, help="default 48")
    parser.add_argument("--attention-heads", type=int, default=16, help="default 16")
    parser.add_argument("--sparsity", type=float, default=0.9, help="default 0.9")
    parser.add_argument("--block-size", type=int, choices=(1, 4, 8, 16), default=1)
    parser.add_argument("--pooling-type", choices=("NONE", "SUM", "AVG", "MAX"), default="NONE",
                        help="pooling of the dense gradient (default NONE)")
    parser.add_argument("--seed", type=int, default=0, help="weights and inputs (default 0)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "tokens", "hidden_length", "qkv_length", "ff_length",
                 "attention_heads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 < args.sparsity < 1.0:
        parser.error(f"--sparsity must be in (0, 1), got {args.sparsity:g}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    return args


def build_part(part: str, args, settings):
    """The part called `part` as a Keras model of [batch, tokens, hidden] (weights from
    args.seed)."""
    import keras
    from ipu_sparse_ops.transformer import encoder_layer, feed_forward, self_attention

    x = keras.Input((args.tokens, args.hidden_length), dtype=settings.dtype)
    if part == "ffn":
        y = feed_forward(x, args.ff_length, settings, "ffn")
    elif part == "attention":
        y = self_attention(x, args.attention_heads, args.qkv_length, settings, "attention")
    else:
        y = encoder_layer(x, args.attention_heads, args.qkv_length, args.ff_length, settings,
                          "encoder")
    return keras.Model(x, y, name=part)


def dense_twin(model):
    """The reference: `model` with every SparseDense a Dense holding the same weights."""
    from ipu_sparse_ops.keras import to_dense

    return to_dense(model)


def run_part(model, x, upstream):
    """(y, dx, {layer name: [gradients of its trainable weights]}) of a training-mode call.

    Every SparseDense is asked for its dense gradient of this call (`dense_grad`).
    """
    from ipu_sparse_ops.keras import sparse_layers
    from ipu_sparse_ops.tf_startup import tf

    for layer in sparse_layers(model):
        layer.dense_grad_countdown.assign(1)
    layers = [layer for layer in model.layers if layer.trainable_weights]
    weights = [w for layer in layers for w in layer.trainable_weights]
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    grads = tape.gradient(loss, [x] + weights)
    by_layer, k = {}, 1
    for layer in layers:
        n = len(layer.trainable_weights)
        by_layer[layer.name] = [g.numpy() for g in grads[k:k + n]]
        k += n
    return y.numpy(), grads[0].numpy(), by_layer


def compare_part(part: str, args, data_type: str) -> list[tuple[str, float, float]]:
    """[(what, error relative to max |dense|, tolerance)] for one part and data type."""
    from ipu_sparse_ops.keras import SparseDense
    from ipu_sparse_ops.transformer import Settings

    settings = Settings(args.sparsity, args.block_size, data_type, args.pooling_type,
                        seed=args.seed)
    sparse_part = build_part(part, args, settings)
    dense_part = dense_twin(sparse_part)
    rng = np.random.default_rng(args.seed + 1)
    shape = (args.batch_size, args.tokens, args.hidden_length)
    x = rng.standard_normal(shape).astype(settings.dtype)
    upstream = rng.standard_normal(shape).astype(np.float32)
    y_s, dx_s, grads_s = run_part(sparse_part, x, upstream)
    y_d, dx_d, grads_d = run_part(dense_part, x, upstream)

    tol = TOLERANCES[data_type]
    results = []

    def check(what, actual, expected, scale_floor=0.0):
        actual = np.asarray(actual, np.float64)
        expected = np.asarray(expected, np.float64)
        if actual.shape != expected.shape:
            results.append((f"{what}: shape {actual.shape} vs {expected.shape}", np.inf, tol))
            return
        scale = max(np.max(np.abs(expected)) if expected.size else 0.0, scale_floor)
        err = np.max(np.abs(actual - expected)) if expected.size else 0.0
        rel = err / scale if scale > 0 else (0.0 if err == 0 else np.inf)
        results.append((what, rel, tol))

    check(f"{part} {data_type} activations", y_s, y_d)
    check(f"{part} {data_type} input gradient", dx_s, dx_d)
    for layer in sparse_part.layers:
        name = layer.name
        if name not in grads_s:
            continue
        g_s, g_d = grads_s[name], grads_d[name]
        if not isinstance(layer, SparseDense):  # a GroupNorm: gamma, beta
            check(f"{part} {data_type} {name} gamma gradient", g_s[0], g_d[0])
            check(f"{part} {data_type} {name} beta gradient", g_s[1], g_d[1])
            continue
        spec = layer.spec
        bs = spec.block_size
        kernel_grad = np.zeros((spec.input_size, spec.output_size))  # padded sizes
        kernel_grad[:layer.input_size, :layer.units] = g_d[0]
        triplets = layer.get_triplets()
        blocks = kernel_grad.reshape(spec.input_blocks, bs, spec.output_blocks, bs)
        at_pattern = blocks[triplets.row_indices, :, triplets.col_indices, :]
        n = len(triplets.row_indices)
        check(f"{part} {data_type} {name} non-zero gradient",
              g_s[0][:n].reshape(n, bs, bs), at_pattern.reshape(n, bs, bs))
        check(f"{part} {data_type} {name} padding slots' gradient",
              g_s[0][n:], np.zeros_like(g_s[0][n:]))
        if len(g_s) > 1:
            # The k bias gradient is zero in exact arithmetic (softmax ignores a shift
            # q.b common to all keys), so its round-off is measured against the kernel
            # gradient's scale, which sums the same dL/dy.
            check(f"{part} {data_type} {name} bias gradient", g_s[1], g_d[1],
                  scale_floor=float(np.max(np.abs(kernel_grad))))
        check(f"{part} {data_type} {name} dense gradient", layer.dense_grad.numpy(), kernel_grad)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    parts = PARTS if args.part == "all" else (args.part,)
    data_types = ("fp32", "fp16") if args.data_type == "both" else (args.data_type,)
    try:
        results = [r for dt in data_types for part in parts for r in compare_part(part, args, dt)]
    except ValueError as e:  # e.g. sizes that do not fit the sparsity
        print(f"{os.path.basename(__file__)}: error: {e}", file=sys.stderr)
        return 2
    failures = [(what, rel, tol) for what, rel, tol in results if not rel <= tol]
    worst = {}
    for what, rel, tol in results:
        key = " ".join(what.split()[:2])
        worst[key] = max(worst.get(key, 0.0), rel)
    for key, rel in worst.items():
        print(f"{key}: {len([r for r in results if r[0].startswith(key)])} results, "
              f"worst relative error {rel:.2e} (tolerance {TOLERANCES[key.split()[1]]:g})")
    if failures:
        for what, rel, tol in failures:
            print(f"MISMATCH {what}: relative error {rel:.3e} > {tol:g}")
        return 1
    print("All results match.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
