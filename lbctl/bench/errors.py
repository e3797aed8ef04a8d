"""The benchmarks' errors: one class for "could not run or finish", one for a missing tool."""
from __future__ import annotations

from lbctl.errors import LbctlError


class BenchError(LbctlError):
    """The bench could not set up or finish, or a path did not take the branch it measures;
    nothing partial is presented as a figure."""

    exit_code = 1


class ToolMissingError(BenchError):
    """A tool the requested setups need is not installed."""

    exit_code = 69
