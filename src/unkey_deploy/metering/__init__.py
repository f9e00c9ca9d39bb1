"""Metering: the 10 Hz collector, billaged batching and the versioned batch codec."""
