"""Build the native pieces the platform needs on this machine (``make native``).

Each step is idempotent and writes under the native directory (default ``.native``):
the static guest init (builder) and the guest kernel + initramfs (metald).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

NativeStep = Callable[[Path], object]


def steps() -> list[tuple[str, NativeStep]]:
    from ..builder.vminit import build_init  # noqa: PLC0415
    from ..metald.kernel import prepare_kernel  # noqa: PLC0415 (metald is optional here)

    return [
        ("guest kernel + initramfs (metald)", prepare_kernel),
        ("static guest init (builder)", build_init),
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    native_dir = Path(args[0] if args else ".native").resolve()
    native_dir.mkdir(parents=True, exist_ok=True)
    for name, step in steps():
        print(f"native: {name} ...", file=sys.stderr)
        step(native_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
