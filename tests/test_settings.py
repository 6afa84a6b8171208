"""Each setting is declared once (atmosrelay/settings.py): the embedded defaults, the checks, the
typed values and the reload's list all come from that one declaration."""

from __future__ import annotations

import tomllib
from ipaddress import ip_network

import attrs
import pytest

from atmosrelay import settings
from atmosrelay.config import (
    DEFAULTS_TOML,
    RELOADABLE,
    SECTIONS,
    ConfigError,
    changed_settings,
    parse_config,
)
from atmosrelay.policy.settings import Mode, Tier
from atmosrelay.sections import ListenerMode

ALL = [(section, name) for section, cls in SECTIONS.items() for name, _ in settings.declared(cls)]


def test_the_printed_defaults_are_the_declared_ones() -> None:
    printed = tomllib.loads(DEFAULTS_TOML)
    assert list(printed) == list(SECTIONS)
    for section, cls in SECTIONS.items():
        assert printed[section] == settings.defaults(cls), section
    # and a config that sets every key to its printed default is the embedded config
    assert parse_config(DEFAULTS_TOML) == parse_config("")
    assert len(ALL) == 84  # the hand-written defaults file had 80; then delivery.processes,
    # delivery.chunking, journal.group_wait and smtp.processes


def test_every_setting_in_the_printed_defaults_has_a_comment_nearby() -> None:
    """A setting is explained on its line, just above it, or in its section's comment."""
    lines = DEFAULTS_TOML.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("#", "[")) or not line:
            continue
        key = line.split(" = ")[0]
        explained = "#" in line.split(" = ", 1)[1] or lines[i - 1].startswith("#")
        # the rest sit in a group whose first member carries the comment
        group = lines[max(0, i - 4) : i]
        assert explained or any(g.startswith("#") or " # " in g for g in group), key


@pytest.mark.parametrize(("section", "name"), ALL)
def test_every_setting_refuses_a_value_of_the_wrong_kind(section: str, name: str) -> None:
    """An inline table is the right kind for no setting: each one's check is wired in."""
    with pytest.raises(ConfigError) as caught:
        parse_config(f"[{section}]\n{name} = {{ x = 1 }}\n", source="relay.toml")
    assert str(caught.value).startswith(
        f"config error in relay.toml: {section}.{name}: expected "
    ), str(caught.value)


def test_runtime_knobs_are_not_settings() -> None:
    """A field declared without the helpers is the object's own, not a config file's."""
    for text, key in (
        ("[auth]\nbcrypt_concurrency = 4\n", "auth.bcrypt_concurrency"),
        ("[policy]\nrate_window = 60.0\n", "policy.rate_window"),
    ):
        with pytest.raises(ConfigError, match=rf"{key}: unknown setting"):
            parse_config(text)


def test_values_arrive_typed() -> None:
    config = parse_config(
        """
[smtp]
listeners = ["[::1]:0 auto", "127.0.0.1:2525 trusted"]
idle_timeout = 5
trusted_networks = ["10.0.0.0/8"]
[delivery]
smarthost = "127.0.0.1:2526"
require_tls = ["Example.ORG"]
[dns]
nameservers = ["127.0.0.1:5353", "::1"]
[policy]
tiers = [[3.5, 2, 10], [14, 20, 200]]
spray_mode = "shadow"
[http]
listeners = ["127.0.0.1:0 tls"]
"""
    )
    assert config.smtp.listeners == (
        ("::1", 0, ListenerMode.AUTO),
        ("127.0.0.1", 2525, ListenerMode.TRUSTED),
    )
    assert isinstance(config.smtp.idle_timeout, float) and config.smtp.idle_timeout == 5.0
    assert config.smtp.trusted_networks == (ip_network("10.0.0.0/8"),)
    assert config.delivery.smarthost == ("127.0.0.1", 2526)
    assert config.delivery.require_tls == frozenset({"example.org"})
    assert config.dns.nameservers == (("127.0.0.1", 5353), ("::1", 53))
    assert config.policy.tiers == (Tier(3.5, 2, 10), Tier(14.0, 20, 200))
    assert config.policy.spray_mode is Mode.SHADOW
    assert config.http.listeners == (("127.0.0.1", 0, True),)
    assert parse_config("").delivery.smarthost is None
    # the typed objects survive attrs.evolve: each converter takes its own output
    for name in SECTIONS:
        section = getattr(config, name)
        assert attrs.evolve(section) == section, name


def test_reloadable_is_what_the_declarations_say() -> None:
    assert {
        f"{section}.{name}"
        for section, cls in SECTIONS.items()
        for name, setting in settings.declared(cls)
        if setting.reload
    } == RELOADABLE
    assert {"relay.log_level", "smtp.tls_cert", "smtp.tls_key", "policy.hourly"} <= RELOADABLE
    assert "policy.counter_flush" not in RELOADABLE
    assert "smtp.listeners" not in RELOADABLE


def test_evolve_checks_and_names_what_changed() -> None:
    config = parse_config("", source="relay.toml")
    changed = config.evolve(**{"policy.hourly": 9, "smtp.hostname": "mx.test"})
    assert changed.policy.hourly == 9 and changed.smtp.hostname == "mx.test"
    assert changed_settings(config, changed) == ["smtp.hostname", "policy.hourly"]
    assert config.policy.hourly == 50  # the original is untouched
    with pytest.raises(ConfigError, match=r"journal\.segment_size: expected an integer"):
        config.evolve(**{"journal.segment_size": 10})
