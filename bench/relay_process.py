"""The relay as a bench process, with its limits on or off: only for the row that measures
what the policy costs (bench_accept.py --policy-cost). Both sides of that row start through
this one launcher, so the only difference between them is the limits. Every other check of
the acceptance pipeline runs in both. There is deliberately no config key or CLI flag to
turn the limits off.

    python bench/relay_process.py CONFIG on|off
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atmosrelay import logs
from atmosrelay.config import load_config
from atmosrelay.runtime import run_relay


def main() -> None:
    config = load_config(sys.argv[1])
    enforce = sys.argv[2] == "on"
    logs.configure(config.relay.log_level, config.relay.log_format)
    trio.run(lambda: run_relay(config, announce=logs.announce, enforce_limits=enforce))


if __name__ == "__main__":
    main()
