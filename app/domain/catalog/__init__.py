"""The service catalogue: what the card gives access to, where, and through which credentials."""
