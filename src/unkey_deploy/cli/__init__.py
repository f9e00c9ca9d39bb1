"""The ``unkey`` command line."""
