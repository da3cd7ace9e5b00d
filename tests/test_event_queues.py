"""A node keeps one event queue per coordinator, and only while somebody
can read it: a coordinator killed mid-generation must leave nothing behind
(the last stage still publishes the token it was computing, and a timed-out
session its error), or every kill costs the node a queue for good."""

from clusterd.node.events import UNREAD_KEEP_S, EventHub
from clusterd.wire import clusterd_pb2 as pb


def event(sid: str, token: int = 1) -> pb.TokenEvent:
    return pb.TokenEvent(session_id=sid, tokens=[token])


def test_events_before_the_stream_attaches_wait_for_it():
    hub = EventHub()
    hub.opened("coord")
    assert hub.publish("coord", event("s", 7))
    q = hub.attach("coord", token=object())
    got = hub.get(q, timeout=1)
    assert got is not None and list(got.tokens) == [7]


def test_a_vanished_coordinator_leaves_no_queue():
    hub = EventHub()
    stream = object()
    hub.opened("coord")
    hub.attach("coord", stream)
    assert hub.detach("coord", stream)  # killed: its stream ended
    assert not hub.publish("coord", event("s"))  # the step in flight finishes anyway
    hub.released("coord")  # then its session is released
    assert not hub.publish("coord", event("s", 2))  # a late timeout error
    assert hub.clients() == 0


def test_the_queue_goes_with_the_last_session_when_no_stream_reads_it():
    hub = EventHub()
    hub.opened("coord")
    hub.opened("coord")
    hub.released("coord")
    assert hub.clients() == 1  # its other session still runs
    hub.released("coord")
    assert hub.clients() == 0


def test_an_attached_stream_keeps_its_queue_between_conversations():
    hub = EventHub()
    q = hub.attach("coord", token=object())
    hub.opened("coord")
    hub.released("coord")  # one conversation ended; the coordinator stays
    hub.opened("coord")
    assert hub.publish("coord", event("next", 3))
    got = hub.get(q, timeout=1)
    assert got is not None and list(got.tokens) == [3]
    assert hub.clients() == 1


def test_a_sessions_last_events_wait_for_a_stream_not_yet_attached_then_are_swept():
    hub = EventHub()
    hub.opened("coord")
    assert hub.publish("coord", event("s", 9))  # it failed before the stream came
    hub.released("coord", now=100.0)
    assert hub.sweep(now=100.0 + UNREAD_KEEP_S - 1) == 0
    q = hub.attach("coord", token=object())  # the stream comes: the error is there
    got = hub.get(q, timeout=1)
    assert got is not None and list(got.tokens) == [9]
    assert hub.sweep(now=100.0 + UNREAD_KEEP_S) == 0  # attached: not swept

    other = EventHub()
    other.opened("gone")
    other.publish("gone", event("s"))
    other.released("gone", now=100.0)
    assert other.sweep(now=100.0 + UNREAD_KEEP_S) == 1  # nobody came
    assert other.clients() == 0
