"""Run one command as N TensorFlow workers on this machine, each with its own TF_CONFIG.

    python -m ipu_sparse_ops.tools.local_cluster --workers 2 -- \\
        python -m mnist_rigl.sparse_mnist --distribute multi-worker --seed 1

Worker i gets TF_CONFIG {"cluster": {"worker": [127.0.0.1:<port>, ...]},
"task": {"type": "worker", "index": i}} with ports free when it starts, and
its output prefixed by "[worker i] ". If any worker fails, the others are
stopped; the exit status is the first failure's (0 if all succeed). On a
cluster of machines, give each machine's process its TF_CONFIG instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

from ipu_sparse_ops.cli import ArgumentParser
from ipu_sparse_ops.cluster import free_ports, tf_configs

PROG = "local_cluster"


def start_workers(command: Sequence[str], count: int, *, env=None, threads: int | None = None,
                  **popen) -> list[subprocess.Popen]:
    """Start `command` as `count` workers (own process groups, so they can be stopped whole)."""
    workers = []
    for config in tf_configs(free_ports(count)):
        worker_env = dict(env if env is not None else os.environ, TF_CONFIG=config)
        if threads is not None:
            worker_env.update(TF_NUM_INTRAOP_THREADS=str(threads),
                              TF_NUM_INTEROP_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        workers.append(subprocess.Popen(list(command), env=worker_env, start_new_session=True,
                                        **popen))
    return workers


def stop_workers(workers: Sequence[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM each worker's process group, then SIGKILL what is left after `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for worker in workers:
            if worker.poll() is None:
                try:
                    os.killpg(worker.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for worker in workers:
            try:
                worker.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if all(worker.poll() is not None for worker in workers):
            return


def _relay(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(prefix + line)
        out.flush()


def main(argv=None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow threads per worker (default: TensorFlow's choice)")
    parser.add_argument("command", nargs="+", help="the command every worker runs (after --)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        workers = start_workers(args.command, args.workers, threads=args.threads,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        print(f"{PROG}: error: cannot start {args.command[0]}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    relays = [threading.Thread(target=_relay, args=(stream, f"[worker {i}] ", out), daemon=True)
              for i, worker in enumerate(workers)
              for stream, out in ((worker.stdout, sys.stdout), (worker.stderr, sys.stderr))]
    for relay in relays:
        relay.start()
    status = 0
    try:
        while any(worker.poll() is None for worker in workers):
            failed = [w.returncode for w in workers if w.returncode not in (None, 0)]
            if failed:
                status = failed[0]
                break
            time.sleep(0.2)
        else:
            status = next((w.returncode for w in workers if w.returncode), 0)
    finally:
        stop_workers(workers)
        for relay in relays:
            relay.join(timeout=5)
    return status if status >= 0 else 128 - status  # killed by a signal: as a shell says


if __name__ == "__main__":
    sys.exit(main())
