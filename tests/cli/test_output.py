"""Errors carry outside text (layer entry names, digests): the CLI prints it verbatim."""

from __future__ import annotations

import pytest

from unkey_deploy.cli.output import print_error
from unkey_deploy.core.errors import LayerError


def test_error_text_is_never_read_as_markup_or_emoji(capsys: pytest.CaptureFixture[str]) -> None:
    print_error(LayerError('layer sha256:ab: entry "x[/evil]": path escapes the root'))
    assert 'layer sha256:ab: entry "x[/evil]": path escapes the root' in capsys.readouterr().err
