"""Fakes and real-process fixtures shipped with the package, for our tests and for users'."""
