"""Flags of the Graphcore original that only meant something on an IPU.

The training scripts accept them so the original's command lines still run;
they do nothing on the CPU, and `--help` and one start-up log line say so.
"""

import argparse

IPU_ONLY = "IPU only; accepted and ignored on the CPU"


class IpuOnlyFlag(argparse.Action):
    """A flag that is accepted and ignored: its value is stored (True for a switch,
    nargs=0) and its name added to the namespace's `given` tuple for the log line."""

    given = "ipu_only_given"

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True if self.nargs == 0 else values)
        names = getattr(namespace, self.given, ())
        if self.option_strings[0] not in names:
            setattr(namespace, self.given, (*names, self.option_strings[0]))
