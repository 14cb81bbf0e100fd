"""The IRC front end on nodes of a cluster (needs redis-server; skips without it):
an IRC user on one node chats with a selchat user on another, and one
session per account holds across nodes and front ends."""

from __future__ import annotations

from tests.clusterharness import CLUSTER_ARGS, make_cluster  # noqa: F401 (fixture)
from tests.ircsupport import IrcClient, irc_user_asks, make_account, next_stdout_line
from tests.support import RawUser, V2User


def irc_port(node) -> int:
    """The node's IRC port: the line after "listening on" on its stdout."""
    line = next_stdout_line(node.proc.stdout)
    assert line.startswith("IRC clients: "), line
    return int(line.split()[2].rsplit(":", 1)[1])


def irc_user_on_the_first_of_two_nodes(make_cluster, sasl: bool = False):
    """Two nodes with IRC on, and an IRC user logged in on the first:
    (first node, second node, the IRC user's name, its IrcClient)."""
    cluster = make_cluster(2, *CLUSTER_ARGS, "--irc-port", "0")
    cluster.require_cluster()
    a, b = cluster.node(0), cluster.node(1)
    port = irc_port(a)
    name = make_account(a)
    client = IrcClient(a.host, port)
    if sasl:
        client.register_sasl(name)
    else:
        client.register(name)
    return a, b, name, client


def test_irc_user_and_selchat_user_on_two_nodes(make_cluster):
    a, b, name, client = irc_user_on_the_first_of_two_nodes(make_cluster, sasl=True)
    bob = RawUser(b)

    irc_user_asks(client, name, bob)  # the hub's answers come from Redis

    client.send(*[f"PRIVMSG {bob.name} :across {i}" for i in range(20)])
    assert [bob.login.line() for _ in range(20)] == [f"MSG {name} across {i}" for i in range(20)]
    bob.chat.send(*[f"MSG back {i}" for i in range(20)])
    assert [client.expect("PRIVMSG").params[1] for _ in range(20)] == [f"back {i}" for i in range(20)]

    client.send(f"WHOIS {bob.name}")  # WHO through the cluster
    client.expect("311", name, bob.name)
    client.expect("312")
    client.expect("301")
    client.expect("318")

    # the same account from the selchat protocol on node b ends the IRC session on node a
    again = RawUser(b, name, register=False)
    assert "replaced" in client.expect("ERROR").params[0]
    assert client.msg() is None
    bob.login.expect(f"ENDED {name} dropped")
    assert again.name == name


def test_irc_user_hears_a_partner_on_another_node_go_away_and_come_back_on_the_other(make_cluster):
    a, b, name, client = irc_user_on_the_first_of_two_nodes(make_cluster)
    alice = V2User(b.connect)
    alice.chat.send(f"CHAT {name}")
    assert client.notice() == f"{alice.name} wants to chat: /msg selchat yes (or no)"
    client.send("PRIVMSG selchat :yes")
    alice.expect(f"STARTED {name}")
    assert client.notice().startswith(f"chat with {alice.name} started")

    alice.cut()  # node b sees the drop: the IRC user's node is told through Redis
    assert client.notice().startswith(f"{alice.name} is away (reconnecting)")
    client.send(f"PRIVMSG {alice.name} :held for you")
    alice.connect = a.connect  # and resumes on node a: TAKE says BACK
    alice.resume()
    assert client.notice() == f"{alice.name} is back"
    alice.expect(f"STARTED {name}")  # node a says where her session stands
    assert alice.expect(f"MSG {name} ") == f"MSG {name} held for you"
    alice.chat.send("MSG from node a now")
    assert client.expect("PRIVMSG").params == (name, "from node a now")
