"""`pip install .`: the Makefile builds the native parts (it stays the one description
of that build), then setuptools packages them with the Python code."""

import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution


class BuildWithMake(build_py):
    def run(self):
        # -o: installing the pinned packages is pip's business here, not the build's.
        subprocess.run(["make", "-j", f"PYTHON={sys.executable}",
                        "-o", "build/requirements.stamp", "all"], check=True)
        super().run()


class NativeDistribution(Distribution):
    def has_ext_modules(self):
        return True  # the wheel holds compiled libraries: tag it for this platform


setup(cmdclass={"build_py": BuildWithMake}, distclass=NativeDistribution)
