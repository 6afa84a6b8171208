"""Delivery to recipients' servers: the retry schedule (``backoff``), MX resolution
(``resolver``), one delivery attempt (``client_session``), and the dispatcher with its
per-destination lanes (``dispatcher``). Not wired into ``serve`` yet (docs/status.md): the
relay accepts and queues, durably."""
