"""How the CLI talks to people: data to stdout (tables or ``--json``), everything else to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..core.errors import UnkeyError, ValidationFailed

# emoji=False: digests like "sha256:ab:" must never turn into pictures
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200, emoji=False)
err = Console(stderr=True, soft_wrap=True, emoji=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    t = Table(title=title, show_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    out.print(t)


def print_error(exc: UnkeyError, *, source: str | None = None) -> None:
    """Render an error for a person: the message, every problem, then what to do next."""
    # messages carry outside text (layer entry names, field values): never read it as markup
    err.print(f"[bold red]error[/]: {escape(exc.message)}", highlight=False, markup=True)
    if isinstance(exc, ValidationFailed):
        for p in exc.problems:
            err.print(f"  {p.render(source)}", highlight=False, markup=False)
    rid = exc.details.get("request_id") if exc.details else None
    if rid:
        err.print(f"  request_id: {rid}", highlight=False, markup=False)
    if exc.suggestion:
        err.print(f"[yellow]hint[/]: {escape(exc.suggestion)}", highlight=False)
