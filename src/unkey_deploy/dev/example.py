"""Assemble the example app's OCI image (``examples/hello``) and push it to a registry.

The image is made by the project itself (no Docker): a busybox-static layer for ``httpd`` and a
layer with ``examples/hello/www``, with Entrypoint ``busybox httpd -f -p 8080 -h /app/www``.
"""

from __future__ import annotations

from pathlib import Path

from ..testing import images

REPO = "examples/hello"
TAG = "1"


def hello_image(www: Path, how: str = "gzip") -> images.Built:
    base = images.Layer.of(images.busybox_entries(), how)
    files = [images.E("app/", "dir"), images.E("app/www/", "dir")]
    for f in sorted(www.rglob("*")):
        rel = f.relative_to(www).as_posix()
        if f.is_dir():
            files.append(images.E(f"app/www/{rel}/", "dir"))
        else:
            files.append(images.E(f"app/www/{rel}", data=f.read_bytes()))
    app = images.Layer.of(files, how)
    return images.image(
        [base, app],
        entrypoint=["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/app/www"],
        env=["PATH=/bin"],
        workdir="/app",
        ports=["8080/tcp"],
    )


def push_hello(registry: str, www: Path) -> str:
    """Push the example image to ``registry`` (host:port); returns its reference."""
    images.push(registry, REPO, TAG, hello_image(www))
    return f"{registry}/{REPO}:{TAG}"
