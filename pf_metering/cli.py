"""The ``pf-metering`` command line: reads the settings once, assembles the command groups and
turns errors into one-line ``error: ...`` messages with a non-zero exit (no traceback)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from importlib.metadata import version

import click
import typer

from common.errors import MeteringError
from common.logs import configure, redact, secrets_of
from common.settings import Settings, load_settings
from common.stopping import catch_stop_signals
from pf_metering.commands import register
from pf_metering.output import FOLLOW_SYMLINKS


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


def _show_version(value: bool) -> None:
    if value:
        print(f"pf-metering {version('pf-metering')}")
        raise typer.Exit(0)


def _root(
    ctx: typer.Context,
    _: bool = typer.Option(
        False,
        "--version",
        help="print the installed version",
        is_eager=True,
        callback=_show_version,
    ),
    follow_symlinks: bool = typer.Option(
        False, "--follow-symlinks", help="let -o FILE write to the target of a symbolic link"
    ),
) -> None:
    """Usage metering and billing for the Provability Fabric testbed."""
    if ctx.obj is None:  # run without ``main`` (e.g. typer's test runner): read them here
        ctx.obj = load_settings()
    FOLLOW_SYMLINKS["on"] = follow_symlinks


def _fail(message: str, code: int, cfg: Settings | None) -> None:
    secrets = secrets_of(cfg) if cfg is not None else []
    first_line = redact(message, secrets).strip().splitlines()[0] if message.strip() else "failed"
    print(f"error: {first_line}", file=sys.stderr)
    sys.exit(code)


def _storage_error(exc: OSError, cfg: Settings | None) -> str:
    where = str(exc.filename or "")
    data_dir = str(cfg.metering_data_dir) if cfg is not None else ""
    reason = exc.strerror or type(exc).__name__
    if data_dir and (where == data_dir or where.startswith(data_dir.rstrip("/") + "/")):
        return f"cannot use METERING_DATA_DIR {data_dir}: {reason} ({where})"
    return f"{reason}: {where}" if where else reason


def main() -> None:
    """Console-script entry point."""
    args = sys.argv[1:]
    if args[:1] == ["consume"]:
        catch_stop_signals()  # a SIGTERM while the worker starts still stops it cleanly
    command = typer.main.get_command(build_app(args))
    cfg: Settings | None = None
    try:
        cfg = load_settings()
        configure(cfg)
        result = command.main(args=args, prog_name="pf-metering", standalone_mode=False, obj=cfg)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _fail("interrupted", 130, cfg)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code, cfg)
    except MeteringError as exc:
        _fail(str(exc), exc.exit_code, cfg)
    except OSError as exc:  # storage refused: name the setting when it is the data folder
        _fail(_storage_error(exc, cfg), 1, cfg)
    except Exception as exc:  # unexpected: one line; the traceback only at DEBUG
        logging.getLogger("pf_metering").debug("unexpected error", exc_info=True)
        _fail(f"{type(exc).__name__}: {exc}", 1, cfg)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
