"""atmosrelay: an SMTP submission relay for atproto identities that never answers 250 before
the message is fsynced to its journal. See README.md and docs/."""

__version__ = "0.1.0"
