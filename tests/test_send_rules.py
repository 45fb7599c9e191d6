"""One rule set for every `send`, whichever reader read it.

The fast reader (dm.wire.send.read_send) and the general parser must agree: on the header,
on the relayed bytes, and on every outcome. These tests generate frames a client or an
attacker could write and feed them to a real session twice, once as the node runs and once
with the fast reader switched off, and compare everything that comes out.
"""
from __future__ import annotations

import base64
import json
import secrets

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RELAY_HUB_BOOK_SIZE as BOOK_SIZE  # noqa: E402
from conftest import logged_in_sockets
from dm import crypto, wire
from dm.relay import session as session_module
from dm.relay.ledger import DeliveryLedger
from dm.relay.node import Node
from dm.relay.sealing import NodeLayer
from dm.relay.session import Session
from dm.wire.send import deliver_prefix, plan_encode, plan_splice, read_send, seal_deliver, send_header
from helpers import Transport
from test_abuse import read_frame
from test_relay_burst import open_announced_book


def b64(size: int) -> str:
    return base64.b64encode(secrets.token_bytes(size)).decode()


# Envelope variants an attacker could write: slots of the wrong size or spelling (33 bytes; 32
# bytes with the spare bits of the last digit set, i.e. 2 more bits), a ciphertext that is not
# base64, and more visible bytes than wire.MAX_VISIBLE.
VARIANTS = ["ok", "ok", "ok", "long-slot", "spare-bits", "long-digest", "bad-base64", "short-base64", "visible"]


def canonical_envelope(proof: bool, variant: str = "ok") -> dict:
    envelope = {"from": "alice", "to": "bob", "msg_id": "m1", "ts": 1_700_000_000, "wrapped_key": b64(48),
                "nonce": b64(12), "code_slot": b64(32), "digest": b64(32), "ciphertext": b64(40),
                "signature": b64(48)}
    if variant == "long-slot":
        envelope["code_slot"] = b64(33)
    elif variant == "spare-bits":
        envelope["code_slot"] = envelope["code_slot"][:42] + "B="
    elif variant == "long-digest":
        envelope["digest"] = b64(34)
    elif variant == "bad-base64":
        envelope["ciphertext"] = envelope["ciphertext"][:-4] + "A=AA"
    elif variant == "short-base64":
        envelope["ciphertext"] = "QUJ"
    elif variant == "visible":
        envelope["wrapped_key"] = b64(wire.MAX_VISIBLE)
    if proof:
        envelope["proof"] = [b64(32), b64(32)]
        envelope["leaf"] = 1
    return envelope


LAYER = NodeLayer(secrets.token_bytes(32))


def relayed(build, *args):
    """What one deliver builder gives: its bytes, or the refusal's (code, ref)."""
    try:
        return build(*args)
    except wire.ProtocolError as exc:
        return exc.code, exc.ref


# --- generated frames -------------------------------------------------------------------

def _frames(root_hex: str):
    roots = st.sampled_from([root_hex, root_hex.upper(), "0x" + root_hex, "0x" + root_hex.upper(), "ab" * 32])
    indices = st.sampled_from([0, 1, BOOK_SIZE - 1, BOOK_SIZE, 999_999_999, 2**32, -1, True, "0"])
    book = st.builds(lambda r, i: {"book": r, "index": i}, roots, indices)
    single = st.builds(lambda h: {"code_hash": h}, st.sampled_from(["cd" * 32, "0x" + "EF" * 32, "12"]))
    extra = st.builds(lambda r: {"book": r, "index": 0, "pad": 1}, roots)
    bounties = st.one_of(book, book, single, extra)
    envelopes = st.one_of(st.builds(canonical_envelope, st.booleans(), st.sampled_from(VARIANTS)),
                          st.sampled_from([{"from": "alice"}, "text", [1, 2], 7, None, {}]))
    return st.fixed_dictionaries({
        "to": st.sampled_from(["bob", "bob", "carol", "nobody", "b\u00f6b", ""]),
        "msg_id": st.one_of(st.sampled_from(["m1", "m1", "a b", 'q"uote', "\\", "x" * 64, "x" * 65]),
                            st.text(min_size=1, max_size=8)),
        "bounty": bounties,
        "channel": st.sampled_from([None, None, "#c", "#other", "c"]),
        "envelope": envelopes,
        "layout": st.sampled_from(["compact", "compact", "spaced", "ascii", "shuffled", "envelope-shuffled"]),
        "tamper": st.sampled_from([None, None, None, "append-from", "append-pad", "duplicate-to",
                                   "envelope-not-json", "envelope-duplicate", "escape-to", "byte"]),
        "byte_at": st.integers(min_value=0, max_value=10_000),
        "byte": st.integers(min_value=0, max_value=255),
        "shuffle_seed": st.integers(min_value=0, max_value=2**16),
    })


def render(spec: dict) -> bytes:
    """One frame payload from a generated spec: a send, then laid out and tampered with."""
    import random

    rng = random.Random(spec["shuffle_seed"])
    message = {"type": "send", "to": spec["to"], "msg_id": spec["msg_id"], "bounty": spec["bounty"]}
    if spec["channel"] is not None:
        message["channel"] = spec["channel"]
    envelope = spec["envelope"]
    if spec["layout"] == "envelope-shuffled" and isinstance(envelope, dict):
        items = list(envelope.items())
        rng.shuffle(items)
        envelope = dict(items)
    message["envelope"] = envelope
    if spec["layout"] == "shuffled":
        items = list(message.items())
        rng.shuffle(items)
        message = dict(items)
    separators = (", ", ": ") if spec["layout"] == "spaced" else (",", ":")
    text = json.dumps(message, separators=separators, ensure_ascii=spec["layout"] == "ascii")
    payload = text.encode("utf-8", "surrogatepass")
    tamper = spec["tamper"]
    if tamper == "append-from" and payload.endswith(b"}"):
        payload = payload[:-1] + b',"from":"mallory","pad":{}}'
    elif tamper == "append-pad" and payload.endswith(b"}"):
        payload = payload[:-1] + b',"pad":{}}'
    elif tamper == "duplicate-to":
        payload = payload.replace(b'"to":', b'"to":"carol","to":', 1)
    elif tamper == "envelope-not-json":
        at = payload.find(b'"envelope":')
        if at >= 0:
            payload = payload[:at] + b'"envelope":{not json}}'
    elif tamper == "envelope-duplicate":
        payload = payload.replace(b'"nonce":', b'"nonce":"QUJD","nonce":', 1)
    elif tamper == "escape-to":
        payload = payload.replace(b'"to":"bob"', b'"to":"b\\u006fb"', 1)
    elif tamper == "byte" and payload:
        at = spec["byte_at"] % len(payload)
        payload = payload[:at] + bytes([spec["byte"]]) + payload[at + 1:]
    return payload


# --- the readers alone ---------------------------------------------------------------

@settings(max_examples=600, deadline=None, database=None)
@given(_frames("ab" * 32))
def test_the_fast_reader_accepts_only_what_the_general_parser_reads_the_same(spec):
    payload = render(spec)
    header = read_send(payload)
    if header is None:
        return  # the general parser takes it; the session test below compares outcomes
    message = wire.check_client_message(wire.parse(payload), "ready")  # must not raise
    assert send_header(message) == header
    prefix = deliver_prefix("alice")
    payer = "0x" + "a1" * 20
    paid_by = header.paid_by + (payer,)
    fast_plan = relayed(plan_splice, prefix, payload, LAYER.max_visible, header.msg_id)
    general_plan = relayed(plan_encode, "alice", message, LAYER.max_visible)
    joined = lambda plan: plan if isinstance(plan[0], str) else (plan[0] + plan[1], *plan[2:])  # noqa: E731
    assert joined(fast_plan) == joined(general_plan)
    fast = fast_plan if isinstance(fast_plan[0], str) else \
        relayed(seal_deliver, fast_plan, LAYER.seal, "alice", header.msg_id, paid_by)
    assert fast == relayed(lambda: seal_deliver(plan_encode("alice", message, LAYER.max_visible), LAYER.seal,
                                                "alice", header.msg_id, paid_by))
    if not isinstance(fast, tuple):  # the size the rules judged is the size that goes out
        assert fast_plan[4] == len(fast)
    if isinstance(fast, tuple):  # refused alike by both: only for the envelope's content
        assert fast[0] == "bad_field" and fast[1] == header.msg_id
        return
    deliver = wire.parse(fast)
    assert deliver["from"] == "alice" and list(deliver).count("from") == 1
    # The node's layer covers the ciphertext, and its released key opens it to the sender's bytes.
    sent = message["envelope"]
    assert {**deliver["envelope"], "ciphertext": sent["ciphertext"]} == sent
    assert deliver["envelope"]["ciphertext"] != sent["ciphertext"]
    key = LAYER.key("alice", header.msg_id, header.paid_by + (payer,))
    assert crypto.open_node_layer(key, deliver["envelope"]["ciphertext"]) == base64.b64decode(sent["ciphertext"])
    for other in (("alice", header.msg_id + "x", header.paid_by + (payer,)),
                  ("alice", header.msg_id, header.paid_by + ("0x" + "b2" * 20,))):  # another msg_id, another payer
        with pytest.raises(crypto.WrongRelease):
            crypto.open_node_layer(LAYER.key(*other), deliver["envelope"]["ciphertext"])


def test_the_fast_reader_takes_what_clients_write():
    """Canonical frames from the real sealer take the fast path (or the hot path is dead)."""
    alice, bob = crypto.generate_private_key(2048), crypto.generate_private_key()
    envelopes = crypto.seal_many([({"text": "hi"}, "bob", bob.public_key())] * 3,
                                 sender="alice", sender_key=alice)
    single = crypto.seal({"text": "hi"}, sender="alice", recipient="bob", sender_key=alice,
                         recipient_public_key=bob.public_key())
    for envelope in [*envelopes, single]:
        payload = wire.encode({"type": "send", "to": "bob", "msg_id": envelope["msg_id"],
                               "bounty": {"book": "ab" * 32, "index": 3}, "envelope": envelope})[4:]
        assert read_send(payload) == ("bob", envelope["msg_id"], ("book", "ab" * 32, 3), None)


# --- both paths through a real session, without sockets ----------------------------------

def run_session(node: Node, payload: bytes, fast: bool, monkeypatch) -> tuple[bytes, bytes, list]:
    """alice sends `payload` to a fresh ledger; returns (what alice got, what bob got, pending ids)."""
    node.ledger = DeliveryLedger(claim_timeout=3600)
    sessions = {}
    for name in ("alice", "bob"):
        session = Session(node, Transport(name), now=0.0)
        session.name, session.phase = name, "ready"
        session.eth_address = node.pins.get(name)["eth_address"]
        session._deliver_prefix = deliver_prefix(name)
        node.online[name] = sessions[name] = session
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(session_module, "read_send", lambda payload, plain=False: None)
        sessions["alice"].receive(wire.HEADER.pack(len(payload)) + payload, now=1.0)
    return bytes(sessions["alice"].transport.written), bytes(sessions["bob"].transport.written), \
        sorted(node.ledger.pending)


@settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.data())
def test_both_readers_give_identical_outcomes(relay_hub, monkeypatch, spec):
    node, book = relay_hub
    payload = render(spec.draw(_frames(book.root.hex())))
    fast = run_session(node, payload, True, monkeypatch)
    general = run_session(node, payload, False, monkeypatch)
    assert fast == general
    to_alice, to_bob, _ = fast
    for message in wire.MessageDecoder().feed_messages(to_bob):  # whatever reached bob is one clean deliver
        assert message["type"] == "deliver" and message["from"] == "alice"


def test_a_canonical_send_really_takes_the_fast_reader(relay_hub, monkeypatch):
    node, book = relay_hub
    envelope = canonical_envelope(proof=False)
    payload = wire.encode({"type": "send", "to": "bob", "msg_id": "m1",
                           "bounty": {"book": book.root.hex(), "index": 0}, "envelope": envelope})[4:]
    calls = []
    monkeypatch.setattr(session_module, "send_header", lambda message: calls.append(message))
    to_alice, to_bob, pending = run_session(node, payload, True, monkeypatch)
    assert calls == []  # the general reader never ran
    assert wire.MessageDecoder().feed_messages(to_alice) == [{"type": "receipt", "msg_id": "m1",
                                                               "status": "delivered"}]
    assert pending == ["m1"]


# --- the two quoted attacks, over real sockets -----------------------------------------

@pytest.fixture
def pair(tester_node):
    with logged_in_sockets(tester_node.port, tester_node.data_dir, "alice", "bob", "mallory") as socks:
        yield tester_node, socks


def test_members_appended_after_the_envelope_are_refused_and_nothing_is_relayed(pair):
    """`…"envelope":{…},"from":"alice","pad":{}}` once rode the hot path, and bob's client read
    from == "alice" on a message mallory sent."""
    node, socks = pair
    book = open_announced_book(node.node, node.data_dir, socks["mallory"], "mallory", 4)
    payload = wire.encode({"type": "send", "to": "bob", "msg_id": "forged", "bounty": {"book": book.root.hex(),
                           "index": 0}, "envelope": canonical_envelope(proof=False)})[4:]
    forged = payload[:-1] + b',"from":"alice","pad":{}}'
    socks["mallory"].sendall(wire.HEADER.pack(len(forged)) + forged)
    answer = read_frame(socks["mallory"])
    assert answer["type"] == "error" and answer["code"] in ("bad_field", "bad_frame") and answer["ref"] == "forged"
    with pytest.raises(TimeoutError):
        read_frame(socks["bob"], timeout=0.5)
    # The leaf was not spent by the refusal: the honest frame goes through on it.
    socks["mallory"].sendall(wire.HEADER.pack(len(payload)) + payload)
    assert read_frame(socks["mallory"]) == {"type": "receipt", "msg_id": "forged", "status": "delivered"}
    deliver = read_frame(socks["bob"])
    assert deliver["from"] == "mallory" and deliver["msg_id"] == "forged"


def test_an_envelope_that_is_not_json_is_refused_without_a_receipt(pair):
    node, socks = pair
    book = open_announced_book(node.node, node.data_dir, socks["mallory"], "mallory", 4)
    head = wire.encode({"type": "send", "to": "bob", "msg_id": "junk",
                        "bounty": {"book": book.root.hex(), "index": 1}, "envelope": {}})[4:]
    junk = head[:head.index(b'"envelope":')] + b'"envelope":{not json}}'
    socks["mallory"].sendall(wire.HEADER.pack(len(junk)) + junk)
    answer = read_frame(socks["mallory"])
    assert answer["type"] == "error" and answer["code"] == "bad_frame", answer
    with pytest.raises(TimeoutError):
        read_frame(socks["bob"], timeout=0.5)
    assert "junk" not in node.node.ledger.pending


def test_a_request_id_comes_back_with_the_reply_and_with_a_refusal(pair):
    node, socks = pair
    sock = socks["alice"]
    sock.sendall(wire.encode({"type": "ping", "req": 7}))
    assert read_frame(sock) == {"type": "pong", "req": 7}
    sock.sendall(wire.encode({"type": "lookup", "name": "nobody", "req": 8}))
    refusal = read_frame(sock)
    assert refusal["code"] == "unknown_peer" and refusal["req"] == 8
    sock.sendall(wire.encode({"type": "ping", "req": "x"}))
    assert read_frame(sock)["code"] == "bad_field"
    sock.sendall(wire.encode({"type": "ping", "req": wire.MAX_REQUEST_ID}))
    assert read_frame(sock) == {"type": "pong", "req": wire.MAX_REQUEST_ID}
    for bad in (wire.MAX_REQUEST_ID + 1, -1, True):
        sock.sendall(wire.encode({"type": "ping", "req": bad}))
        assert read_frame(sock)["code"] == "bad_field", bad
