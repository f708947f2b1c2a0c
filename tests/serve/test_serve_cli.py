"""``btmm serve``'s command line: help always works, and the user commands take the domain
from the database they open (``--domain`` only names it on a fresh one)."""

from __future__ import annotations

from pathlib import Path

import dns.name
import pytest
from click.testing import CliRunner

from btmm_core.cli import btmm
from btmm_core.registry.storage import SqliteStorage


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    # The environment of whoever runs the tests must not name a domain or state directory.
    monkeypatch.delenv("BTMM_REGISTRY_DOMAIN", raising=False)
    monkeypatch.delenv("BTMM_REGISTRY_STATE", raising=False)
    return CliRunner()


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--help"],
        ["serve", "user", "--help"],
        ["serve", "user", "add", "--help"],
        ["serve", "user", "invite", "--help"],
        ["serve", "user", "revoke", "--help"],
    ],
)
def test_help_needs_no_domain(runner: CliRunner, args: list[str]) -> None:
    r = runner.invoke(btmm, args)
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output and "Missing option" not in r.output


def test_serving_still_needs_a_domain(runner: CliRunner, tmp_path: Path) -> None:
    r = runner.invoke(btmm, ["serve", "--state-dir", str(tmp_path)])
    assert r.exit_code == 2 and "Missing option '--domain'" in r.output


def user(runner: CliRunner, state: Path, *args: str, domain: str | None = None):  # type: ignore[no-untyped-def]
    pre = ["serve", "--state-dir", str(state)] + (["--domain", domain] if domain else [])
    return runner.invoke(btmm, [*pre, "user", *args])


def test_user_commands_read_the_domain_from_the_database(
    runner: CliRunner, tmp_path: Path
) -> None:
    r = user(runner, tmp_path, "add", "bob", domain="members.example")
    assert r.exit_code == 0, r.output
    assert "zone bob.members.example." in r.output
    storage = SqliteStorage(tmp_path / "registry.sqlite")
    assert storage.domain() == dns.name.from_text("members.example")
    storage.close()
    # No --domain from here on: the database says which domain it serves.
    r = user(runner, tmp_path, "add", "alice")
    assert r.exit_code == 0, r.output
    assert "zone alice.members.example." in r.output
    credentials = (tmp_path / "credentials" / "alice.key").read_text()
    assert "ns.members.example." in credentials
    r = user(runner, tmp_path, "rotate-key", "bob")
    assert r.exit_code == 0, r.output
    r = user(runner, tmp_path, "invite", "bob", "--out", str(tmp_path / "laptop.invite"))
    assert r.exit_code == 0, r.output
    r = user(runner, tmp_path, "list")
    assert r.exit_code == 0 and "alice\talice.members.example." in r.output
    # Naming the same domain again is fine.
    r = user(runner, tmp_path, "list", domain="members.example.")
    assert r.exit_code == 0, r.output


def test_a_domain_that_disagrees_with_the_database_is_refused(
    runner: CliRunner, tmp_path: Path
) -> None:
    assert user(runner, tmp_path, "add", "bob", domain="members.example").exit_code == 0
    r = user(runner, tmp_path, "add", "carol", domain="other.example")
    assert r.exit_code == 1
    assert "--domain other.example. disagrees with" in r.output
    assert "serves members.example." in r.output
    r = user(runner, tmp_path, "list")
    assert "carol" not in r.output


def test_a_fresh_database_says_what_to_pass(runner: CliRunner, tmp_path: Path) -> None:
    r = user(runner, tmp_path, "add", "bob")
    assert r.exit_code == 1
    assert "has no domain yet: pass --domain" in r.output
    # Commands that need no domain work on it all the same.
    assert user(runner, tmp_path, "list").exit_code == 0


def test_a_database_made_by_a_served_registry_names_its_domain(tmp_path: Path) -> None:
    # ``btmm serve`` stores the parent zone at start; an older database that only has user
    # zones still names its domain through them.
    storage = SqliteStorage(tmp_path / "a.sqlite")
    storage.ensure_zone(dns.name.from_text("members.example"), None)
    assert storage.domain() == dns.name.from_text("members.example")
    storage.close()
    storage = SqliteStorage(tmp_path / "b.sqlite")
    storage.ensure_zone(dns.name.from_text("bob.members.example"), "bob")
    assert storage.domain() == dns.name.from_text("members.example")
    storage.close()
