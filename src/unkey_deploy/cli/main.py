"""The ``unkey`` command line: ``unkey --help`` lists every command.

Exit codes come from the error tree (``core.errors``: 2 invalid input, 3 auth, 4 not found,
5 conflict, 6 rate limited, 7 unavailable, ...); errors print their suggestion; nothing prompts
unless stdin is a TTY.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .. import appspec
from ..core.errors import UnkeyError, ValidationFailed
from . import build as build_commands
from . import logs as logs_commands
from . import usage as usage_commands
from .output import err, print_error, print_json

F = TypeVar("F", bound=Callable[..., Any])


class UnkeyGroup(click.Group):
    """Turns every UnkeyError into its message, suggestion and exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UnkeyError as exc:
            print_error(exc, source=ctx.meta.get("unkey.source"))
            sys.exit(exc.exit_code)


@click.group(cls=UnkeyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="unkey-deploy")
def cli() -> None:
    """unkey: container image in, microVM out, metered and billed."""


@cli.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the normalized spec as JSON")
def validate(file: Path, as_json: bool) -> None:
    """Check an app.yaml offline; print every problem as FILE:LINE:COL: field: message."""
    try:
        spec = appspec.load_file(file)
    except ValidationFailed as exc:
        for p in exc.problems:
            click.echo(p.render(str(file)))
        err.print(f"{file}: {len(exc.problems)} problem(s)", highlight=False)
        sys.exit(exc.exit_code)
    if as_json:
        print_json(spec.model_dump(mode="json", exclude_none=True))
    else:
        err.print(f"{file}: valid ({spec.name}, {spec.image})", highlight=False)


def _register_all() -> None:
    from . import commands  # noqa: PLC0415 (keeps `unkey validate` import-light)

    commands.register(cli)
    build_commands.register(cli)
    usage_commands.register(cli)
    logs_commands.register(cli)


def main(argv: list[str] | None = None) -> None:
    _register_all()
    cli.main(args=argv, prog_name="unkey")


if __name__ == "__main__":
    main()
