"""Errors in what the user asked for, told apart from bugs.

Every check of a user's input in seqkd (a field, a value, a file, a folder, a teacher or cache that does not fit
the run) raises a :class:`UserError`. The ``seqkd`` command prints such an error as one line,
``seqkd <command>: error: <message>``, and exits with status 2; anything else is a bug and keeps its traceback.
Each class also derives from the built-in exception a Python caller would expect (``ValueError``,
``FileNotFoundError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """The user's input is wrong; the message says what is wrong and how to fix it."""


class InvalidValueError(UserError, ValueError):
    """A field, value, recipe, corpus, tokenizer, model or cache that cannot be used as given."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist, or lacks what it must hold."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step and the part of the loss."""


__all__ = ["InvalidValueError", "MissingInputError", "NonFiniteLossError", "UserError"]
