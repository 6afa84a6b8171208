"""Delivery to recipients' servers. Built so far: the retry schedule (``backoff``) and MX
resolution (``resolver``); the client sessions, lanes and dispatcher come next (see
docs/status.md). Not wired into ``serve`` yet: the relay accepts and queues, durably."""
