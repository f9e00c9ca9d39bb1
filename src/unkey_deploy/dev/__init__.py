"""The local stack: ``unkey dev up|down|status`` and the native set-up steps."""
