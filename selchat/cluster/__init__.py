"""The cluster: several selchat nodes sharing one Redis (issue 10).

So far only the foundation: ``resp`` (RESP command encoding and
``redis://`` URLs, no I/O) and ``redislink`` (a Redis connection driven by
the reactor itself, with hiredis.Reader as the parser; see "The Redis link"
in docs/architecture.md). Importing ``redislink`` needs the ``cluster``
extra (hiredis); ``resp`` needs nothing.
"""
