"""``selchat connect --json``: the stream checked against the schema the README documents.

The schema is read from the README's table (section "JSON output"), not
copied here: if the code and the documentation drift apart, these tests fail.
"""

from __future__ import annotations

import json
import re
import socket
from datetime import datetime, timedelta

import pytest

from selchat.client.notices import JSON_FIELDS, Notice
from selchat.client.ui import json_event
from tests.support import REPO_ROOT, ClientProcess, RawUser, unique
from tests.test_client_scripted import FakeServer

JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "array": (list,)}
PYTHON_TYPES = {str: "string", int: "integer", float: "number", list: "array"}


def documented_schema() -> dict[str, dict[str, str]]:
    """type -> {field: JSON type}, from the README's table."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("### JSON output")
    section = text[start:text.index("\n## ", start)]
    schema = {}
    for row in section.splitlines():
        match = re.fullmatch(r"\| `([a-z-]+)` \| (.*) \|", row)
        if match:
            fields = re.findall(r"`(\w+)` \((string|integer|number|array)\b", match.group(2))
            schema[match.group(1)] = dict(fields)
    assert len(schema) > 20, "the README's JSON table was not found"
    return schema


SCHEMA = documented_schema()


def check_event(line: str) -> dict:
    """One line of the stream: a JSON object exactly as the README says."""
    event = json.loads(line)
    assert isinstance(event, dict), line
    kind = event.get("type")
    assert kind in SCHEMA, f"type {kind!r} is not documented: {line}"
    fields = SCHEMA[kind]
    assert set(event) == {"type", "time", "line", *fields}, f"fields of {kind}: {line}"
    when = datetime.fromisoformat(event["time"])
    assert when.utcoffset() == timedelta(0), event["time"]
    assert isinstance(event["line"], str) and "\n" not in event["line"]
    for name, json_type in fields.items():
        value = event[name]
        assert isinstance(value, JSON_TYPES[json_type]) and not isinstance(value, bool), (kind, name, value)
    if kind == "who":
        for user in event["users"]:
            assert set(user) == {"name", "status"} and user["status"] in ("idle", "busy"), user
    if kind == "blocks":
        for user in event["users"]:
            assert set(user) == {"name", "status"} and user["status"] == "blocked", user
    return event


class JsonClient:
    """A --json client process: every stdout line is checked as it is read."""

    def __init__(self, process):
        self.process = process
        self.events: list[dict] = []

    def next(self) -> dict | None:
        line = self.process.line()
        if line is None:
            return None
        event = check_event(line)
        self.events.append(event)
        return event

    def expect(self, kind: str, **fields) -> dict:
        """Read events until one of ``kind`` (with these field values)."""
        while True:
            event = self.next()
            assert event is not None, f"stream ended without {kind}; seen {self.events}"
            if event["type"] == kind and all(event[k] == v for k, v in fields.items()):
                return event

    def rest(self) -> list[dict]:
        out = []
        while (event := self.next()) is not None:
            out.append(event)
        return out


def test_the_readme_documents_every_type_with_the_codes_fields():
    assert set(SCHEMA) == set(JSON_FIELDS)
    for kind, fields in JSON_FIELDS.items():
        assert SCHEMA[kind] == {name: PYTHON_TYPES[t] for name, (_, t) in fields.items()}, kind


def test_a_whole_session_as_json(server, clients):
    me = unique("jalice")
    bob = RawUser(server, unique("jbob"))
    client = JsonClient(clients(server.port, "--register", "--json", user=me, password="pw"))
    assert client.expect("ready")["user"] == me
    client.process.write("/who\n")
    who = client.expect("who")
    assert {"name": me, "status": "idle"} in who["users"] and {"name": bob.name, "status": "idle"} in who["users"]
    client.process.write("hello?\n/help\n/help chat\n/hlep\n")
    client.expect("hint-idle")
    client.expect("help")
    assert client.expect("help-command")["command"] == "/chat NAME"
    assert client.expect("error")["text"] == "unknown command /hlep; did you mean /help?"
    bob.chat.send(f"CHAT {me}")
    bob.chat.expect(f"OK CHAT {me}")
    client.expect("request-in", user=bob.name)
    client.process.write("yes\n")
    client.expect("started", user=bob.name)
    client.process.write("hi bob\n")
    assert client.expect("sent")["text"] == "hi bob"
    bob.login.expect(f"STARTED {me}")
    bob.login.expect(f"MSG {me} hi bob")
    bob.chat.send("MSG hi  there")
    assert client.expect("message", user=bob.name)["text"] == "hi  there"
    bob.chat.send("QUIT")
    bob.chat.expect(f"OK QUIT {me}")
    bob.login.expect(f"ENDED {me} quit")
    ended = client.expect("ended", user=bob.name)
    assert ended["reason"] == "quit" and ended["line"].startswith(f"chat with {bob.name} ended (quit): ")
    client.process.write(f"/chat {bob.name}\n")
    client.expect("request-sent", user=bob.name)
    bob.login.expect(f"REQUEST {me}")
    bob.chat.send("DECLINE")
    bob.chat.expect(f"OK DECLINE {me}")
    client.expect("declined", user=bob.name)
    client.process.close_stdin()
    assert [e["type"] for e in client.rest()] == ["logged-out"]
    assert client.process.wait() == 0
    assert client.process.rest("err") == []
    bob.close()


def test_errors_before_a_session_are_json_on_stdout_too(server, clients):
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    with refused:
        port = refused.getsockname()[1]
        client = JsonClient(clients(port, "--json", "--retry", "1"))
        assert client.process.wait() == 2
        events = client.rest()
    assert [e["type"] for e in events] == ["unreachable", "retrying", "unreachable"]
    assert events[0]["address"] == f"127.0.0.1:{port}" and events[1]["delay"] == 1
    assert client.process.rest("err") == []
    wrong = JsonClient(clients(server.port, "--json", user=unique("nobody"), password="x"))
    assert wrong.process.wait() == 1
    assert [e["type"] for e in wrong.rest()] == ["login-failed", "hint-register"]


def test_reconnecting_as_json():
    fake = FakeServer().start()
    process = ClientProcess(fake.port, "--json", "--reconnect")
    try:
        client = JsonClient(process)
        client.expect("ready")
        fake.send("LOGIN", "STARTED bob")
        client.expect("started")
        fake.close_all()
        client.expect("lost")
        assert client.next()["type"] == "chat-dropped"
        attempt = client.next()
        assert attempt["type"] == "reconnecting" and attempt["attempt"] == 1 and 0.5 <= attempt["delay"] <= 1
        again = client.expect("reconnected")
        assert again["lost_chat"] == "bob" and again["user"] == "alice"
    finally:
        process.kill()
        fake.stop()


def test_motd_and_notice_as_json(clients):
    fake = FakeServer(motd=["Welcome!", ""]).start()
    try:
        client = JsonClient(clients(fake.port, "--json"))
        assert client.next()["type"] == "ready"
        assert [(e["type"], e["text"], e["line"]) for e in (client.next(), client.next())] == [
            ("motd", "Welcome!", "Welcome!"), ("motd", "", "")]
        fake.send("LOGIN", "NOTICE back in  5 minutes")
        notice = client.next()
        assert (notice["type"], notice["text"]) == ("notice", "back in  5 minutes")
        assert notice["line"] == "notice: back in  5 minutes"
        client.process.close_stdin()
        assert [e["type"] for e in client.rest()] == ["logged-out"]
    finally:
        fake.stop()


def test_the_block_list_kinds_are_as_documented():
    for notice in (Notice("blocked", user="bob"), Notice("unblocked", user="bob"),
                   Notice("blocks", text="bob", users=(("bob", "blocked"),)), Notice("blocks", text="nobody")):
        check_event(json_event(notice))


@pytest.mark.parametrize("line", [
    '{"type": "nonsense", "time": "2025-01-01T00:00:00.000+00:00", "line": "x"}',
    '{"type": "ready", "time": "2025-01-01T00:00:00.000+00:00", "line": "x"}',
    '{"type": "ready", "time": "2025-01-01T00:00:00.000+00:00", "line": "x", "user": 3}',
    '{"type": "ready", "time": "2025-01-01T00:00:00.000+02:00", "line": "x", "user": "a"}',
    '{"type": "logged-out", "time": "2025-01-01T00:00:00.000+00:00", "line": "x", "extra": 1}',
    '{"type": "blocks", "time": "2025-01-01T00:00:00.000+00:00", "line": "x",'
    ' "users": [{"name": "b", "status": "idle"}]}',
])
def test_the_checker_refuses_what_the_schema_does_not_allow(line):
    with pytest.raises(AssertionError):
        check_event(line)
