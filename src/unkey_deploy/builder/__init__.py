"""builderd: OCI image -> hardened, reproducible, zstd-compressed rootfs.ext4 asset.

Pipeline: resolve the image (``source``), apply its layers (``layers``), derive the launch spec
from the image config (``vminit``), harden the tree (``harden``), inject the static init
(``vminit``), build ext4 + zstd (``rootfs``), register the asset (``assets``). ``service`` is the
persistent build queue with workers and a cache; ``api`` holds the types other services use.
"""
