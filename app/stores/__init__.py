"""Stores outside the database: nonces, the card-status mirror, cache invalidation."""
