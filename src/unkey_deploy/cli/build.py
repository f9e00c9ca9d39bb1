"""``unkey`` commands of this area (registered by cli.main)."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Add this module's commands to the top-level group."""
