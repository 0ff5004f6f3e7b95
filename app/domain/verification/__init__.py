"""Verification: the hot path that answers a terminal's scan."""
