"""assetmanagerd: content-addressed storage of built rootfs assets, with an index, leases and GC.

Other services use it only through :mod:`unkey_deploy.assets.api` (the ``Assets`` Protocol and
its records); :func:`unkey_deploy.assets.service.open_assets` builds the implementation.
"""
