"""Pure decisions about who may send what, how much, to whom: no I/O, no clock of its own.

    settings.py   the [policy] config as typed values (tiers, thresholds, rule modes)
    member.py     MemberSnapshot (what the store knows of a member), statuses, labels
    counters.py   Counters: per-key counts in time buckets, sliding windows in O(1)
    limits.py     warming tiers, per-member limits, labels -> Limits; the rate decision
    rules.py      bounce/complaint auto-pause, domain spray, velocity
    sender.py     envelope sender and header From/Sender against the member's domains;
                  suppression at RCPT and at the end of DATA

Every decision takes the member snapshot, the counters and ``now`` and returns ``None``
(allowed) or a ``Refusal`` (atmosrelay.refusals), or a rule hit the caller acts on.
``atmosrelay.submission`` does the I/O around them: loading snapshots, persisting counters,
writing labels, pauses and suppressions. See docs/policy.md.
"""
