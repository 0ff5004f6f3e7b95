"""Holders: activation on a device, session tokens, credentials and their QR images."""
