"""A bad client must never crash or stall the node.

Every test attacks a real node over real sockets, then proves the node still
serves an honest pair of clients. Several of these first failed against the
node and now guard the fixes (accept-loop resets, EMFILE, steady senders,
lone surrogates, deep nesting).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from web3 import Web3

from conftest import ROOT, RunningNode, collecting_events, make_users, wait_until
from dm import crypto, datadir, wire
from dm.client.core import Events, Outstanding
from dm.relay import connection
from helpers import OPAQUE_ENVELOPE, login, user_keys

LOCAL = "127.0.0.1"
ETH_ADDRESS = Web3.to_checksum_address("0x" + "5a" * 20)  # hello wants a checksummed address
_pair_numbers = itertools.count(1)


# --- raw-socket helpers -----------------------------------------------------------------------

def connect(port: int, stack: contextlib.ExitStack, *, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((LOCAL, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stack.callback(sock.close)
    return sock


def raw_frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def ascii_frame(message) -> bytes:
    """A frame with every non-ASCII character \\u-escaped (so lone surrogates can go on the wire)."""
    return raw_frame(json.dumps(message).encode("ascii"))


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """sendall that tolerates the node hanging up on us half way."""
    try:
        sock.sendall(data)
    except OSError:
        pass


def abort(sock: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_frame(sock: socket.socket, timeout: float = 5.0) -> dict | None:
    """The next frame as a dict; None when the node closed (EOF or reset).
    Raises TimeoutError when nothing complete arrives within `timeout`."""
    deadline = time.monotonic() + timeout

    def exact(n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete frame within {timeout}s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(n - len(buf))
            except (ConnectionResetError, BrokenPipeError):
                return None
            except socket.timeout:
                raise TimeoutError(f"no complete frame within {timeout}s") from None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    header = exact(4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    assert length <= wire.MAX_FRAME, f"the node sent a {length}-byte frame"
    body = exact(length)
    return None if body is None else json.loads(body)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[list[dict], float]:
    """Every frame the node sends until it closes; fails if it has not closed within `timeout`.
    Returns the frames and the seconds it took."""
    start = time.monotonic()
    frames = []
    while True:
        remaining = timeout - (time.monotonic() - start)
        try:
            frame = read_frame(sock, max(remaining, 0.01))
        except TimeoutError:
            raise AssertionError(f"the node did not close the connection within {timeout}s "
                                 f"(frames so far: {frames})") from None
        if frame is None:
            return frames, time.monotonic() - start
        frames.append(frame)


def codes(frames: list[dict]) -> list[str]:
    return [f.get("code") for f in frames if f.get("type") == "error"]


def hello(name: str = "mallory", public_key: str | None = None, eth_address: str = ETH_ADDRESS) -> dict:
    if public_key is None:
        public_key = crypto.public_key_pem(_spare_key())
    return {"type": "hello", "name": name, "public_key": public_key, "eth_address": eth_address}


_SPARE = []


def _spare_key():
    if not _SPARE:
        _SPARE.append(crypto.generate_private_key(2048))
    return _SPARE[0]


def raw_login(sock: socket.socket, data_dir: Path, name: str, *, signing_key=None) -> dict | None:
    """The whole handshake on a raw socket; returns the node's answer to `auth` (welcome or error)."""
    return login(sock, data_dir, name, signing_key=signing_key)


def assert_ping_works(sock: socket.socket) -> None:
    sock.sendall(wire.encode({"type": "ping"}))
    assert read_frame(sock) == {"type": "pong"}


# --- honest clients ---------------------------------------------------------------------------

def ensure_users(data_dir: Path, *names: str) -> None:
    missing = [n for n in names if not datadir.private_key_path(data_dir, n).exists()]
    if missing:
        make_users(data_dir, *missing)


def fresh_pair_names() -> tuple[str, str]:
    n = next(_pair_numbers)
    return f"pa{n}", f"pb{n}"


def assert_arrives(inbox: queue.Queue, sender: str, text: str, timeout: float = 10) -> None:
    """The next message in `inbox` is `text` from `sender`, shown as genuine."""
    try:
        incoming = inbox.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"nothing from {sender} within {timeout:g} s") from None
    assert (incoming.sender, incoming.text, incoming.genuine) == (sender, text, True)


def assert_node_serves_a_pair(tester_node, a: str | None = None, b: str | None = None, *,
                              wait_paid: bool = False):
    """Two fresh clients; one paid message a -> b arrives genuine with the right text."""
    if a is None:
        a, b = fresh_pair_names()
    ensure_users(tester_node.data_dir, a, b)
    b_inbox, _, _, b_events = collecting_events()
    _, a_receipts, a_paid, a_events = collecting_events()
    receiver = tester_node.client(b, b_events)
    sender = tester_node.client(a, a_events, pay="single")
    text = f"{a} says hi to {b}"
    msg_id = sender.send_text(b, text)
    assert_arrives(b_inbox, a, text)
    wait_until(lambda: a_receipts.get(msg_id) == "delivered", timeout=10, message="the delivered receipt")
    if wait_paid:
        wait_until(lambda: msg_id in a_paid, timeout=8, message="the paid notice (the node redeemed the code)")
    return sender, receiver


# --- a second node, for the connection cap and accept-loop tests -----------------------------

def hello_gets_challenge(port: int, timeout: float = 3.0) -> bool:
    """Whether a new connection is served at all (accepted, and answered)."""
    with contextlib.ExitStack() as stack:
        sock = connect(port, stack)
        sock.sendall(wire.encode(hello("probe")))
        try:
            reply = read_frame(sock, timeout)
        except TimeoutError:
            return False
        return reply is not None and reply["type"] == "challenge"


# =============================================================================================
# 1-3: bytes that are not frames
# =============================================================================================

def test_garbage_bytes_get_an_error_or_a_hang_up_and_the_node_goes_on(tester_node):
    with contextlib.ExitStack() as stack:
        attacker = connect(tester_node.port, stack)
        send_quietly(attacker, os.urandom(64 * 1024))
        # Whatever the random header says, the stream is refused: too large at once, bad frames until
        # max_errors, or a body that never completes (frame/handshake timeout, 3 s here).
        frames, _ = read_until_closed(attacker, timeout=6)
        assert all(f["type"] == "error" for f in frames), frames
        assert set(codes(frames)) <= {"frame_too_large", "bad_frame", "unknown_type", "bad_field",
                                      "out_of_order", "timeout", "invalid_name"}
    assert_node_serves_a_pair(tester_node)


def test_a_4gb_or_just_too_large_length_header_is_refused_at_once(tester_node):
    with contextlib.ExitStack() as stack:
        for length in (0xFFFFFFFF, wire.MAX_FRAME + 1):
            attacker = connect(tester_node.port, stack)
            start = time.monotonic()
            attacker.sendall(struct.pack(">I", length) + b'{"type":"ping"')  # no body follows: no waiting
            frames, _ = read_until_closed(attacker, timeout=2)
            assert time.monotonic() - start < 2  # answered promptly, without allocating 4 GB
            assert codes(frames) == ["frame_too_large"], (length, frames)
            assert str(wire.MAX_FRAME) in frames[0]["message"]
        # exactly MAX_FRAME is allowed: the node waits for that body instead of refusing it
        patient = connect(tester_node.port, stack)
        patient.sendall(struct.pack(">I", wire.MAX_FRAME))
        with pytest.raises(TimeoutError):
            read_frame(patient, timeout=0.3)
    assert_node_serves_a_pair(tester_node)


# =============================================================================================
# 4-5: well-framed nonsense before authentication
# =============================================================================================

SEND_BEFORE_HELLO = {"type": "send", "to": "bob", "msg_id": "m1", "bounty": {"code_hash": "ab" * 32},
                     "envelope": {}}

NON_FATAL = [  # (what, payload, the error code)
    ("send before hello", json.dumps(SEND_BEFORE_HELLO).encode(), "out_of_order"),
    ("auth before hello", b'{"type":"auth","signature":"AAAA"}', "out_of_order"),
    ("unknown type", b'{"type":"teleport"}', "unknown_type"),
    ("a JSON list", b"[1,2]", "bad_frame"),
    ("a non-string type", b'{"type":7}', "bad_frame"),
    ("an empty frame", b"", "bad_frame"),
    ("truncated JSON", b'{"type":"ping"', "bad_frame"),
    ("not UTF-8", b'{"type":"\xc3\x28"}', "bad_frame"),
    ("UTF-16 JSON", '\ufeff{"type":"ping"}'.encode("utf-16-le"), "bad_frame"),
    ("UTF-16 JSON without a BOM", '{"type":"ping"}'.encode("utf-16-le"), "bad_frame"),
    ("a missing field", b'{"type":"send","to":"bob"}', "bad_field"),
    ("a bool for an object", b'{"type":"send","to":"b","msg_id":"m","bounty":true,"envelope":{}}', "bad_field"),
]


def test_non_fatal_bad_frames_get_their_error_code_and_the_session_goes_on(tester_node):
    with contextlib.ExitStack() as stack:
        for what, payload, code in NON_FATAL:
            attacker = connect(tester_node.port, stack)
            attacker.sendall(raw_frame(payload))
            reply = read_frame(attacker)
            assert reply is not None and reply["type"] == "error", (what, reply)
            assert reply["code"] == code, (what, reply)
            assert_ping_works(attacker)  # one bad frame is not fatal: the stream is still in sync
    assert_node_serves_a_pair(tester_node)


# A node in a child process: an attack that kills the process must not take pytest down with it.
NODE_PROCESS = r"""
import sys
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from dm.chain import devchain, ethereum
from helpers import start_node
data = Path(sys.argv[2])
w3 = ethereum.connect(ethereum.TESTER_URL)
token, _ = devchain.ensure_deployment(w3, ethereum.TESTER_URL, data)
node = start_node(token, data, handshake_timeout=10, frame_timeout=10, redeemer_options={})
print(node.port, flush=True)
sys.stdin.read()
node.stop()
"""


@pytest.fixture
def node_process(tmp_path):
    data = tmp_path / "child"
    data.mkdir(mode=0o700)
    proc = subprocess.Popen([sys.executable, "-c", NODE_PROCESS, str(ROOT), str(data)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"the node process did not start: {line!r} {proc.stderr.read()}"
        yield proc, int(line)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


def test_deeply_nested_json_does_not_crash_the_node(node_process):
    """web3's imports raise the recursion limit to 100000 and connection threads have 512 KB stacks:
    json.loads on deep nesting would overflow the C stack and kill the process (SIGSEGV), which is
    why this runs against a node in a child process."""
    proc, port = node_process
    depth = 100_000  # a 200 KB frame, far below MAX_FRAME
    with contextlib.ExitStack() as stack:
        attacker = connect(port, stack)
        attacker.sendall(raw_frame(b"[" * depth + b"]" * depth))
        reply = read_frame(attacker)
        assert reply is not None and reply.get("code") == "bad_frame", reply
        # as deep as the parser allows, inside a real message: parsed, and refused as unknown
        inner = wire.MAX_CONTAINERS - 1
        attacker.sendall(raw_frame(b'{"type":"teleport","x":' + b"[" * inner + b"]" * inner + b"}"))
        reply = read_frame(attacker)
        assert reply is not None and reply.get("code") == "unknown_type", reply
        assert_ping_works(attacker)
    time.sleep(0.2)
    assert proc.poll() is None, f"the node process died (exit status {proc.poll()})"
    assert hello_gets_challenge(port)


def _ec_public_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


BAD_HELLOS = [  # (what, hello, the error code)
    ("an empty name", hello(name=""), "invalid_name"),
    ("a 33-character name", hello(name="x" * 33), "invalid_name"),
    ("a space", hello(name="bad name"), "invalid_name"),
    ("a leading dot", hello(name=".hidden"), "invalid_name"),
    ("a path", hello(name="../../etc"), "invalid_name"),
    ("non-ASCII letters", hello(name="ünïcode"), "invalid_name"),
    ("a NUL", hello(name="a\x00b"), "invalid_name"),
    ("a trailing newline", hello(name="alice\n"), "invalid_name"),
    ("not PEM", hello(public_key="not a key"), "bad_field"),
    ("a PEM of garbage", hello(public_key="-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
     "bad_field"),
    ("non-ASCII PEM", hello(public_key="\u00e9" * 100), "bad_field"),
    ("an EC key", hello(public_key=_ec_public_pem()), "bad_field"),
    ("a lower-case Ethereum address", hello(eth_address="0x" + "ab" * 20), "bad_field"),
    ("not an Ethereum address", hello(eth_address="alice"), "bad_field"),
]


def test_a_bad_hello_is_refused_and_the_connection_closed(tester_node):
    with contextlib.ExitStack() as stack:
        for what, message, code in BAD_HELLOS:
            attacker = connect(tester_node.port, stack)
            attacker.sendall(ascii_frame(message))
            frames, _ = read_until_closed(attacker, timeout=3)
            assert codes(frames) == [code], (what, frames)
    assert tester_node.node.pins.get("mallory") is None
    assert_node_serves_a_pair(tester_node)


def test_more_than_max_errors_bad_frames_close_the_connection(tester_node):
    max_errors = tester_node.node.max_errors
    with contextlib.ExitStack() as stack:
        attacker = connect(tester_node.port, stack)
        attacker.sendall(raw_frame(b"[1,2]") * (max_errors + 5))
        frames, elapsed = read_until_closed(attacker, timeout=3)
        assert codes(frames) == ["bad_frame"] * max_errors  # and not one answer more
        assert elapsed < 2
        # refusals count over a sliding window, so a ping between runs no longer resets them:
        # tests/test_bounds.py::test_a_ping_every_19_errors_no_longer_keeps_a_connection_alive
    assert_node_serves_a_pair(tester_node)


def test_a_lone_surrogate_gets_an_error_frame_not_a_dead_connection_thread(tester_node):
    with contextlib.ExitStack() as stack:
        attacker = connect(tester_node.port, stack)
        # bad_field (bounty is not an object), with ref = the msg_id
        attacker.sendall(ascii_frame({"type": "send", "to": "bob", "msg_id": "x\ud800", "bounty": 1,
                                      "envelope": {}}))
        reply = read_frame(attacker)
        assert reply is not None, "the node hung up without an error frame"
        assert reply["type"] == "error" and reply["code"] in ("bad_frame", "bad_field")
        assert_ping_works(attacker)


# =============================================================================================
# 6-7: slow and silent clients
# =============================================================================================

def test_slow_and_silent_clients_are_cut_off_while_an_honest_pair_is_served(tester_node):
    """Side by side, each on its own connection: a slowloris sending its hello one byte a second, a
    silent socket, one that pings but never authenticates, and an authenticated client that stops
    half way through a frame. Each is closed with a `timeout` error after handshake_timeout or
    frame_timeout (3 s here), and a real pair is served while they are still hanging on."""
    node = tester_node.node
    a, b = fresh_pair_names()
    ensure_users(tester_node.data_dir, a, b, "halfway")  # key generation is not part of the race
    hello_bytes = wire.encode(hello())
    stop = threading.Event()
    dribbled = []
    pinged = []

    def dribble(sock):
        for i in range(9):  # one byte a second, for up to ~8 s
            if not send_ok(sock, hello_bytes[i:i + 1]):
                return
            dribbled.append(i)
            if stop.wait(1.0):
                return

    def ping(sock):
        while not stop.is_set() and send_ok(sock, wire.encode({"type": "ping"})):
            frame = read_frame(sock)
            if frame is None:
                return
            pinged.append(frame)
            time.sleep(0.2)

    with contextlib.ExitStack() as stack:
        halfway = connect(tester_node.port, stack)
        assert raw_login(halfway, tester_node.data_dir, "halfway")["type"] == "welcome"
        opened = {}
        socks = {}
        for kind in ("slowloris", "silent", "pinging"):
            socks[kind] = connect(tester_node.port, stack)
            opened[kind] = time.monotonic()
        halfway.sendall(wire.encode({"type": "ping"})[:7])
        socks["halfway"], opened["halfway"] = halfway, time.monotonic()
        threads = [threading.Thread(target=dribble, args=(socks["slowloris"],), daemon=True),
                   threading.Thread(target=ping, args=(socks["pinging"],), daemon=True)]
        for thread in threads:
            thread.start()
            stack.callback(thread.join, 10)
        stack.callback(stop.set)  # on the way out: stop, join the threads, close the sockets

        assert_node_serves_a_pair(tester_node, a, b)
        served = time.monotonic()
        results = {}
        for kind in ("slowloris", "silent", "halfway"):
            frames, _ = read_until_closed(socks[kind], timeout=8)
            results[kind] = (frames, time.monotonic() - opened[kind])
        threads[1].join(8)
        results["pinging"] = (pinged, time.monotonic() - opened["pinging"])
        stop.set()

    for kind, (frames, after) in results.items():
        assert codes(frames) == ["timeout"], (kind, frames)
        limit = node.server.frame_timeout if kind == "halfway" else node.server.handshake_timeout
        assert limit - 0.5 < after < limit + 3, (kind, after)
    assert "frame" in results["halfway"][0][-1]["message"]
    assert [f["type"] for f in pinged].count("pong") >= 3  # served, but pings do not stand in for auth
    assert len(dribbled) < 8  # the node did not wait for the whole hello
    assert served < opened["slowloris"] + results["slowloris"][1], \
        "the pair was only served once the slow client was gone"


def send_ok(sock, data) -> bool:
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def test_a_steady_sender_is_not_mistaken_for_a_slow_frame(extra_nodes, data_dir):
    ensure_users(data_dir, "steady")
    node = extra_nodes("steady", frame_timeout=1)
    ping = wire.encode({"type": "ping"})
    rounds = 6  # 0.4 s a frame, 2.4 s in all: well past frame_timeout (1 s)
    with contextlib.ExitStack() as stack:
        sock = connect(node.port, stack)
        assert raw_login(sock, data_dir, "steady")["type"] == "welcome"
        sock.sendall(ping[:10])
        for _ in range(rounds):
            time.sleep(0.4)
            send_quietly(sock, ping[10:] + ping[:10])  # finish one frame, start the next
        send_quietly(sock, ping[10:])
        got = [read_frame(sock) for _ in range(rounds + 1)]
    assert got == [{"type": "pong"}] * (rounds + 1)


def held_elsewhere(lock) -> bool:
    """Whether another thread holds `lock` (a Lock or an RLock)."""
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True


def test_a_client_that_stops_reading_does_not_stall_the_watchdog(extra_nodes, data_dir):
    """The hog floods lookups and never reads, so the node's write to it blocks (for up to
    SO_SNDTIMEO = 10 s) holding that connection's send lock. When the hog then goes idle, the one
    watchdog thread must not wait behind that lock: other connections still get timed out."""
    ensure_users(data_dir, "hog")
    # cpu_share=0: the hog's lookups must block the node's write, not have it pace the hog (sleep)
    node = extra_nodes("watchdog", handshake_timeout=1, idle_timeout=2, cpu_share=0)
    lookup = wire.encode({"type": "lookup", "name": "hog"})  # ~40 bytes in, ~540 bytes back
    with contextlib.ExitStack() as stack:
        hog = socket.socket()
        stack.callback(hog.close)
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window from the start
        hog.connect((LOCAL, node.port))
        assert raw_login(hog, data_dir, "hog")["type"] == "welcome"
        hog.settimeout(1.0)
        flooded = time.monotonic()
        try:  # and never read again: the node blocks writing the answers
            hog.sendall(lookup * 100_000)
        except OSError:
            pass
        wait_until(lambda: any(c.name == "hog" and held_elsewhere(c.transport._send_lock) for c in list(node.server.sessions)),
                   timeout=node.server.idle_timeout, message="the node to block writing to the hog")
        time.sleep(max(0.0, flooded + node.server.idle_timeout + 0.5 - time.monotonic()))  # the hog is idle now
        silent = connect(node.port, stack)
        frames, elapsed = read_until_closed(silent, timeout=node.server.handshake_timeout + 1)
        assert codes(frames) == ["timeout"]


# =============================================================================================
# 8-9: connection churn and abrupt disconnects
# =============================================================================================

def test_500_dropped_connections_leak_nothing(tester_node):
    node = tester_node.node
    half_hello = wire.encode(hello())[:50]
    full_hello = wire.encode(hello())
    socks = []
    try:
        for i in range(500):
            sock = socket.create_connection((LOCAL, tester_node.port), timeout=5)
            socks.append(sock)
            if i % 3 == 0:
                send_quietly(sock, half_hello)
            elif i % 3 == 1:
                send_quietly(sock, full_hello)
                abort(sock)  # hang up abruptly, with a reset
    finally:
        for sock in socks:
            sock.close()
    a, b = fresh_pair_names()
    assert_node_serves_a_pair(tester_node, a, b)
    wait_until(lambda: len(node.server.sessions) == 2, timeout=8,
               message=f"the node to forget the dropped connections (has {len(node.server.sessions)})")
    assert sorted(c.name for c in node.server.sessions) == [a, b]
    wait_until(lambda: sum(t.name == "conn" for t in threading.enumerate()) == 2, timeout=8,
               message="connection threads to end")


def test_a_recipient_that_vanishes_mid_delivery_costs_only_its_own_connection(tester_node):
    ensure_users(tester_node.data_dir, "alice", "bob")
    _, receipts, _, events = collecting_events()
    with contextlib.ExitStack() as stack:
        bob_raw = connect(tester_node.port, stack)
        assert raw_login(bob_raw, tester_node.data_dir, "bob")["type"] == "welcome"
        alice = tester_node.client("alice", events, pay="single")
        assert "bob" in alice.peers()
        bounty = alice.payer.next_bounty()  # paid up front, so that nothing slow sits between...
        msg_id = "to-vanished-bob"
        with alice.acked:
            alice.outstanding[msg_id] = Outstanding("bob")
        send = wire.encode({"type": "send", "to": "bob", "msg_id": msg_id, "bounty": bounty.wire,
                                "envelope": OPAQUE_ENVELOPE})
        abort(bob_raw)  # ...bob's reset and the message for him
        with alice._send_lock:
            alice.sock.sendall(send)
        wait_until(lambda: msg_id in receipts, timeout=10, message="a receipt for the message to bob")
        assert receipts[msg_id] in ("delivered", "offline")
    wait_until(lambda: "bob" not in alice.peers(), timeout=5, message="bob to be offline")
    # bob comes back with a real client and alice reaches him on the same session: a pair served
    bob_inbox, _, _, bob_events = collecting_events()
    tester_node.client("bob", bob_events)
    alice.send_text("bob", "welcome back")
    assert_arrives(bob_inbox, "alice", "welcome back")


# =============================================================================================
# 10: name theft
# =============================================================================================

def test_a_pinned_name_cannot_be_taken_with_another_key_or_a_wrong_signature(tester_node):
    ensure_users(tester_node.data_dir, "alice", "bob")
    data_dir = tester_node.data_dir
    alice_inbox, _, _, alice_events = collecting_events()
    alice = tester_node.client("alice", alice_events)  # pins alice's key
    bob_inbox, _, _, bob_events = collecting_events()
    bob = tester_node.client("bob", bob_events, pay="single")
    thief_key = crypto.generate_private_key(2048)
    _, alice_pem, alice_eth = user_keys(data_dir, "alice")

    with contextlib.ExitStack() as stack:
        thief = connect(tester_node.port, stack)
        thief.sendall(wire.encode(hello("alice", crypto.public_key_pem(thief_key), alice_eth)))
        frames, _ = read_until_closed(thief, timeout=3)
        assert codes(frames) == ["name_taken"]

        forger = connect(tester_node.port, stack)
        reply = raw_login(forger, data_dir, "alice", signing_key=thief_key)  # right key, wrong signature
        assert reply is not None and reply.get("code") == "auth_failed"
        frames, _ = read_until_closed(forger, timeout=3)
        assert frames == []

    assert tester_node.node.pins.get("alice")["public_key"].strip() == alice_pem.strip()
    # the genuine alice was not kicked out: she still gets messages on her session...
    bob.send_text("alice", "still you?")
    assert_arrives(alice_inbox, "bob", "still you?")
    # ...and can connect again and chat
    alice.close()
    alice2_inbox, _, _, alice2_events = collecting_events()
    tester_node.client("alice", alice2_events)
    bob.send_text("alice", "and now?")
    assert_arrives(alice2_inbox, "bob", "and now?")


def test_a_garbage_signature_is_auth_failed(tester_node):
    ensure_users(tester_node.data_dir, "carol")
    _, pem, eth = user_keys(tester_node.data_dir, "carol")
    with contextlib.ExitStack() as stack:
        attacker = connect(tester_node.port, stack)
        attacker.sendall(wire.encode(hello("carol", pem, eth)))
        assert read_frame(attacker)["type"] == "challenge"
        attacker.sendall(wire.encode({"type": "auth", "signature": "not base64!!"}))
        frames, _ = read_until_closed(attacker, timeout=3)
        assert codes(frames) == ["auth_failed"]
    assert tester_node.node.pins.get("carol") is None  # nothing pinned for a failed proof


# =============================================================================================
# 11: the connection cap, and keeping the accept loop alive
# =============================================================================================

def test_the_connection_cap_answers_busy_and_frees_up(extra_nodes, data_dir):
    node = extra_nodes("capped", max_connections=5)
    with contextlib.ExitStack() as stack:
        held = [connect(node.port, stack) for _ in range(5)]
        wait_until(lambda: len(node.server.sessions) == 5, timeout=5, message="5 accepted connections")
        sixth = connect(node.port, stack)
        frames, elapsed = read_until_closed(sixth, timeout=3)
        assert codes(frames) == ["busy"]
        assert len(node.server.sessions) == 5
        for sock in held:
            sock.close()
        wait_until(lambda: len(node.server.sessions) == 0, timeout=5, message="the held connections to go")
    # a real pair on the capped node
    a, b = fresh_pair_names()
    ensure_users(data_dir, a, b)
    running = RunningNode(node)
    running.data_dir, running.clients = data_dir, []
    try:
        assert_node_serves_a_pair(running, a, b)
    finally:
        for client in running.clients:
            client.close()


def test_a_reset_while_the_node_is_full_does_not_kill_the_accept_loop(extra_nodes):
    node = extra_nodes("full", max_connections=1)
    with contextlib.ExitStack() as stack:
        holder = connect(node.port, stack)
        wait_until(lambda: len(node.server.sessions) == 1, timeout=5, message="the one allowed connection")
        with node.server.lock:  # hold the accept loop between accept() and its `busy` reply, to make the race certain
            rude = connect(node.port, stack)
            abort(rude)
            time.sleep(0.3)
        time.sleep(0.3)
        holder.close()
        wait_until(lambda: len(node.server.sessions) == 0, timeout=5, message="the holder to go")
    assert hello_gets_challenge(node.port, timeout=1.5), "the node no longer accepts connections"


def test_running_out_of_file_descriptors_once_does_not_stop_accepting(extra_nodes):
    node = extra_nodes("fds")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.ExitStack() as stack:
        flood = socket.socket()  # its descriptor is taken before the limit drops
        stack.callback(flood.close)
        lowest_free = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no new descriptor for anyone
        accept_threads = [t for t in threading.enumerate() if t.name == "accept" and t.is_alive()]
        try:
            flood.connect((LOCAL, node.port))  # accepted (a blocked accept() holds a descriptor)...
            deadline = time.monotonic() + 2
            while len(node.server.sessions) < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            deadline = time.monotonic() + 1  # ...and the next accept() fails with EMFILE
            while all(t.is_alive() for t in accept_threads) and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert hello_gets_challenge(node.port, timeout=1.5), "the node no longer accepts connections"


# =============================================================================================
# Paying attackers
# =============================================================================================

def test_a_paid_message_with_an_unencodable_msg_id_leaves_nothing_behind(tester_node):
    """A lone surrogate ('\\ud800', legal in JSON text) in a paid message's msg_id cannot be sent on.
    If the node recorded the delivery anyway, the recipient could claim it and the `paid` notice
    (which carries the msg_id) would fail to encode on the redeemer thread and kill it: the node
    would never be paid again. The node must refuse the message and record nothing."""
    ensure_users(tester_node.data_dir, "ma", "mb")
    node = tester_node.node
    heard = []
    ma = tester_node.client("ma", Events(notice=heard.append, closed=heard.append), pay="single")
    mb = tester_node.client("mb")
    bounty = ma.payer.next_bounty()  # a real, paid bounty for this node
    msg_id = "x\ud800"
    with ma._send_lock:
        ma.sock.sendall(ascii_frame({"type": "send", "to": "mb", "msg_id": msg_id, "bounty": bounty.wire,
                                     "envelope": OPAQUE_ENVELOPE}))
    wait_until(lambda: heard, timeout=5, message="the node's answer to the send")
    assert msg_id not in node.ledger.pending
    with mb._send_lock:  # the accomplice claims it anyway
        mb.sock.sendall(ascii_frame({"type": "claim", "msg_id": msg_id, "code": bounty.code.hex()}))
    time.sleep(0.6)  # a batch (0.2 s) would have been redeemed by now
    assert node.redeemer._thread.is_alive(), "the redeemer thread died"
    assert node.token.bounty(ma.eth_address, bytes.fromhex(bounty.wire["code_hash"])).state == "open"  # never earned
    assert_node_serves_a_pair(tester_node, wait_paid=True)  # and the node is still paid for real work


# =============================================================================================
# Declared limits: idle timeout and claim timeout
# =============================================================================================

def test_an_idle_session_is_closed_and_a_pinging_one_is_kept(extra_nodes, data_dir):
    node = extra_nodes("idle", idle_timeout=1.5)
    ensure_users(data_dir, "quiet", "chatty")
    with contextlib.ExitStack() as stack:
        quiet, chatty = connect(node.port, stack), connect(node.port, stack)
        assert raw_login(quiet, data_dir, "quiet")["type"] == "welcome"
        assert raw_login(chatty, data_dir, "chatty")["type"] == "welcome"
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # chatty pings twice a second; quiet says nothing
            assert_ping_works(chatty)
            time.sleep(0.5)
        frames, _ = read_until_closed(quiet, timeout=1)
        assert codes(frames) == ["timeout"] and "idle" in frames[0]["message"]
        assert_ping_works(chatty)


def test_an_unclaimed_delivery_is_forgotten_after_the_claim_timeout(extra_nodes, data_dir):
    """The node keeps a delivered message's bounty waiting for its code for claim_timeout;
    after that a late claim is refused and the bounty still cannot carry a second message."""
    node = extra_nodes("claims", claim_timeout=1)
    ensure_users(data_dir, "sender", "silent")
    running = RunningNode(node)
    running.data_dir, running.clients = data_dir, []
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [c.close() for c in running.clients])
        silent = connect(node.port, stack)  # a recipient that never returns codes
        assert raw_login(silent, data_dir, "silent")["type"] == "welcome"
        _, receipts, _, events = collecting_events()
        sender = running.client("sender", events, book_size=3)
        msg_id = sender.send_text("silent", "you will not pay for this")
        deliver = read_frame(silent)
        assert deliver["type"] == "deliver" and deliver["msg_id"] == msg_id
        assert msg_id in node.ledger.pending
        wait_until(lambda: msg_id not in node.ledger.pending, timeout=3, message="the pending delivery to expire")
        silent.sendall(wire.encode({"type": "claim", "msg_id": msg_id, "code": "00" * 32}))
        reply = read_frame(silent)
        assert reply["type"] == "error" and reply["code"] == "unknown_message"
        reused = dict(deliver, type="send", to="silent")
        del reused["from"]
        sender.outstanding[msg_id + "x"] = object()
        sender._write(dict(reused, msg_id=msg_id + "x"))
        wait_until(lambda: receipts.get(msg_id + "x") == "refused", timeout=5, message="the reuse to be refused")


def _stuck_reader(port: int, data_dir: Path, name: str, stack: contextlib.ExitStack) -> socket.socket:
    """A logged-in client with a tiny receive buffer, in #pub."""
    sock = socket.socket()
    stack.callback(sock.close)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((LOCAL, port))
    sock.settimeout(10)
    assert login(sock, data_dir, name)["type"] == "welcome"
    sock.sendall(wire.encode({"type": "join", "channel": "#pub"}))
    assert read_frame(sock)["type"] == "channels"
    return sock


def test_a_client_that_stops_reading_delays_no_one_else(tester_node, monkeypatch):
    """jam asks for megabytes of replies and never reads: its own connection thread waits on
    its socket, as it should. Before, every other thread that had a notice for jam (carol's
    login, which jam hears of through #pub; jam's own name logging in again elsewhere) waited on
    jam's socket too, for the 10 s send timeout and then as long again to close it."""
    data_dir, port = tester_node.data_dir, tester_node.port
    monkeypatch.setattr(tester_node.node, "cpu_share", 0)  # no pacing: the jammers' replies fill their sockets
    make_users(data_dir, "carol", "jam", "jam2")
    with contextlib.ExitStack() as stack:
        carol = connect(port, stack, timeout=10)
        assert login(carol, data_dir, "carol")["type"] == "welcome"
        carol.sendall(wire.encode({"type": "join", "channel": "#pub"}))
        assert read_frame(carol)["type"] == "channels"
        carol.close()
        jam = _stuck_reader(port, data_dir, "jam", stack)
        jam.sendall(b"".join(wire.encode({"type": "lookup", "name": "carol", "req": i}) for i in range(40_000)))
        time.sleep(1.5)  # the node's writes to jam are stuck by now
        again = {}
        for name in ("carol", "jam"):  # carol comes online (jam is told); jam logs in again (the old one is told)
            started = time.monotonic()
            again[name] = connect(port, stack, timeout=30)
            assert login(again[name], data_dir, name, timeout=30)["type"] == "welcome"
            assert time.monotonic() - started < 2, f"{name}'s login waited {time.monotonic() - started:.1f}s"
        assert_ping_works(again["carol"])  # (jam waits: its flood of lookups put it over its CPU share)
        # Notices pile up for a client that reads none: past MAX_POSTED bytes it is closed.
        monkeypatch.setattr(connection, "MAX_POSTED", 600)
        stuck = _stuck_reader(port, data_dir, "jam2", stack)
        stuck.sendall(b"".join(wire.encode({"type": "lookup", "name": "carol", "req": i}) for i in range(40_000)))
        time.sleep(1.5)
        def notice_for_jam2() -> bool:  # each login and logout of carol is a presence notice for jam2 (~60 bytes)
            with contextlib.closing(connect(port, stack, timeout=10)) as sock:
                assert login(sock, data_dir, "carol")["type"] == "welcome"
            return "jam2" not in tester_node.node.online
        wait_until(notice_for_jam2, 20, interval=0.1, message="jam2's connection to be closed")
