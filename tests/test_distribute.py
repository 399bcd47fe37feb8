"""Rig-L under tf.distribute: a 2-replica run at global batch B against a 1-replica run at B.

The runs happen in a subprocess (tests/distribute_job.py), which splits its CPU
into two logical devices before TensorFlow initialises; this process's
TensorFlow is already initialised with one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ipu_sparse_ops import distribute
from ipu_sparse_ops.tf_startup import tf
from ipu_sparse_ops.tools import local_cluster

JOB = Path(__file__).with_name("distribute_job.py")
LAYERS = ("fc1", "fc2")


def run_job(out: Path, *runs: str, env=None, timeout=300) -> dict:
    """Run the job's `runs` in one process; their results by run name."""
    result = subprocess.run([sys.executable, str(JOB), str(out), *runs], env=env or os.environ,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return {run: dict(np.load(f"{out}-{run}.npz")) for run in runs}


def assert_same_run(distributed: dict, single: dict) -> None:
    """Same update steps, patterns equal on every replica and to the single run's, values close."""
    np.testing.assert_array_equal(distributed["steps"], [4, 8, 12, 16, 20, 24])
    np.testing.assert_array_equal(distributed["steps"], single["steps"])
    for name in LAYERS:
        patterns, values = distributed[f"{name}_metainfo"], distributed[f"{name}_values"]
        for replica in range(patterns.shape[1]):  # identical on every replica
            np.testing.assert_array_equal(patterns[:, replica], patterns[:, 0])
            np.testing.assert_array_equal(values[:, replica], values[:, 0])
        for update in range(len(single["steps"])):
            np.testing.assert_array_equal(patterns[update, 0], single[f"{name}_metainfo"][update, 0],
                                          err_msg=f"{name} after update {update + 1}")
            np.testing.assert_allclose(values[update, 0], single[f"{name}_values"][update, 0],
                                       rtol=1e-4, atol=1e-5)
    prints = distributed["fingerprints"]
    assert (prints == prints[0]).all()
    assert distributed["traces"][-1] == distributed["traces"][0], "an update re-traced the step"


@pytest.fixture(scope="module")
def mirrored_runs(tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("mirrored") / "run", "none", "mirrored",
                   "mirrored-corrupt")


def test_two_mirrored_replicas_match_one_replica_at_the_same_global_batch(mirrored_runs):
    assert int(mirrored_runs["mirrored"]["replicas"]) == 2
    assert str(mirrored_runs["mirrored"]["error"]) == ""
    assert_same_run(mirrored_runs["mirrored"], mirrored_runs["none"])


def test_a_replica_with_another_pattern_stops_the_run_naming_the_layer(mirrored_runs):
    corrupt = mirrored_runs["mirrored-corrupt"]
    error = str(corrupt["error"])
    assert error.startswith("fc1: the replicas hold different patterns after Rig-L update 2"), error
    assert "replicas [1] of 2" in error
    assert len(corrupt["steps"]) == 1  # the second update never completed


def run_workers(out: Path, run: str, count: int = 2, timeout: float = 240) -> list:
    """`run` as `count` workers on 127.0.0.1 (free ports); their (status, stderr), all
    stopped when done or at `timeout`, pass or fail."""
    workers = local_cluster.start_workers([sys.executable, str(JOB), str(out), run], count,
                                          env=dict(os.environ, PEER_TIMEOUT="30"), threads=1,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True)
    try:
        return [(worker.returncode, stderr) for worker in workers
                for _, stderr in [worker.communicate(timeout=timeout)]]
    finally:
        local_cluster.stop_workers(workers)


@pytest.mark.slow
def test_two_workers_match_one_process_at_the_same_global_batch(tmp_path, mirrored_runs):
    results = run_workers(tmp_path / "run", "multi-worker")
    assert all(status == 0 for status, _ in results), results[0][1][-3000:]
    workers = [dict(np.load(tmp_path / f"run-multi-worker-{i}.npz")) for i in range(2)]
    for worker in workers:
        assert int(worker["replicas"]) == 2
        assert_same_run(worker, mirrored_runs["none"])
    for name in LAYERS:  # the two workers' patterns at every update
        np.testing.assert_array_equal(workers[0][f"{name}_metainfo"], workers[1][f"{name}_metainfo"])


@pytest.mark.slow
def test_workers_that_decide_different_patterns_stop_at_the_first_update(tmp_path):
    results = run_workers(tmp_path / "run", "multi-worker-seeds")  # seeds 5 and 6
    assert all(status == 0 for status, _ in results), results[0][1][-3000:]
    for i in range(2):
        worker = np.load(tmp_path / f"run-multi-worker-seeds-{i}.npz")
        assert str(worker["error"]).startswith(
            "fc1: the replicas hold different patterns after Rig-L update 1"), str(worker["error"])
        assert len(worker["steps"]) == 0


@pytest.mark.slow
def test_a_worker_whose_peer_never_comes_fails_in_bounded_time(tmp_path):
    (port,) = local_cluster.free_ports(1)
    config = local_cluster.tf_configs([port, local_cluster.free_ports(1)[0]])[0]
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(JOB), str(tmp_path / "run"), "multi-worker"],
                            env=dict(os.environ, TF_CONFIG=config, PEER_TIMEOUT="5"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert lines == [f"distribute_job.py: error: worker 0 could not reach its peers "
                     f"127.0.0.1:{json.loads(config)['cluster']['worker'][1].split(':')[1]} "
                     f"within 5 s"], result.stderr[-2000:]


def test_fingerprint_matches_numpy_and_sees_any_one_change():
    rng = np.random.default_rng(0)
    metainfo = rng.integers(0, 2 ** 31 - 1, size=(5000,), dtype=np.int64).astype(np.int32)
    reference = distribute.fingerprint_numpy(metainfo)
    assert int(distribute.fingerprint(tf.constant(metainfo))) == reference
    for position in (0, 17, 4999):
        for delta in (1, -1, 12345):
            changed = metainfo.copy()
            changed[position] = (int(changed[position]) + delta) % (2 ** 31 - 1)
            assert distribute.fingerprint_numpy(changed) != reference
    swapped = metainfo.copy()
    swapped[[3, 4]] = swapped[[4, 3]]  # the same indices in another order
    assert distribute.fingerprint_numpy(swapped) != reference


def test_tf_config_is_read_as_tensorflow_reads_it(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribute.tf_config() is None
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1", "b:2"]}, '
                                    '"task": {"type": "worker", "index": 1}}')
    assert distribute.tf_config()["task"] == {"type": "worker", "index": 1}
    for bad in ("{", '{"cluster": {"worker": ["a:1"]}}',
                '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}'):
        monkeypatch.setenv("TF_CONFIG", bad)
        with pytest.raises(ValueError, match="TF_CONFIG"):
            distribute.tf_config()
