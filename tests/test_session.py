"""The session is sans-IO: driven here with bytes and a clock, and no socket at all."""
from __future__ import annotations

from dm import crypto, wire
from dm.relay.session import Session
from dm.wire.handshake import ClientHandshake
from helpers import Transport, user_keys


def test_a_session_authenticates_through_the_shared_client_handshake(relay_hub, data_dir):
    node, _ = relay_hub
    transport = Transport("alice")
    session = Session(node, transport, now=0.0)
    rsa_key, pem, eth = user_keys(data_dir, "alice")
    handshake = ClientHandshake("alice", pem, eth, lambda data: crypto.sign(rsa_key, data))
    session.receive(handshake.hello(), now=0.1)
    assert session.phase == "challenged"
    session.receive(handshake.receive(transport.take()), now=0.2)
    assert handshake.receive(transport.take()) == b""
    assert handshake.done and handshake.welcome["name"] == "alice"
    assert session.phase == "ready" and node.online["alice"] is session


def test_a_session_refuses_out_of_order_and_closes_on_a_broken_stream(relay_hub):
    node, _ = relay_hub
    transport = Transport("x")
    session = Session(node, transport, now=0.0)
    session.receive(wire.encode({"type": "peers", "req": 3}), now=0.1)
    (refusal,) = wire.MessageDecoder().feed_messages(transport.take())
    assert refusal["code"] == "out_of_order" and refusal["req"] == 3 and not transport.closed
    session.receive(wire.HEADER.pack(wire.MAX_FRAME + 1), now=0.2)
    (refusal,) = wire.MessageDecoder().feed_messages(transport.take())
    assert refusal["code"] == "frame_too_large" and transport.closed


def test_timeouts_follow_the_clock_passed_in(relay_hub):
    node, _ = relay_hub
    session = Session(node, Transport("x"), now=100.0)
    limits = (10, 5, 600)  # handshake, frame, idle
    assert session.timeout_reason(109.9, *limits) is None
    assert "authentication" in session.timeout_reason(110.1, *limits)
    session.proved = True  # past the handshake: only the frame and idle clocks run
    session.receive(wire.encode({"type": "ping"})[:6], now=200.0)  # half a frame
    assert session.timeout_reason(204.9, *limits) is None
    assert "frame" in session.timeout_reason(205.1, *limits)
    session.receive(wire.encode({"type": "ping"})[6:], now=204.0)
    assert session.timeout_reason(700.0, *limits) is None
    assert "idle" in session.timeout_reason(804.1, *limits)
