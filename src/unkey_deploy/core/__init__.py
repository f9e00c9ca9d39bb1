"""Shared kernel: config, ids, errors, clock, logging. Imports no service."""
