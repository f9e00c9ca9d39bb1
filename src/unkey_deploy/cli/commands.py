"""API commands (filled in below)."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Add the API commands to the top-level group."""
