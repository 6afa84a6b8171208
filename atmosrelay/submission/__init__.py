"""The acceptance pipeline, shared by every way in (SMTP now, HTTP next).

members.py    MemberDirectory: member snapshots from the account store, cached until
              the store changes (the generation KeyChecker moves on)
pipeline.py   Pipeline: the checks at MAIL and RCPT, and ``submit`` (the whole
              acceptance: checks, header processing, suppression, limits, the durable
              ACCEPTED record) -> Queued, or a Refusal (atmosrelay/refusals.py)
counting.py   the policy's counters: loaded at start, replayed from the journal,
              flushed to the store every ``policy.counter_flush`` seconds, and the other
              relay processes' additions read back at the same time
actions.py    what the policy decides to write: labels, suppressions, paused domains;
              and the queue-event subscriber that feeds bounces into it
"""

from atmosrelay.submission.pipeline import Envelope, Pipeline, Queued, Submission

__all__ = ["Envelope", "Pipeline", "Queued", "Submission"]
