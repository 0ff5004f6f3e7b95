"""Bulk issuance of persons and physical cards from CSV files."""
