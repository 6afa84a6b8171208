"""Delivery to recipients' servers: the retry schedule (``backoff``) so far; resolution,
lanes and client sessions are being built (see docs/status.md)."""
