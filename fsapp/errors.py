"""Errors meant for people: one line naming what was wrong and what is valid."""

from __future__ import annotations


class FsappError(Exception):
    """Base class of every error fsapp reports to a user as one clear line."""


class UsageError(FsappError, ValueError):
    """A bad name, key, value, spec string, path or file given by the user (CLI exit code 2)."""


class PluginError(FsappError):
    """A plugin broke the contract (duplicate names, malformed results), or its code failed."""


class PluginValueError(PluginError, ValueError):
    """A plugin component raised ValueError: it cannot run on this model or data. Still a
    ValueError, so callers that treat "cannot run" specially keep doing so."""


class PluginRuntimeError(PluginError, RuntimeError):
    """A plugin component raised RuntimeError (torch's errors, e.g. no input gradient). Still a
    RuntimeError, so callers that recognise torch's messages keep doing so."""


def plugin_failure(message: str, cause: BaseException) -> PluginError:
    """The :class:`PluginError` for a plugin's failing code, keeping ValueError/RuntimeError kinds."""
    if isinstance(cause, ValueError):
        return PluginValueError(message)
    if isinstance(cause, RuntimeError):
        return PluginRuntimeError(message)
    return PluginError(message)


class TrainingAborted(FsappError):
    """Training stopped cleanly; the last good checkpoint is intact."""
