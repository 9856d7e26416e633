"""User-facing errors.

Anything a person can fix (a bad config key, a missing column, a tampered file) is raised as a
:class:`ForgeError`; the CLI prints its message without a traceback and exits with code 2.
"""

from __future__ import annotations


class ForgeError(Exception):
    """An error caused by the user's input, with a message that says what to change."""


class ConfigError(ForgeError):
    """The configuration is invalid (names the key path and what is allowed)."""


class DataError(ForgeError):
    """The data is invalid (names the file, column and row)."""


class ArtifactError(ForgeError):
    """A saved artefact is missing, unreadable or does not match its recorded hash."""
