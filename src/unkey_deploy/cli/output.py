"""How the CLI talks to people: data to stdout (tables or ``--json``), everything else to stderr."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..core.errors import InvalidInput, UnkeyError, ValidationFailed

if TYPE_CHECKING:  # both imported when first needed: `unkey --help` stays light
    from rich.progress import Progress, TaskID

    from ..builder.api import BuildProgress

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


# --- a deployment's event stream, for people ------------------------------------------------------

PLAIN_PROGRESS_INTERVAL_S = 2.0
"""Without a terminal, at most one line per layer this often (by the events' own time), plus its
first and its final line: CI logs get a few lines per layer, not one per event."""


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _clean(text: str) -> str:
    """Outside text (layer entry names, a registry's messages) without control characters: an
    escape sequence in a file name must not drive the terminal or land in a CI log."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _event_time(data: Mapping[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(str(data.get("at", "")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _progress_of(data: Mapping[str, Any]) -> BuildProgress | None:
    """The structured build progress an event carries (``data.progress``), if well-formed."""
    raw = data.get("data")
    prog = raw.get("progress") if isinstance(raw, Mapping) else None
    if not isinstance(prog, Mapping):
        return None
    from ..builder.api import BuildProgress  # noqa: PLC0415 (the one wire shape of progress)

    try:
        return BuildProgress.from_dict(prog)
    except InvalidInput:  # a newer/odd server: show the event's message instead
        return None


def _amount(p: BuildProgress) -> str:
    if p.unit == "bytes":
        return f"{p.done / 1e6:.1f}/{p.total / 1e6:.1f} MB"
    return f"{p.done}/{p.total} {p.detail}".rstrip()


class EventRenderer:
    """Renders a deployment's events (the gateway's SSE ``data`` objects) for a person.

    On a terminal (``live``): a progress bar per build item, i.e. each layer's bytes (pulled,
    verified and applied) and the rootfs steps, with every other event (build steps, scheduling,
    boot, health check) as a line above the bars; once every bar is full, the next non-build
    event leaves them in place and the lines continue below. Otherwise: plain lines without
    escape codes; a layer's bytes at most every :data:`PLAIN_PROGRESS_INTERVAL_S` of event time
    (plus its first and final line), every rootfs step. Leaving the context stops the display.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        live: bool | None = None,
        clock: Callable[[], float] = time.time,
        full_time: bool = False,
    ) -> None:
        self._stream = stream
        self._console = Console(file=stream, emoji=False, highlight=False, soft_wrap=True)
        self.live = (
            live
            if live is not None
            else self._console.is_terminal and not self._console.is_dumb_terminal
        )
        self._clock = clock
        self._full_time = full_time
        self._bars: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._running: set[str] = set()  # items with a bar short of 100 %
        self._plain_last: dict[str, float] = {}
        self._plain_done: set[str] = set()

    def __enter__(self) -> EventRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None
            self._tasks.clear()
            self._running.clear()

    def _when(self, data: Mapping[str, Any]) -> str:
        at = str(data.get("at", ""))
        return at if self._full_time else at[11:19]

    def event(self, name: str, data: Mapping[str, Any]) -> None:
        """Render one event (``name`` is the SSE event name, i.e. the phase)."""
        p = _progress_of(data)
        if p is not None:
            self._progress(name, data, p)
            return
        line = _clean(f"{self._when(data)} {name:>9}  {data.get('message', '')}")
        if self._bars is not None and name != "build" and not self._running:
            # the build is over: leave its bars where they are and continue below them
            self.close()
        if self._bars is not None:
            self._bars.console.print(Text(line), highlight=False, markup=False, emoji=False)
        else:
            self._write(line)

    def _write(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()

    def _progress(self, name: str, data: Mapping[str, Any], p: BuildProgress) -> None:
        if self.live:
            self._bar(p)
            return
        # plain: first, final, and at most one line per interval in between (event time)
        if p.item in self._plain_done:
            return
        now = _event_time(data) or self._clock()
        last = self._plain_last.get(p.item)
        if (
            last is not None
            and p.unit == "bytes"  # each of the few rootfs steps is news: always shown
            and not p.finished
            and now - last < PLAIN_PROGRESS_INTERVAL_S
        ):
            return
        self._plain_last[p.item] = now
        if p.finished:
            self._plain_done.add(p.item)
        self._write(_clean(f"{self._when(data)} {name:>9}  {p.render()}"))

    def _bar(self, p: BuildProgress) -> None:
        if self._bars is None:
            from rich.progress import (  # noqa: PLC0415
                BarColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
            )

            self._bars = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(bar_width=32),
                TaskProgressColumn(),
                TextColumn("{task.fields[amount]}", markup=False),
                console=self._console,
                refresh_per_second=8,
            )
            self._bars.start()
        # an empty blob is 0 of 0: show it as one full unit
        total, done = (p.total, p.done) if p.total else (1, 1 if p.finished else 0)
        task = self._tasks.get(p.item)
        if task is None:
            self._tasks[p.item] = self._bars.add_task(
                _clean(p.item), total=total, completed=done, amount=_clean(_amount(p))
            )
        else:
            self._bars.update(task, total=total, completed=done, amount=_clean(_amount(p)))
        if p.finished:
            self._running.discard(p.item)
            self._bars.refresh()
        else:
            self._running.add(p.item)
