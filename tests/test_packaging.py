"""`pip wheel .` on a clean clone gives a wheel holding the built op that runs from anywhere."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_from_a_clean_clone_holds_the_op_and_runs_the_self_check(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(clone)],
                           timeout=1200, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("ipu_sparse_ops-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ipu_sparse_ops/libsparse_matmul_ops.so" in names
    assert any(n.startswith("ipu_sparse_ops/host_utils") and n.endswith(".so") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))  # the wheel's files only, not the checkout
    done = subprocess.run([sys.executable, "-m", "ipu_sparse_ops.tools.sparse_matmul"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Results match." in done.stdout, done.stderr[-2000:]
    found = subprocess.run([sys.executable, "-c", "import ipu_sparse_ops.keras as k; print(k.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert found.stdout.strip().startswith(str(site)), found
    # Installed, the data cache is the user's, not the package folder.
    cache = subprocess.run([sys.executable, "-c", "from mnist_rigl import mnist_data as m; "
                            "print(m.project_data_dir())"], cwd=elsewhere, text=True, timeout=300,
                           env={**env, "XDG_CACHE_HOME": str(tmp_path / "cache")},
                           capture_output=True)
    assert cache.stdout.strip() == str(tmp_path / "cache" / "ipu_sparse_ops"), cache
