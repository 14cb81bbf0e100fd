"""Long runs, behind ``make test-slow``: the same properties as the quick
tests, at sizes that take minutes. ``make test`` covers each at a small size
(tests/test_adversarial.py, tests/test_bench.py)."""

from __future__ import annotations

import json
import signal

import pytest
from click.testing import CliRunner

from selchat.bench.command import bench
from tests.support import DEADLINE, Canary, RawUser, start_chat

pytestmark = pytest.mark.slow


def test_relay_soak_many_pairs_nothing_lost():
    result = CliRunner().invoke(bench, ["--pairs", "300", "--window", "32", "--duration", "30", "--repeat", "1",
                                        "--no-baseline", "--json", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["selchat"]["summary"]
    assert summary["sent"] > 0 and summary["received"] == summary["sent"]
    assert summary["lost"] == summary["reordered"] == summary["problems"] == 0


def test_idle_thousands_of_users_without_drops():
    result = CliRunner().invoke(bench, ["--idle", "3000", "--ping-interval", "2", "--json", "--quiet"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["drops"] == 0


def test_sigterm_with_hundreds_of_sessions(make_server):
    srv = make_server("--max-per-address", "0", "--conn-rate", "0")
    users = [RawUser(srv) for _ in range(300)]
    for a, b in zip(users[::2], users[1::2]):
        start_chat(a, b)
    assert srv.stop(signal.SIGTERM, timeout=DEADLINE) == 0
    for user in users:
        seen = user.login.expect_closed()
        assert seen[0] == "SHUTDOWN the server is shutting down" and seen[-1].startswith("BYE shutdown"), seen


def test_message_flood_for_a_minute_is_delivered_in_order(make_server):
    srv = make_server("--msg-rate", "500")
    canary = Canary(srv)
    alice, bob = canary.alice, canary.bob
    count = 30_000  # a minute at 500/s
    alice.chat.send(*[f"MSG flood {i}" for i in range(count)])
    for i in range(count):
        assert bob.login.line() == f"MSG {alice.name} flood {i}"
    canary.check()
