"""Logs, metrics, traces and the request id they share."""
