"""The operator CLI through its entry point, against a real DNS server started by the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from atmosrelay.accounts.dkim_keys import dkim_record_value, ensure_operator_key
from tests.accounts.dns_server import DnsServer

ROOT = Path(__file__).resolve().parents[2]
ALICE = "did:plc:abcdefghijklmnopqrstuvwx"
BOB = "did:plc:zyxwvutsrqponmlkjihgfedc"


class Cli:
    def __init__(self, tmp: Path, dns: DnsServer) -> None:
        self.dns = dns
        self.config = tmp / "relay.toml"
        self.config.write_text(
            f'[relay]\ndata_dir = "{tmp / "var"}"\n'
            f'[dns]\nnameservers = ["{dns.spec}"]\ntimeout = 1.0\n'
            "[auth]\nbcrypt_cost = 4\n"
            '[operator]\nspf_include = "_spf.relay.test"\n'
        )

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "atmosrelay", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def json(self, *args: str) -> object:
        result = self(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    with DnsServer() as dns:
        dns.txt("_atproto.alice.test", f"did={ALICE}")
        dns.txt("_atproto.bob.test", f"did={BOB}")
        yield Cli(tmp_path, dns)


def refused(result: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_member_lifecycle_and_errors(cli: Cli) -> None:
    added = cli("member", "add", ALICE, "--handle", "Alice.Test")
    assert added.returncode == 0, added.stderr
    assert f"member {ALICE} added with handle alice.test" in added.stdout
    refused(cli("member", "add", ALICE, "--handle", "alice.test"), 1, "already exists")
    refused(cli("member", "add", "did:plc:nope", "--handle", "x.test"), 65, "invalid DID")
    refused(
        cli("member", "add", "did:key:z6Mk", "--handle", "x.test"), 65, "only did:plc: and did:web:"
    )
    refused(cli("member", "add", BOB, "--handle", "not a handle"), 65, "is not a valid handle")
    refused(
        cli("member", "add", BOB, "--handle", "alice.test"),
        1,
        f"alice.test resolves to {ALICE}, not {BOB}",
    )
    refused(
        cli("member", "add", BOB, "--handle", "ghost.test"),
        1,
        "_atproto.ghost.test does not exist (NXDOMAIN)",
    )
    local = cli("member", "add", BOB, "--handle", "ghost.test", "--without-dns")
    assert local.returncode == 0
    assert "was not checked against DNS" in local.stderr
    listed = cli.json("member", "list")
    assert [m["did"] for m in listed] == [ALICE, BOB]  # type: ignore[index]
    refused(cli("member", "show", "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"), 1, "no member")
    refused(cli("member", "suspend", ALICE), 65, "give a --reason")  # malformed input
    refused(cli("member", "remove", ALICE, "--reason", "  "), 65, "give a --reason")
    suspended = cli.json("member", "suspend", ALICE, "--reason", "spam complaints")
    assert suspended["status"] == "suspended"  # type: ignore[index]
    assert cli.json("member", "unsuspend", ALICE)["status"] == "active"  # type: ignore[index]
    assert "status: active" in cli("member", "show", ALICE).stdout


def test_domain_enrollment_and_dns_proof(cli: Cli) -> None:
    cli("member", "add", ALICE, "--handle", "alice.test")
    cli("member", "add", BOB, "--handle", "bob.test")
    enrolled = cli.json("domain", "add", ALICE, "mail.example.org")
    challenge = enrolled["challenge"]  # type: ignore[index]
    assert challenge["name"] == "_atmos-challenge.mail.example.org"
    human = cli("domain", "add", ALICE, "news.example.org")
    assert '_atmos-challenge.news.example.org. IN TXT "atmos-verify=' in human.stdout
    refused(cli("domain", "add", ALICE, "third.example.org"), 1, "limit is 2")
    refused(
        cli("domain", "add", BOB, "mail.example.org"),
        1,
        "already enrolled by another member; 'atmosrelay domain remove mail.example.org' frees it",
    )
    refused(cli("domain", "add", BOB, "bad_domain"), 65, "not a valid domain name")
    refused(
        cli("domain", "add", "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "x.example.org"), 1, "no member"
    )

    # Not published yet: the failure says what DNS returned and what to publish.
    refused(cli("domain", "verify", "mail.example.org"), 1, "does not exist (NXDOMAIN)")
    refused(
        cli("domain", "verify", "mail.example.org"),
        1,
        f'publish {challenge["name"]} TXT "{challenge["value"]}" and run this again',
    )
    cli.dns.txt(challenge["name"], "atmos-verify=stale-token")
    refused(
        cli("domain", "verify", "mail.example.org"), 1, "holds 'atmos-verify=stale-token'; expected"
    )
    cli.dns.txt(challenge["name"], challenge["value"])
    verified = cli("domain", "verify", "mail.example.org")
    assert verified.returncode == 0, verified.stderr
    assert "domain mail.example.org verified for" in verified.stdout
    assert '._domainkey.mail.example.org. IN TXT "v=DKIM1; k=rsa; p=' in verified.stdout
    assert '._domainkey.mail.example.org. IN TXT "v=DKIM1; k=ed25519; p=' in verified.stdout
    assert 'mail.example.org. IN TXT "v=spf1 include:_spf.relay.test -all"' in verified.stdout
    assert (
        '_dmarc.mail.example.org. IN TXT "v=DMARC1; p=reject; adkim=r; aspf=r"' in verified.stdout
    )

    local = cli("domain", "verify", "news.example.org", "--without-dns")
    assert local.returncode == 0
    assert "WITHOUT a DNS check" in local.stderr
    doms = {d["name"]: d for d in cli.json("domain", "list", ALICE)}  # type: ignore[union-attr]
    assert doms["mail.example.org"]["verified_without_dns"] is False
    assert doms["news.example.org"]["verified_without_dns"] is True
    assert "(without DNS)" in cli("domain", "list").stdout
    refused(cli("domain", "verify", "unknown.example.org"), 1, "no enrolled domain")
    records = cli.json("domain", "records", "mail.example.org")
    assert len(records) == 4  # type: ignore[arg-type]
    assert "PRIVATE" not in json.dumps(cli.json("domain", "list"))


def test_keys_and_suppressions(cli: Cli) -> None:
    cli("member", "add", ALICE, "--handle", "alice.test")
    issued = cli("key", "issue", ALICE)
    assert issued.returncode == 0
    assert "this is the only time it is shown" in issued.stdout
    key = cli.json("key", "issue", ALICE)
    assert key["key"].startswith("atmos_")  # type: ignore[index]
    listed = cli.json("key", "list", ALICE)
    assert len(listed) == 2  # type: ignore[arg-type]
    assert all("key" not in k and "bcrypt_hash" not in k for k in listed)  # type: ignore[union-attr]
    assert cli("key", "revoke", key["key_id"]).returncode == 0  # type: ignore[index]
    refused(cli("key", "revoke", key["key_id"]), 1, "already revoked")  # type: ignore[index]
    refused(cli("key", "revoke", "nosuchid"), 1, "no API key nosuchid")
    refused(cli("key", "issue", BOB), 1, "no member")
    assert "revoked" in cli("key", "list", ALICE).stdout

    assert cli("suppression", "add", ALICE, "Someone@Example.ORG").returncode == 0
    assert cli.json("suppression", "list", ALICE)[0]["address"] == "Someone@example.org"  # type: ignore[index]
    refused(cli("suppression", "add", ALICE, "not-an-address"), 65, "is not an email address")
    assert cli("suppression", "remove", ALICE, "Someone@example.org").returncode == 0
    refused(cli("suppression", "remove", ALICE, "Someone@example.org"), 1, "is not suppressed")
    assert "no suppressed addresses" in cli("suppression", "list", ALICE).stdout


def test_no_command_but_key_issue_prints_a_key(cli: Cli) -> None:
    """Every other output, human or --json, success or error, keeps the key to itself, even
    when the operator pastes the whole key where an id belongs."""
    cli("member", "add", ALICE, "--handle", "alice.test")
    key = cli.json("key", "issue", ALICE)["key"]  # type: ignore[index]
    secret = key[len("atmos_") + 8 :]
    outputs = []
    for args in (
        ("member", "show", ALICE),
        ("member", "list"),
        ("key", "list", ALICE),
        ("domain", "list"),
        ("key", "revoke", key + "x"),  # not a key: refused, not echoed
        ("key", "revoke", "atmos_" + "y" * 60),
        ("key", "revoke", key),  # the whole key: revoked by its id
        ("key", "revoke", key),  # already revoked
        ("member", "show", key),  # a key where a DID belongs
    ):
        for fmt in ((), ("--json",)):
            result = cli(*args, *fmt)
            outputs.append((args, result.returncode, result.stdout + result.stderr))
    for args, _, text in outputs:
        assert secret not in text, args
    assert [code for _, code, _ in outputs[8:16]] == [65, 65, 65, 65, 0, 1, 1, 1]
    assert "revoked" in outputs[12][2]
    assert "not repeated here" in outputs[8][2]


def test_bad_config_is_refused_for_operator_commands(cli: Cli) -> None:
    cli.config.write_text("[dns]\nnameservers = ['127.0.0.1:99999']\n")
    refused(cli("member", "list"), 64, "dns.nameservers")


def test_member_limits_labels_and_standing(cli: Cli) -> None:
    assert cli("member", "add", ALICE, "--handle", "alice.test").returncode == 0
    shown = cli.json("member", "show", ALICE)
    assert isinstance(shown, dict)
    assert shown["standing"] == {
        "tier": "warming 1 (days 0-7)",
        "hourly_limit": 5,
        "daily_limit": 50,
        "custom_limits": False,
        "throttled": False,
        "last_hour": 0,
        "last_day": 0,
        "suspended": False,
    }
    out = cli("member", "limits", ALICE, "--hourly", "300", "--daily", "3000")
    assert out.returncode == 0, out.stderr
    assert "300/hour, 3000/day (set by the operator)" in out.stdout
    out = cli("member", "label", "add", ALICE, "throttled")
    assert "label throttled added" in out.stdout and "halves the hourly limit" in out.stdout
    assert "shadow label" in cli("member", "label", "add", ALICE, "shadow:velocity").stdout
    assert "not a label the relay acts on" in cli("member", "label", "add", ALICE, "vip").stdout
    standing = cli.json("member", "show", ALICE)["standing"]  # type: ignore[index]
    assert (standing["hourly_limit"], standing["daily_limit"]) == (150, 3000)
    human = cli("member", "show", ALICE).stdout
    assert "labels: shadow:velocity, throttled, vip" in human
    assert "limits: 150/hour, 3000/day (warming 1 (days 0-7), set by the operator, " in human
    assert "halved: throttled)" in human
    assert "sent: 0 recipient(s) in the last hour, 0 in the last day" in human
    out = cli("member", "label", "remove", ALICE, "throttled")
    assert "label throttled removed" in out.stdout
    assert "already lacks" in cli("member", "label", "remove", ALICE, "throttled").stdout
    out = cli("member", "limits", ALICE, "--reset")
    assert "5/hour, 50/day (warming 1 (days 0-7))" in out.stdout
    refused(cli("member", "limits", ALICE), 65, "give --hourly N and/or --daily N")
    refused(cli("member", "limits", ALICE, "--hourly", "0"), 65, "--hourly must be at least 1")
    refused(cli("member", "label", "add", ALICE, "no spaces"), 65, "is not a label")
    refused(cli("member", "limits", BOB, "--hourly", "5"), 1, f"no member {BOB}")


def test_domain_unpause_and_suppression_reasons(cli: Cli, tmp_path: Path) -> None:
    from atmosrelay.accounts.store import Store

    assert cli("member", "add", ALICE, "--handle", "alice.test").returncode == 0
    assert cli("domain", "add", ALICE, "example.org").returncode == 0
    refused(cli("domain", "unpause", "example.org"), 1, "domain example.org is not paused")
    store = Store(tmp_path / "var" / "accounts.sqlite3")
    store.set_paused("example.org", "bounce rate 2/10 = 20.0% over 24 h (threshold 5.00%)")
    store.suppress(ALICE, "gone@example.net", "hard-bounce", "5.1.1 550 5.1.1 no such user")
    store.suppress(ALICE, "gone@example.net", "unsubscribe")  # does not weaken it
    store.suppress(ALICE, "optout@example.net", "unsubscribe")
    store.suppress(ALICE, "optout@example.net", "complaint")  # strengthens it
    store.close()
    assert "paused: bounce rate 2/10" in cli("domain", "list").stdout
    out = cli("domain", "unpause", "example.org")
    assert out.returncode == 0 and "unpaused (it was paused: bounce rate 2/10" in out.stdout
    assert "paused" not in cli("domain", "list").stdout
    listed = cli("suppression", "list", ALICE).stdout.splitlines()
    assert listed[0].startswith("gone@example.net  hard-bounce  since ")
    assert listed[0].endswith("5.1.1 550 5.1.1 no such user")
    assert listed[1].startswith("optout@example.net  complaint  since ")


def test_operator_records_print_the_key_the_relay_signs_with(cli: Cli, tmp_path: Path) -> None:
    first = cli.json("operator", "records")
    assert cli.json("operator", "records") == first  # the same key every time
    by_type = {(r["name"], r["type"], r["strings"][0][:8]): r for r in first}  # type: ignore[index,union-attr]
    operator, created = ensure_operator_key(tmp_path / "var" / "dkim", "atmosrelay.localhost")
    assert not created  # the command made it; the relay would load this one
    (dkim,) = [r for r in first if r["name"].endswith("._domainkey.atmosrelay.localhost")]  # type: ignore[index,union-attr]
    assert dkim["name"] == f"{operator.selector}._domainkey.atmosrelay.localhost"  # type: ignore[index]
    assert "".join(dkim["strings"]) == dkim_record_value("rsa", operator.key.public_b64)  # type: ignore[index]
    assert ("atmosrelay.localhost", "MX", "10 local") in by_type
    assert ("atmosrelay.localhost", "TXT", "v=spf1 a") in by_type
    assert ("_dmarc.atmosrelay.localhost", "TXT", "v=DMARC1") in by_type
    refused(cli("domain", "records", "atmosrelay.localhost"), 1, "'atmosrelay operator records'")


def test_a_malformed_domain_is_malformed_input_for_every_domain_command(cli: Cli) -> None:
    for args in (
        ("domain", "remove", "bad domain!"),
        ("domain", "rotate-dkim", "bad domain!"),
        ("domain", "rotate-dkim", "bad domain!", "--activate"),
        ("domain", "verify", "bad domain!"),
    ):
        refused(cli(*args), 65, "is not a valid domain name")  # no traceback either
