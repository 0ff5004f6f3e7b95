"""Persons, physical cards and eCards: issuance, activation codes, status."""
