"""Errors meant for people: one line naming what was wrong and what is valid."""

from __future__ import annotations


class FsappError(Exception):
    """Base class of every error fsapp reports to a user as one clear line."""


class UsageError(FsappError, ValueError):
    """A bad name, key, value, spec string, path or file given by the user (CLI exit code 2)."""


class PluginError(FsappError):
    """A plugin broke the contract (duplicate names, malformed results)."""


class TrainingAborted(FsappError):
    """Training stopped cleanly; the last good checkpoint is intact."""
