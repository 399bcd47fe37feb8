"""sparse_transformer_rigl_mnist.py against Graphcore's original (graphcore/examples at
187775b, applications/tensorflow/dynamic_sparsity/mnist_rigl/): its flags and defaults,
the recipes, the learning-rate and pruning schedules, --config-file, bad values."""

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest

import sparse_transformer_rigl_mnist as script
from ipu_sparse_ops.keras import sparse_layers
from ipu_sparse_ops.transformer import projections
from mnist_rigl.mnist_data import load_mnist

# Every flag of the original script (its own, TransformerOptions' and SparseModelOptions')
# with its effective default there (after the script's set_defaults), as
# (flag, attribute here, default). --train-checkpoint-path defaulted to a fresh
# tempfile.mkdtemp(); here None stands for that (see test_default_checkpoint_folder...).
ORIGINAL_FLAGS = [
    ("--mode", "mode", "all"),
    ("--train-checkpoint-path", "checkpoint_path", None),
    ("--nepochs", "nepochs", 1),
    ("--steps-per-epoch", "steps_per_epoch", 5),
    ("--optimizer", "optimizer", "Adam"),
    ("--optimizer-arg", "optimizer_arg", []),  # None there: no options
    ("--dtype", "dtype", "float32"),
    ("--random-seed", "random_seed", 42),
    ("--batch-size", "batch_size", 2),
    ("--num-shards", "num_shards", 1),
    ("--encoder-layers", "encoder_layers", 2),
    ("--decoder-layers", "decoder_layers", 2),
    ("--attention-heads", "attention_heads", 16),
    ("--hidden-length", "hidden_length", 96),
    ("--qkv-length", "qkv_length", 32),
    ("--ff-length", "ff_length", 48),
    ("--embedding-length", "embedding_length", 32),
    ("--source-sequence-length", "source_sequence_length", 28),
    ("--target-sequence-length", "target_sequence_length", 128),
    ("--source-vocab-length", "source_vocab_length", None),
    ("--target-vocab-length", "target_vocab_length", 10),
    ("--target-bos-id", "target_bos_id", None),
    ("--target-pad-id", "target_pad_id", None),
    ("--target-eos-id", "target_eos_id", None),
    ("--source-pad-id", "source_pad_id", None),
    ("--exclude-embedding", "exclude_embedding", False),
    ("--include-projection-bias", "include_projection_bias", False),
    ("--dropout-keep-prob", "dropout_keep_prob", 0.9),
    ("--config-file", "config_file", None),
    ("--exclude-attention-biases", "exclude_attention_biases", True),  # store_false
    ("--disable-concat-qkv", "disable_concat_qkv", False),
    ("--use-static-sparse-autoregressive-attention",
     "use_static_sparse_autoregressive_attention", False),
    ("--outline-encoder", "outline_encoder", False),
    ("--no-outline-dropout", "no_outline_dropout", False),
    ("--encoder-stage-dense-matmul-options", "encoder_stage_dense_matmul_options", None),
    ("--projection-stage-dense-matmul-options", "projection_stage_dense_matmul_options", None),
    ("--sparsity", "sparsity", 0.9),
    ("--block-size", "block_size", 1),
    ("--prune-ratio", "prune_ratio", 0.3),
    ("--regrow-type", "regrow_type", "rigl"),
    ("--sparse-matmul-options", "sparse_matmul_options",
     {"metaInfoBucketOversizeProportion": 0.2, "availableMemoryProportion": 0.9}),
    ("--dense-grad-matmul-options", "dense_grad_matmul_options",
     {"availableMemoryProportion": 0.1, "partialsType": "float"}),
    ("--disable-updating", "disable_updating", False),
    ("--pooling-type", "pooling_type", "NONE"),
    ("--no-outline-sparse-layer", "no_outline_sparse_layer", False),
    ("--cosine-prune-schedule", "cosine_options",
     {"zero_steps": 0, "phase_delay": 0, "period": 0.5}),
]
ORIGINAL_THRESHOLD = 0.85  # its run_testing: assert test_acc >= 0.85

TINY = ["--train-samples", "960", "--test-samples", "100", "--batch-size", "16",
        "--steps-per-epoch", "3", "--hidden-length", "32", "--qkv-length", "8",
        "--attention-heads", "4", "--ff-length", "16", "--log-level", "WARNING"]


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_every_original_flag_has_its_original_default():
    args = script.parse_args([])
    for flag, name, default in ORIGINAL_FLAGS:
        assert getattr(args, name) == default, flag
    assert args.accuracy_threshold == ORIGINAL_THRESHOLD
    assert args.data_type == "fp32" and args.recipe == "original"


def test_help_lists_every_original_flag():
    text = script.build_parser().format_help()
    for flag, _, _ in ORIGINAL_FLAGS:
        assert f"{flag} " in text or f"{flag}\n" in text or f"{flag}," in text, flag
    assert "IPU only; accepted and ignored on the CPU" in text
    assert "never read" in text


def test_original_architecture_by_default_and_its_switches():
    def layout(*argv):
        model = script.build_model(script.parse_args(["--hidden-length", "32", *argv]), 0)
        return {layer.name: layer.use_bias for layer in projections(model)
                if "attention" in layer.name}

    assert layout() == {"encoder0_attention_qkv": False, "encoder0_attention_out": False}
    assert layout("--exclude-attention-biases") == {"encoder0_attention_qkv": True,
                                                    "encoder0_attention_out": True}
    assert layout("--attention-biases") == layout("--exclude-attention-biases")
    assert layout("--disable-concat-qkv") == {f"encoder0_attention_{p}": False
                                              for p in ("q", "k", "v", "out")}


def test_recipes_set_defaults_and_explicit_flags_win():
    fast = script.parse_args(["--recipe", "fast"])
    assert (fast.batch_size, fast.nepochs, fast.dropout_keep_prob,
            fast.accuracy_threshold) == (32, 4, 1.0, 0.97)
    mixed = script.parse_args(["--batch-size", "8", "--recipe", "fast", "--nepochs", "2"])
    assert (mixed.batch_size, mixed.nepochs, mixed.dropout_keep_prob) == (8, 2, 1.0)


def test_dtype_and_its_alias():
    assert script.parse_args(["--dtype", "float16"]).data_type == "fp16"
    assert script.parse_args(["--data-type", "fp16"]).data_type == "fp16"
    assert script.parse_args(["--dtype", "float16", "--data-type", "fp16"]).data_type == "fp16"


def rates_at(schedule, steps):
    return [float(schedule(step)) for step in steps]


def test_learning_rate_schedules():
    # The original: 2e-3 / batch size for any optimizer, stepped by epoch, no warm-up.
    args = script.parse_args(["--nepochs", "4", "--optimizer", "Momentum"])
    schedule = script.learning_rate_schedule(args, 10)  # 10 steps an epoch
    np.testing.assert_allclose(rates_at(schedule, [0, 9, 10, 19, 20, 29, 30, 39]),
                               [1e-3, 1e-3, 5e-4, 5e-4, 3e-4, 3e-4, 1e-4, 1e-4], rtol=1e-6)
    # One epoch keeps the base rate throughout.
    one_epoch = script.learning_rate_schedule(script.parse_args([]), 10)
    np.testing.assert_allclose(rates_at(one_epoch, [0, 5, 9]), [1e-3] * 3, rtol=1e-6)
    # The fast recipe: Adam 0.005 stepped by training step after a 5% warm-up
    # (2 of 40 steps: rate / 2 at step 0).
    fast = script.learning_rate_schedule(script.parse_args(["--recipe", "fast"]), 10)
    np.testing.assert_allclose(rates_at(fast, [0, 1, 9, 10, 20, 30]),
                               [0.0025, 0.005, 0.005, 0.0025, 0.0015, 0.0005], rtol=1e-6)
    lr = script.parse_args(["--learning-rate", "0.1"])
    assert rates_at(script.learning_rate_schedule(lr, 10), [0]) == [pytest.approx(0.1)]
    # It is saved with the optimizer, so it must survive a config round trip.
    clone = type(fast).from_config(fast.get_config())
    assert rates_at(clone, range(0, 40, 3)) == rates_at(fast, range(0, 40, 3))


def test_prune_counts_follow_the_original_numbering(mnist):
    # Update t = 1 .. T - 1 of T = steps per epoch x epochs moves
    # ceil(ceil(0.3 nnz) * 0.5 * (1 + cos(pi t / T))); none after the T-th segment.
    args = script.parse_args(TINY + ["--nepochs", "2"])
    model, results = script.train(args, mnist[0][:960], mnist[1][:960], 5)
    T = 6
    assert [update["t"] for update in results["updates"]] == list(range(1, T))
    for update in results["updates"]:
        t = update["t"]
        for layer in sparse_layers(model):
            expected = math.ceil(math.ceil(0.3 * layer.nnz) * 0.5 * (1 + math.cos(math.pi * t / T))
                                 - 1e-9)
            assert update["layers"][layer.name]["moved"] == expected, (t, layer.name)


def test_ignored_flags_change_nothing_and_are_logged(mnist, tmp_path, capsys):
    ignored = ["--num-shards", "2", "--outline-encoder", "--no-outline-dropout",
               "--no-outline-sparse-layer", "--use-static-sparse-autoregressive-attention",
               "--sparse-matmul-options", '{"availableMemoryProportion": 0.5}',
               "--encoder-layers", "6", "--embedding-length", "64", "--include-projection-bias",
               "--exclude-embedding", "--target-eos-id", "3"]
    data = mnist[0][:960], mnist[1][:960]
    plain, _ = script.train(script.parse_args(TINY), *data, 5)
    given, _ = script.train(script.parse_args(TINY + ignored), *data, 5)
    assert [w.path for w in plain.weights] == [w.path for w in given.weights]
    for a, b in zip(plain.weights, given.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # The log names them (the run then stops at the empty --data-dir).
    assert script.main(ignored + ["--log-level", "INFO", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert ("ignored on the CPU (IPU only): --num-shards, --outline-encoder, "
            "--no-outline-dropout, --no-outline-sparse-layer, "
            "--use-static-sparse-autoregressive-attention, --sparse-matmul-options") in out
    assert ("never read them: --encoder-layers, --embedding-length, "
            "--include-projection-bias, --exclude-embedding, --target-eos-id") in out


def test_default_checkpoint_folder_is_a_new_temporary_one(mnist, monkeypatch, capsys):
    monkeypatch.setattr(script, "train", lambda args, x, y, seed, strategy: (
        script.build_model(args, seed), {"samples": 0}))
    assert script.main(TINY + ["--mode", "train", "--log-level", "INFO"]) == 0
    saved = Path(capsys.readouterr().out.split("saved the trained model to ")[1].split()[0])
    assert saved.name == script.CHECKPOINT_NAME and saved.is_file()
    assert saved.parent.parent == Path(tempfile.gettempdir())
    assert json.loads(saved.with_suffix(".json").read_text())["random_seed"] == 42
    saved.unlink()
    saved.with_suffix(".json").unlink()
    saved.parent.rmdir()


def test_config_file_overrides_the_command_line(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"batch_size": 16, "disable_concat_qkv": True,
                                  "exclude_attention_biases": False, "dtype": "float16",
                                  "sparse-matmul-options": {"x": 1}, "learning_rate": 1}))
    args = script.parse_args(["--batch-size", "4", "--config-file", str(config)])
    assert args.batch_size == 16 and args.disable_concat_qkv
    assert not args.exclude_attention_biases and args.data_type == "fp16"
    assert args.sparse_matmul_options == {"x": 1} and args.learning_rate == 1.0
    assert ("batch_size", 4, 16) in args.config_overrides


def bad_config(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    return ["--config-file", str(path)]


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "slow"], "argument --recipe: invalid choice: 'slow'"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--data-type", "fp64"], "argument --data-type: invalid choice: 'fp64'"),
    (["--dtype", "float16", "--data-type", "fp32"],
     "--dtype float16 and --data-type fp32 disagree"),
    (["--random-seed", "-1"], "--random-seed must be in [0, 2**63)"),
    (["--source-sequence-length", "27"], "--source-sequence-length must be 28 for MNIST"),
    (["--target-vocab-length", "11"], "--target-vocab-length must be 10 for MNIST"),
    (["--num-shards", "two"], "argument --num-shards: invalid int value"),
    (["--encoder-layers", "x"], "argument --encoder-layers: invalid int value"),
    (["--sparse-matmul-options", "{bad"], "argument --sparse-matmul-options: not a JSON object"),
    (["--encoder-stage-dense-matmul-options", "[1]"], "not a JSON object: '[1]'"),
    (["--exclude-attention-biases=yes"], "ignored explicit argument 'yes'"),
    (["--config-file", "/nonexistent/c.json"], "--config-file /nonexistent/c.json: cannot read"),
    ("{bad", "is not valid JSON"),
    ("[1]", "must hold a JSON object of flag values"),
    ('{"batch_sise": 2}', "--config-file: no flag is called 'batch_sise'"),
    ('{"recipe": "fast"}', "--config-file: no flag is called 'recipe'"),
    ('{"batch_size": "16"}', '--config-file: bad value "16" for --batch-size'),
    ('{"batch_size": 2.5}', "--config-file: bad value 2.5 for --batch-size"),
    ('{"disable_concat_qkv": 1}', "--config-file: bad value 1 for --disable-concat-qkv"),
    ('{"dtype": "float64"}', '--config-file: bad value "float64" for --dtype'),
    ('{"sparsity": 1.5}', "--sparsity must be in [0, 1)"),
])
def test_bad_values_are_one_line(argv, message, tmp_path, capsys):
    if isinstance(argv, str):
        argv = bad_config(tmp_path, argv)
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_file_as_checkpoint_folder_is_one_line(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(SystemExit):
        script.parse_args(["--train-checkpoint-path", str(path)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--train-checkpoint-path" in err, err
