"""Wiring: the composition root, the plugin, the ASGI front, the HTTP server's limits, the CLI."""
