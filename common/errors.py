"""Errors pf-metering raises on purpose, under one base, ``MeteringError``: the CLI prints each
as one ``error: ...`` line (never a traceback) and exits with its ``exit_code``. Lower layers
raise them ``from`` the exception that caused them, so the cause stays on ``__cause__``."""


class MeteringError(Exception):
    """An error whose message says what went wrong, for the person running pf-metering."""

    exit_code = 1


class UserError(MeteringError):
    """Bad input or configuration; the message names what is wrong and what is accepted."""

    exit_code = 2


class ConfigError(UserError):
    """A setting (environment variable or ``.env``) has a value that is not accepted."""


class TierFileError(UserError):
    """``METERING_TIERS_FILE`` cannot be read or is not a valid tiers file."""


class OperationError(MeteringError):
    """A run-time failure (storage, broker, Stripe) reported without a traceback."""

    exit_code = 1


class StorageError(OperationError):
    """A DuckDB file or the published snapshot cannot be opened, read or written."""


class LedgerError(StorageError):
    """A partition's ledger cannot be opened or a batch could not be committed to it."""


class CatalogError(StorageError):
    """Cluster mode's DuckLake (its PostgreSQL catalog or its data path) cannot be reached or
    used; the message names ``METERING_CATALOG`` or ``METERING_LAKE_PATH``, never a password."""
