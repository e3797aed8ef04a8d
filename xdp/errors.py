"""Typed errors of the data-plane driver; the CLI turns each into one line and an exit code."""
from __future__ import annotations


class XdpError(Exception):
    """Base: a message that says what failed, on what, and a hint."""

    exit_code = 1


class NeedRootError(XdpError):
    exit_code = 77


class BccMissingError(XdpError):
    exit_code = 69


class CompileError(XdpError):
    exit_code = 70


class AttachError(XdpError):
    exit_code = 3


class NotAttachedError(XdpError):
    exit_code = 4


class MapFullError(XdpError):
    exit_code = 5


class IncompatibleMapsError(XdpError):
    exit_code = 6
