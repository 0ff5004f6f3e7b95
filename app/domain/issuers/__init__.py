"""Issuer keys: each region's Ed25519 credential-signing keys and their publication."""
