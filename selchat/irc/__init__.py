"""The IRC front end: irssi, WeeChat, HexChat ... as selchat clients (``selchat serve --irc-port``)."""
