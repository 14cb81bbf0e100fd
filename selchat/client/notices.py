"""What the user sees: every line the client shows, by kind (``FORMATS``),
its ``--json`` form (``JSON_FIELDS``), and ``Notice``, the effect that
carries one. The session core (``core.py``) decides when; the terminal UI
(``interactive.py``), scripted mode and ``--json`` (``ui.py``) decide how.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Every line the client shows, by kind. Scripted mode prints exactly these, one
#: per line; tests and scripts depend on them, so change them with care (add
#: new kinds rather than change old ones).
#: Fields: {user} a user name, {text} free text, {detail} a reason or code,
#: {count} a number.
FORMATS: dict[str, str] = {
    # kind               format                                         shown on
    "ready":             "logged in as {user}",                         # READY
    "request-sent":      "chat request sent to {user}",                 # OK CHAT
    "request-in":        "chat request from {user} (answer yes or no)", # REQUEST
    "started":           "chat with {user} started",                    # STARTED
    "declined":          "{user} declined your chat request",           # DECLINED
    "expired":           "chat request with {user} expired",            # EXPIRED
    "cancelled":         "chat request with {user} cancelled",          # CANCELLED
    "message":           "[{user}] {text}",                             # MSG from the partner
    "sent":              "[{user}] {text}",                             # MSG we sent (not in plain scripted mode)
    "ended":             "chat with {user} ended ({detail}): {text}",   # ENDED
    "who":               "online: {text}",                              # USER... OK WHO
    "error":             "error: {text}",                               # ERR, or refused locally
    "not-delivered":     "not delivered: '{text}' ({detail})",          # NACK
    "not-delivered-old": "not delivered: message #{text} ({detail})",   # NACK of a forgotten seq
    "shutdown":          "server: {text}",                              # SHUTDOWN
    "motd":              "{text}",                                      # MOTD: a line of the message of the day
    "notice":            "notice: {text}",                              # NOTICE: the operator's broadcast
    "disconnected":      "disconnected: {text}",                        # BYE
    "you-declined":      "you declined {user}'s chat request",          # OK DECLINE
    "you-left":          "you left the chat with {user}",               # OK QUIT while chatting
    "you-withdrew":      "you withdrew your chat request to {user}",    # OK QUIT while asking
    "logged-out":        "logged out",                                  # OK EXIT and BYE after /exit
    "lost":              "connection lost: {text}",                     # EOF without BYE, no heartbeat
    "protocol-error":    "protocol error: {text}",                      # the server broke the protocol
    "hint-idle":         "not in a chat; /chat NAME to start one",      # plain line, idle
    "hint-request-in":   "{user} asks for a chat: answer yes or no",    # plain line, request in
    "hint-request-out":  "waiting for {user} to answer; /quit withdraws the request",
    "help":              "commands: /chat NAME (ask NAME for a chat), yes or /accept,"
                         " no or /decline, /quit (leave the chat or withdraw your request),"
                         " /who (who is online), /block NAME (decline NAME's chat requests;"
                         " /unblock NAME, /blocks), /exit (log out), /help; in a chat every"
                         " other line is a message (start it with // to send a leading /)",
    "help-command":      "{text}: {detail}",                            # /help COMMAND
    # Connection trouble, with reconnecting on.
    "chat-dropped":      "chat with {user} ended: the connection was lost",
    "request-dropped":   "chat request with {user} ended: the connection was lost",
    "reconnecting":      "reconnecting in {detail} s (attempt {count}): {text}",
    "reconnected":       "reconnected: logged in as {user}; {text}",   # READY after reconnecting
    "gave-up":           "stopped reconnecting",                        # /exit, Ctrl-D while offline
    # Protocol version 2: the session survives a drop; every message gets one fate.
    "delivered":         "delivered: '{text}'",                         # DELIVERED (one per message)
    "unconfirmed":       "unconfirmed: '{text}' (sent, but whether it was delivered is not known)",
    "away":              "{user} is away (reconnecting)",               # AWAY
    "back":              "{user} is back",                              # BACK
    "chat-kept":         "the chat with {user} is kept while reconnecting; what you type is sent once it is back",
    "queued":            "not connected: '{text}' will be sent once the connection is back",
    "resumed":           "reconnected: {text}",                         # RESUMED (before the events it replays)
    "password-changed":  "your password is changed",                    # OK PASSWORD
    "account-deleted":   "your account {user} is deleted",              # OK UNREGISTER (or BYE unregistered)
    "chat-gone":         "chat with {user} is over (the server has no chat for you)",  # UNDELIVERED not-in-chat
    # The block list (servers from 0.6.0).
    "blocked":           "you blocked {user}: their chat requests are declined for you",  # OK BLOCK
    "unblocked":         "you unblocked {user}",                        # OK UNBLOCK
    "blocks":            "blocked: {text}",                             # USER... OK BLOCKS
    # Before there is a session: scripted mode prints these on stderr.
    "login-failed":      "login failed: {text}",                        # ERR LOGIN, BYE auth-failed
    "hint-register":     "no account yet? connect with --register to create one",  # after a first failed LOGIN
    "register-failed":   "registration failed: {text}",                 # ERR REGISTER
    "unreachable":       "cannot reach {text}: {detail}",               # connect() failed
    "retrying":          "retrying in {detail} s",
    # Several servers (--host a,b): each time a login socket opens.
    "connected":         "connected to {text}",
}

#: Kinds that belong on stderr in scripted mode: there is no session yet, or
#: (``connected``, only with several servers) they say only where the client
#: connected, so stdout stays the same whatever ``--host`` lists.
STDERR_KINDS = frozenset({"login-failed", "hint-register", "register-failed", "unreachable", "retrying",
                          "connected"})
#: Kinds that echo what the user did: shown on a terminal and in --json, but not
#: in plain scripted mode, whose output stays what scripts already expect.
ECHO_KINDS = frozenset({"sent"})
#: Receipts for the user's own messages: likewise not in plain scripted mode,
#: which shows no echo for them to mark (only what went wrong: not delivered).
RECEIPT_KINDS = frozenset({"delivered"})

#: The --json form of each kind: {json field: (Notice attribute, type)}. Every
#: object also has "type" (the kind), "time" and "line" (the plain line); the
#: README documents the same table, and the tests hold the two together.
JSON_FIELDS: dict[str, dict[str, tuple[str, type]]] = {
    "ready": {"user": ("user", str)},
    "request-sent": {"user": ("user", str)},
    "request-in": {"user": ("user", str)},
    "started": {"user": ("user", str)},
    "declined": {"user": ("user", str)},
    "expired": {"user": ("user", str)},
    "cancelled": {"user": ("user", str)},
    "message": {"user": ("user", str), "text": ("text", str)},
    "sent": {"user": ("user", str), "text": ("text", str)},
    "ended": {"user": ("user", str), "reason": ("detail", str), "text": ("text", str)},
    "who": {"users": ("users", list), "more": ("count", int)},
    "error": {"text": ("text", str)},
    "not-delivered": {"text": ("text", str), "reason": ("detail", str)},
    "not-delivered-old": {"seq": ("count", int), "reason": ("detail", str)},
    "shutdown": {"text": ("text", str)},
    "motd": {"text": ("text", str)},
    "notice": {"text": ("text", str)},
    "disconnected": {"reason": ("detail", str), "text": ("text", str)},
    "you-declined": {"user": ("user", str)},
    "you-left": {"user": ("user", str)},
    "you-withdrew": {"user": ("user", str)},
    "logged-out": {},
    "lost": {"text": ("text", str)},
    "protocol-error": {"text": ("text", str)},
    "hint-idle": {},
    "hint-request-in": {"user": ("user", str)},
    "hint-request-out": {"user": ("user", str)},
    "help": {},
    "help-command": {"command": ("text", str), "help": ("detail", str)},
    "chat-dropped": {"user": ("user", str)},
    "request-dropped": {"user": ("user", str)},
    "reconnecting": {"attempt": ("count", int), "delay": ("detail", float), "text": ("text", str)},
    "reconnected": {"user": ("user", str), "text": ("text", str), "lost_chat": ("detail", str)},
    "gave-up": {},
    "delivered": {"seq": ("count", int), "text": ("text", str)},
    "unconfirmed": {"seq": ("count", int), "text": ("text", str)},
    "away": {"user": ("user", str)},
    "back": {"user": ("user", str)},
    "chat-kept": {"user": ("user", str)},
    "queued": {"seq": ("count", int), "text": ("text", str)},
    "resumed": {"user": ("user", str), "text": ("text", str), "resent": ("count", int)},
    "chat-gone": {"user": ("user", str)},
    "blocked": {"user": ("user", str)},
    "unblocked": {"user": ("user", str)},
    "blocks": {"users": ("users", list)},
    "password-changed": {},
    "account-deleted": {"user": ("user", str)},
    "login-failed": {"text": ("text", str)},
    "hint-register": {},
    "register-failed": {"text": ("text", str)},
    "unreachable": {"address": ("text", str), "error": ("detail", str)},
    "retrying": {"delay": ("detail", float)},
    "connected": {"server": ("text", str)},
}


@dataclass(frozen=True, slots=True)
class Notice:
    """Something to show the user; ``line()`` renders it from ``FORMATS``.

    ``users`` is the (name, status) list of a ``who`` notice (of a ``blocks``
    notice too, each status ``blocked``: the same JSON shape); ``count`` a
    number some kinds carry (the attempt, how many more users).
    """

    kind: str
    user: str = ""
    text: str = ""
    detail: str = ""
    users: tuple[tuple[str, str], ...] = ()
    count: int = 0

    def line(self) -> str:
        return FORMATS[self.kind].format(user=self.user, text=self.text, detail=self.detail,
                                         count=self.count)

    @property
    def to_stderr(self) -> bool:
        return self.kind in STDERR_KINDS

    def fields(self) -> dict:
        """The kind's own fields for --json (``JSON_FIELDS``), typed."""
        out: dict = {}
        for name, (attr, kind) in JSON_FIELDS[self.kind].items():
            value = getattr(self, attr)
            if attr == "users":
                value = [{"name": n, "status": st} for n, st in value]
            out[name] = kind(value)
        return out
