"""How the version 2 notices look: receipts on a terminal and in scripted mode."""

from __future__ import annotations

from selchat.client.core import ClientSession, Phase
from selchat.client.notices import Notice
from selchat.client.interactive import receipt_line, status_text
from selchat.client.ui import ScriptedUI


def test_receipts_of_a_batch_are_one_short_line():
    assert receipt_line(["hi"], color=False, timestamp_format=None) == "✓ delivered: 'hi'"
    line = receipt_line(["first", "x" * 100, "last"], color=False, timestamp_format=None)
    assert line == "✓ 3 delivered: 'first' … 'last'"
    assert len(receipt_line(["y" * 500], color=False, timestamp_format=None)) < 60


def test_plain_scripted_mode_prints_no_receipts(capsys):
    ui = ScriptedUI()
    ui.show(Notice("delivered", text="hi", count=1))
    ui.show(Notice("not-delivered", text="hi", detail="bob left"))
    assert capsys.readouterr().out == "not delivered: 'hi' (bob left)\n"


def test_the_status_line_says_when_the_partner_is_away():
    s = ClientSession("alice", "pw")
    s.phase, s.partner, s.partner_away = Phase.CHATTING, "bob", True
    assert "chatting with bob (away, reconnecting)" in status_text(s, None)
