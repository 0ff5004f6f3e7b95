"""The service's own secrets and what they protect: keys, personal data at rest, passwords, tokens."""
