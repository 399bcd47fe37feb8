"""The self-check tool: every pattern, block size, pooling and data type, and every
kernel build (instruction set), up to 8192 x 1536."""

import os
import subprocess
import sys

import numpy as np
import pytest

from ipu_sparse_ops.tools import sparse_matmul

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "ipu_sparse_ops", "tools", "sparse_matmul.py")


def run_tool(*args, isa=None):
    env = dict(os.environ)
    if isa:
        env["IPU_SPARSE_OPS_ISA"] = isa
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.parametrize("pattern", sparse_matmul.PATTERNS)
def test_every_pattern_at_defaults(pattern):
    # Element-wise random_orthogonal is square, as in the original: 16 x 16.
    square = ["--output-size", "16"] if pattern == "random_orthogonal" else []
    assert sparse_matmul.main(["--pattern", pattern, *square]) == 0


@pytest.mark.parametrize("args", [
    ["--input-size", "1920", "--output-size", "1920", "--batch-size", "2",
     "--pattern", "random_orthogonal"],
    ["--input-size", "1600", "--output-size", "6400", "--batch-size", "16",
     "--pattern", "random_sign_ones", "--data-type", "fp16", "--block-size", "16"],
    ["--input-size", "6400", "--output-size", "1600", "--batch-size", "16",
     "--pattern", "random_sign_ones", "--data-type", "fp16", "--block-size", "16"],
], ids=["1920x1920-orthogonal", "1600x6400-fp16-b16", "6400x1600-fp16-b16"])
def test_the_original_self_check_shapes(args):
    assert sparse_matmul.main(args) == 0


@pytest.mark.parametrize("block_size", [1, 4, 8, 16])
@pytest.mark.parametrize("pooling_type", ["NONE", "SUM", "AVG", "MAX"])
@pytest.mark.parametrize("data_type", ["fp32", "fp16"])
def test_every_block_pooling_and_data_type(block_size, pooling_type, data_type):
    args = ["--pattern", "random", "--batch-size", "7", "--input-size", "96",
            "--output-size", "48", "--density", "0.3", "--block-size", str(block_size),
            "--pooling-type", pooling_type, "--data-type", data_type]
    assert sparse_matmul.main(args) == 0


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("block_size", [1, 8, 16])  # 8 and 16 fill an AVX2 and an AVX-512 register
@pytest.mark.parametrize("batch", [5, 33])  # narrow batches take other kernel paths
def test_every_kernel_build(isa, block_size, batch):
    """Each instruction set the library was built for (an unsupported one falls back)."""
    result = run_tool("--pattern", "random", "--batch-size", str(batch), "--input-size", "256",
                      "--output-size", "160", "--block-size", str(block_size), isa=isa)
    assert result.returncode == 0 and "Results match." in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_blocks_past_one_batch_tile(isa):
    """A W past an L2 (1.5 MB) makes the block forward take tiles of 256 batch rows: one whole
    tile and a tail of 16 + 3 rows."""
    result = run_tool("--pattern", "random", "--batch-size", "275", "--input-size", "1024",
                      "--output-size", "768", "--density", "0.5", "--block-size", "16", isa=isa)
    assert result.returncode == 0 and "Results match." in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("batch,input_size,density", [
    (5, 1100, 0.5),      # x within one L2 panel
    (150, 2304, 0.5),    # x past an L2 panel, dense: nine L1 panels (SDDMM chunks of 5 Vecs)
    (250, 2304, 0.5),    # the same in chunks of 8 Vecs on AVX-512, the last padded
    (150, 2304, 0.05),   # x past an L2 panel, sparse: two L2 panels
], ids=["one-panel", "l1-panels", "l1-panels-wide", "l2-panels"])
def test_element_wise_panels_every_kernel_build(isa, batch, input_size, density):
    """The element-wise forward and grad-values sweep x in panels, whichever sizes the shape picks,
    on every kernel build (the row split is the same for 4, 8 and 16 lanes here)."""
    result = run_tool("--pattern", "random", "--batch-size", str(batch), "--input-size",
                      str(input_size), "--output-size", "96", "--density", str(density), isa=isa)
    assert result.returncode == 0 and "Results match." in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("pattern", sparse_matmul.PATTERNS)
def test_largest_sizes(pattern):
    blocks = pattern in ("fixed", "random_orthogonal")  # element-wise orthogonal is square
    result = run_tool("--pattern", pattern, "--batch-size", "3", "--input-size", "8192",
                      "--output-size", "1536", "--block-size", "16" if blocks else "1")
    assert result.returncode == 0 and "Results match." in result.stdout, result.stdout + result.stderr


def test_a_wrong_result_is_reported(monkeypatch, capsys):
    """The tool must be able to fail: perturb one weight of its reference."""
    original = sparse_matmul.sparse.dense_from_triplets

    def perturbed(spec, triplets):
        dense = original(spec, triplets).copy()
        dense[0, 0] += 1e-3
        return dense

    monkeypatch.setattr(sparse_matmul.sparse, "dense_from_triplets", perturbed)
    assert sparse_matmul.main(["--pattern", "fixed"]) == 1
    out = capsys.readouterr().out
    assert "Mismatch in forward" in out and "Results match." not in out


@pytest.mark.parametrize("args,message", [
    (["--input-size", "18", "--block-size", "4"], "--input-size 18 must be a positive multiple"),
    (["--density", "0"], "--density must be in (0, 1]"),
    (["--block-size", "3"], "invalid choice"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--pattern", "random_orthogonal"], "needs --input-size == --output-size, got 16 and 8"),
])
def test_bad_arguments_give_one_line(args, message):
    result = run_tool(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.slow
def test_every_block_pooling_and_data_type_at_8192_by_1536():
    """The issue's acceptance grid at full size, in one child process."""
    script = (
        "import itertools, sys\n"
        "from ipu_sparse_ops.tools import sparse_matmul\n"
        "bad = []\n"
        "for bs, pool, dt in itertools.product([1, 4, 8, 16], ['NONE', 'SUM', 'AVG', 'MAX'],"
        " ['fp32', 'fp16']):\n"
        "    args = ['--pattern', 'random', '--batch-size', '5', '--input-size', '8192',"
        " '--output-size', '1536', '--block-size', str(bs), '--pooling-type', pool,"
        " '--data-type', dt]\n"
        "    if sparse_matmul.main(args) != 0: bad.append(args)\n"
        "sys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=1800, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert result.stdout.count("Results match.") == 32
