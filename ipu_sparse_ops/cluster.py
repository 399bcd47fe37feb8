"""TF_CONFIG, TensorFlow's description of a cluster, without importing TensorFlow
(the scripts check their flags before TensorFlow starts)."""

from __future__ import annotations

import json
import os
import socket
from typing import Sequence


def tf_config() -> dict | None:
    """`TF_CONFIG` as TensorFlow reads it (None when unset); ValueError if it is not a cluster."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return None
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        jobs = {name: list(addresses) for name, addresses in cluster.items()}
        task_type, index = task["type"], int(task["index"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"TF_CONFIG is not {{'cluster': ..., 'task': {{'type', 'index'}}}} "
                         f"({type(e).__name__}: {e})") from None
    if task_type not in jobs or not 0 <= index < len(jobs[task_type]):
        raise ValueError(f"TF_CONFIG: task {task_type}:{index} is not in its cluster {jobs}")
    return config


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports of 127.0.0.1 that nothing listens on now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_configs(ports: Sequence[int]) -> list[str]:
    """Each worker's TF_CONFIG for a cluster of workers on 127.0.0.1 at `ports`."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(len(ports))]
