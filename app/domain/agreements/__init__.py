"""Cooperation agreements: which regions accept each other's cards, and for what."""
