"""The base class of errors caused by the user's input (config, names, data, checkpoints, run directory).

The command-line entry points report these in one line; any other exception is a bug or a system failure and keeps
its traceback (and, under torchrun, lands in the failure summary).
"""
from __future__ import annotations


class UserError(Exception):
    """An error whose message alone tells the user what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """An invalid configuration: the message names the source file or override, the dotted key and a fix."""
