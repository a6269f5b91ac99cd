"""Errors a user can fix: the CLI prints them as one ``error: ...`` line, never a traceback."""


class UserError(Exception):
    """Bad input or configuration; the message names what is wrong."""

    exit_code = 2


class OperationError(Exception):
    """A run-time failure (storage, broker, Stripe) reported without a traceback."""

    exit_code = 1
