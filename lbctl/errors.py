"""Typed errors of the control plane; the CLI is their one translation point to a line and an exit code."""
from __future__ import annotations

from xdp.errors import XdpError


class LbctlError(XdpError):
    """An error with a one-line message: what failed, on what, and a hint."""


class ConfigError(LbctlError):
    """Bad input: an address, port, weight, protocol or file content."""

    exit_code = 2


class ConflictError(LbctlError):
    """The change contradicts the current state: a duplicate, or a missing VIP/backend."""

    exit_code = 2


class NetnsError(LbctlError):
    exit_code = 2
