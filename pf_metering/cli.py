"""The ``pf-metering`` command line: assembles the command groups and turns errors into
one-line ``error: ...`` messages with a non-zero exit (no tracebacks for user errors)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import click
import typer

from common.errors import OperationError, UserError
from common.logs import configure, redact, secrets_of
from common.settings import settings
from pf_metering.commands import register


def build_app(args: Sequence[str] | None = None) -> typer.Typer:
    """The CLI; given the command line, only the commands it can run are imported."""
    app = typer.Typer(
        name="pf-metering",
        help="Usage metering and billing for the Provability Fabric testbed.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    app.callback()(_root)
    register(app, args)
    return app


def _root() -> None:
    """Usage metering and billing for the Provability Fabric testbed."""


def _fail(message: str, code: int) -> None:
    try:
        secrets = secrets_of(settings())
    except UserError:
        secrets = []
    first_line = redact(message, secrets).strip().splitlines()[0] if message.strip() else "failed"
    print(f"error: {first_line}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Console-script entry point."""
    args = sys.argv[1:]
    command = typer.main.get_command(build_app(args))
    try:
        configure(settings())
        result = command.main(args=args, prog_name="pf-metering", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _fail("interrupted", 130)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except (UserError, OperationError) as exc:
        _fail(str(exc), exc.exit_code)
    except Exception as exc:  # unexpected: one line; the traceback only at DEBUG
        logging.getLogger("pf_metering").debug("unexpected error", exc_info=True)
        _fail(f"{type(exc).__name__}: {exc}", 1)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
