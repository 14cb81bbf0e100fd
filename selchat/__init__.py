"""selchat: a direct-chat server and terminal client on a single-threaded reactor."""

from selchat._version import __version__

__all__ = ["__version__"]
