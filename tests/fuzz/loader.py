"""Which build of the op the fuzz suite drives.

By default: `ipu_sparse_ops.ops` as users import it. When IPU_SPARSE_OPS_LIBRARY
names another build of libsparse_matmul_ops.so (the AddressSanitizer one,
build/asan/), that library is loaded instead and ops.py is imported on top of it,
so its registered gradients run the instrumented kernels too: until ops.py reads
the variable itself, tf.load_op_library is redirected while ops.py imports.
IPU_SPARSE_OPS_HOST_UTILS likewise names another build of the pybind11 host
utilities (loaded under the name ipu_sparse_ops.host_utils before sparse.py
imports it). Only one build of each may live in a process: TensorFlow registers
an op name once.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

LIBRARY_ENV = "IPU_SPARSE_OPS_LIBRARY"
HOST_UTILS_ENV = "IPU_SPARSE_OPS_HOST_UTILS"


def _load_host_utils(path: str) -> None:
    loader = importlib.machinery.ExtensionFileLoader("ipu_sparse_ops.host_utils", path)
    spec = importlib.util.spec_from_file_location("ipu_sparse_ops.host_utils", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["ipu_sparse_ops.host_utils"] = module
    import ipu_sparse_ops
    ipu_sparse_ops.host_utils = module


def load():
    """(ops module, raw op module, sparse module) for the selected builds."""
    host_utils = os.environ.get(HOST_UTILS_ENV)
    if host_utils and "ipu_sparse_ops.host_utils" not in sys.modules:
        _load_host_utils(host_utils)
    library = os.environ.get(LIBRARY_ENV)
    from ipu_sparse_ops.tf_startup import tf
    if library and "ipu_sparse_ops.ops" not in sys.modules:
        real_load = tf.load_op_library

        def redirected(path):
            if Path(path).name == "libsparse_matmul_ops.so":
                path = library
            return real_load(path)

        tf.load_op_library = redirected
        try:
            from ipu_sparse_ops import ops
        finally:
            tf.load_op_library = real_load
    else:
        from ipu_sparse_ops import ops
    from ipu_sparse_ops import sparse
    return ops, ops._ops, sparse


def loaded_libraries() -> list[str]:
    """Paths of the op and host-utility builds mapped into this process."""
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            name = os.path.basename(path)
            if name == "libsparse_matmul_ops.so" or name.startswith("host_utils"):
                found.add(os.path.realpath(path))
    return sorted(found)
