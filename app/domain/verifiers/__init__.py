"""Verifier organisations and their terminals."""
