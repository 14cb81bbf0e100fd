"""The protocol core's one error type.

Inside the core, anything wrong with a received frame raises ``FrameError``.
``Connection.next_event()`` is the single entry point that turns it into a
``BadFrame`` event carrying the reply to send, so callers never see it.

``LocalProtocolError`` is different: it means *our* side tried to send
something the state machine does not allow. That is a bug in the caller.
"""


class FrameError(Exception):
    """A received frame is invalid; the frame is dropped and nothing changes."""

    def __init__(self, code: str, text: str, verb: str = "-", fatal: bool = False):
        super().__init__(text)
        self.code = code
        self.text = text
        self.verb = verb
        self.fatal = fatal


class LocalProtocolError(Exception):
    """Our side tried to send an event that is not valid in this state."""
