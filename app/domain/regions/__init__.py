"""Issuing regions, by their GB/T 2260 administrative division codes."""
