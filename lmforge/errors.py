"""The two exceptions every command turns into one `error: …` line and exit status 2 (layer 0, imports nothing)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the CLI prints ``error: <message>`` (one line) and exits 2."""


class ConfigError(UserError, ValueError):
    """A user-facing configuration error; the message names the key and the fix."""


__all__ = ["ConfigError", "UserError"]
