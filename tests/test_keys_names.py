"""Identities nobody can mimic: RSA keys of 2,048-4,096 bits with e = 65537 only, and names
compared by their confusable skeleton (UTS #39). Real sockets on the in-process node."""
from __future__ import annotations

import contextlib
import io
import math
import queue
import random
import socket

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import collecting_events, make_users
from dm import crypto, datadir, wire
from dm.chain import ethereum
from dm.cli import accounts
from dm.client.core import ClientError
from dm.client.peers import PeerKeys, UnusableKey
from dm.relay.names import skeleton
from dm.relay.pins import PinStore
from dm.relay.session import Session
from dm.wire.handshake import ClientHandshake, HandshakeRefused
from helpers import Transport, login, user_keys

# --- keys made for the tests --------------------------------------------------------------


def _is_probable_prime(n: int, rng: random.Random) -> bool:
    if n < 2 or n % 2 == 0:
        return n == 2
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(32):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int, rng: random.Random) -> int:
    while True:
        candidate = rng.getrandbits(bits) | (1 << (bits - 1)) | (1 << (bits - 2)) | 1
        if _is_probable_prime(candidate, rng):
            return candidate


def small_rsa_public_pem(bits: int) -> str:
    """A genuine RSA public key of `bits` bits (two primes of bits/2): too small for
    `cryptography` to generate, small enough to find primes for in pure Python."""
    rng = random.Random(bits)
    while True:
        p, q = _prime(bits // 2, rng), _prime(bits // 2, rng)
        n = p * q
        if n.bit_length() == bits and math.gcd(65537, (p - 1) * (q - 1)) == 1:
            return crypto.public_key_pem(rsa.RSAPublicNumbers(65537, n).public_key())


def huge_modulus_public_pem(bits: int) -> str:
    """A public key whose modulus has `bits` bits. At `hello` the node sees only the public
    half, so a random odd modulus stands in for a key that would take minutes to generate."""
    n = random.Random(bits).getrandbits(bits) | (1 << (bits - 1)) | 1
    return crypto.public_key_pem(rsa.RSAPublicNumbers(65537, n).public_key())


def huge_exponent_public_pem(bits: int = 3072) -> str:
    """A genuine `bits`-bit key pair re-derived with an enormous public exponent."""
    numbers = crypto.generate_private_key(bits).private_numbers()
    p, q = numbers.p, numbers.q
    e = (1 << (bits - 8)) + 1
    while math.gcd(e, (p - 1) * (q - 1)) != 1:
        e += 2
    return crypto.public_key_pem(rsa.RSAPublicNumbers(e, p * q).public_key())


def eth_address() -> str:
    return ethereum.new_account()[0]


def handshake(port: int, name: str, pem: str, eth: str, rsa_key=None) -> tuple[dict, socket.socket]:
    """hello (and auth, if challenged and `rsa_key` is given) on a fresh socket; returns the
    node's answer (welcome, challenge or error) and the socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    hs = ClientHandshake(name, pem, eth, lambda data: crypto.sign(rsa_key, data))
    sock.sendall(hs.hello())
    try:
        while not hs.done:
            reply = hs.receive(sock.recv(65536))
            if rsa_key is None:
                return {"type": "challenge"}, sock
            sock.sendall(reply)
    except HandshakeRefused as refused:
        return {"type": "error", "code": refused.code, "message": refused.message}, sock
    return hs.welcome, sock


def closed_by_node(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


# --- the check itself ---------------------------------------------------------------------

def test_key_limits_are_named_constants():
    assert (crypto.MIN_KEY_BITS, crypto.MAX_KEY_BITS, crypto.PUBLIC_EXPONENT) == (2048, 4096, 65537)
    assert crypto.DEFAULT_KEY_BITS == 3072


@pytest.mark.parametrize("pem_of, problem", [
    (lambda: small_rsa_public_pem(512), "512 bits"),
    (lambda: small_rsa_public_pem(600), "600 bits"),
    (lambda: huge_modulus_public_pem(16_384), "16,384 bits"),
    (lambda: huge_modulus_public_pem(4_097), "4,097 bits"),
    (lambda: huge_exponent_public_pem(), "exponent is a 3,065-bit number"),
    (lambda: crypto.public_key_pem(rsa.generate_private_key(3, 2048).public_key()), "exponent is 3;"),
])
def test_check_key_strength_refuses_weak_and_absurd_keys(pem_of, problem):
    with pytest.raises(crypto.WeakKeyError, match=problem):
        crypto.check_key_strength(pem_of())


def test_check_key_strength_accepts_2048_to_4096_bits_with_65537():
    for bits in (2048, 3072):
        key = crypto.generate_private_key(bits)
        assert crypto.check_key_strength(key.public_key()).key_size == bits
        assert crypto.check_key_strength(crypto.public_key_pem(key)).key_size == bits
    assert crypto.check_key_strength(huge_modulus_public_pem(4096)).key_size == 4096


def test_main_py_y_makes_3072_bit_keys_by_default(data_dir):
    with contextlib.redirect_stdout(io.StringIO()):
        assert accounts.create_users(data_dir, ["fresh"]) == 0
    key = crypto.load_private_key(datadir.private_key_path(data_dir, "fresh"))
    assert key.key_size == 3072 and key.public_key().public_numbers().e == 65537


# --- the node: weak keys at hello ---------------------------------------------------------

@pytest.mark.parametrize("pem_of", [
    lambda: small_rsa_public_pem(600),
    lambda: small_rsa_public_pem(512),
    lambda: huge_modulus_public_pem(16_384),
    lambda: huge_exponent_public_pem(3072),
], ids=["600-bit", "512-bit", "16384-bit", "3072-bit-huge-exponent"])
def test_hello_with_a_weak_or_absurd_key_is_refused_with_weak_key(tester_node, pem_of):
    answer, sock = handshake(tester_node.port, "mallory", pem_of(), eth_address())
    with sock:
        assert answer["code"] == "weak_key", answer
        assert "python3 main.py Y NAME" in answer["message"]
        assert closed_by_node(sock)  # fatal, like the other hello refusals
    assert "mallory" not in tester_node.node.pins


def test_2048_and_4096_bit_keys_log_in(tester_node):
    make_users(tester_node.data_dir, "small")
    with contextlib.redirect_stdout(io.StringIO()):
        assert accounts.create_users(tester_node.data_dir, ["large"], bits=4096) == 0
    for name, bits in (("small", 2048), ("large", 4096)):
        with socket.create_connection(("127.0.0.1", tester_node.port)) as sock:
            welcome = login(sock, tester_node.data_dir, name)
            assert welcome["type"] == "welcome", welcome
        assert crypto.public_key_from_pem(tester_node.node.pins.get(name)["public_key"]).key_size == bits


# --- the node and the client: a weak key pinned before the check --------------------------

def test_lookup_of_a_name_pinned_with_a_weak_key_is_refused(tester_node):
    make_users(tester_node.data_dir, "alice")
    assert tester_node.node.pins.pin("old", small_rsa_public_pem(600), eth_address()) == "new"
    alice = tester_node.client("alice")
    with pytest.raises(UnusableKey, match=r"weak_key"):
        alice.peer_key("old")
    with pytest.raises(ClientError, match="weak_key"):
        alice.send_text("old", "hello")
    with socket.create_connection(("127.0.0.1", tester_node.port)) as sock:  # on the wire
        make_users(tester_node.data_dir, "bob")
        assert login(sock, tester_node.data_dir, "bob")["type"] == "welcome"
        sock.sendall(wire.encode({"type": "lookup", "name": "old", "req": 7}))
        decoder = wire.MessageDecoder()
        replies = []
        while not replies:
            replies = decoder.feed_messages(sock.recv(65536))
        assert replies[0]["type"] == "error" and replies[0]["code"] == "weak_key"
        assert replies[0]["ref"] == "old" and replies[0]["req"] == 7


@pytest.mark.parametrize("served", [
    lambda: small_rsa_public_pem(600),
    lambda: huge_modulus_public_pem(16_384),
    lambda: huge_exponent_public_pem(3072),
], ids=["600-bit", "16384-bit", "huge-exponent"])
def test_the_client_refuses_a_weak_key_the_node_serves(tmp_path, served):
    """An older (or hostile) node may serve any key: the client checks it itself."""
    pem = served()
    peers = PeerKeys(tmp_path, tmp_path / "peers.json", lambda names: {name: pem for name in names})
    with pytest.raises(UnusableKey, match="must make new keys"):
        peers.get(["old"])
    keys, unusable = peers.usable(["old"])
    assert keys == {} and list(unusable) == ["old"]
    assert not (tmp_path / "peers.json").exists()  # never pinned


def test_a_channel_member_with_a_weak_pinned_key_is_skipped_with_a_notice(tester_node):
    """`old` was pinned with a 600-bit key before keys were checked and is still connected
    (a session from before the node's upgrade). A message to #c reaches bob and carol; alice
    is told why `old` got nothing; nothing raises."""
    node = tester_node.node
    make_users(tester_node.data_dir, "alice", "bob", "carol")
    assert node.pins.pin("old", small_rsa_public_pem(600), eth_address()) == "new"
    old = Session(node, Transport("old"), now=0.0)
    old.name, old.phase = "old", "ready"
    node.go_online(old)
    node.channels.join("#c", "old")
    notices: queue.Queue = queue.Queue()
    inboxes, clients = {}, {}
    for name in ("alice", "bob", "carol"):
        inbox, _, _, events = collecting_events()
        if name == "alice":
            events.notice = notices.put
        inboxes[name] = inbox
        clients[name] = tester_node.client(name, events, book_size=4)
        clients[name].join("#c")

    sent, offline = clients["alice"].send_to_channel("#c", "hello, strong keys")
    assert len(sent) == 2 and offline == []
    for name in ("bob", "carol"):
        message = inboxes[name].get(timeout=10)
        assert (message.sender, message.text, message.genuine) == ("alice", "hello, strong keys", True)
    notice = notices.get(timeout=10)
    assert notice.startswith("(not sent to old in #c:") and "weak_key" in notice and "Traceback" not in notice
    assert clients["alice"].wait_acknowledged(timeout=10)
    written = [wire.parse(p) for p in wire.FrameDecoder().feed(old.transport.take())]
    assert [f for f in written if f["type"] not in ("membership", "presence")] == []  # nothing sent (or paid) for old


# --- names: the skeleton ------------------------------------------------------------------

@pytest.mark.parametrize("look_alike, original", [
    ("Alice", "alice"), ("ALICE", "alice"), ("alice.", "alice"), ("a1ice", "alice"), ("aIice", "alice"),
    ("a.l-i_c.e", "alice"), ("b0b", "bob"), ("BOB", "bob"), ("rnallory", "mallory"),
    ("\u0430lice", "alice"),  # Cyrillic а
])
def test_look_alike_names_share_a_skeleton(look_alike, original):
    assert skeleton(look_alike) == skeleton(original)


@pytest.mark.parametrize("one, other", [
    ("alice", "bob"), ("dave", "dane"), ("carol", "carl"), ("user1", "user2"), ("eve", "eva"), ("bob", "bobz"),
])
def test_different_names_keep_different_skeletons(one, other):
    assert skeleton(one) != skeleton(other)


def test_skeleton_drops_only_the_separators():
    assert skeleton("x_y") == skeleton("x.y") == skeleton("x-y") == skeleton("xy")
    assert skeleton("bob2") != skeleton("bob")


def test_the_pin_store_rebuilds_its_skeleton_index_at_start(tmp_path):
    pins = PinStore(tmp_path / "pins.json")
    assert pins.pin("alice", "PEM-A", "0xA") == "new"
    assert pins.pin("aIice", "PEM-B", "0xB") == "confusable"
    assert pins.confusable_with("aIice") == "alice" and pins.confusable_with("alice") is None
    pins.close()
    reopened = PinStore(tmp_path / "pins.json")
    assert reopened.confusable_with("ALICE") == "alice"
    assert reopened.pin("alice", "PEM-A", "0xA") == "same"
    assert reopened.pin("a1ice", "PEM-C", "0xC") == "confusable"
    reopened.close()


# --- names: the node ----------------------------------------------------------------------

def test_look_alike_names_are_refused_with_name_confusable(tester_node):
    make_users(tester_node.data_dir, "alice", "bob")
    for name in ("alice", "bob"):
        with socket.create_connection(("127.0.0.1", tester_node.port)) as sock:
            assert login(sock, tester_node.data_dir, name)["type"] == "welcome"
    thief = crypto.generate_private_key(2048)
    pem = crypto.public_key_pem(thief)
    for name, original in [("Alice", "alice"), ("ALICE", "alice"), ("alice.", "alice"), ("a1ice", "alice"),
                           ("aIice", "alice"), ("b0b", "bob")]:
        answer, sock = handshake(tester_node.port, name, pem, eth_address(), thief)
        with sock:
            assert answer["type"] == "error" and answer["code"] == "name_confusable", (name, answer)
            assert repr(original) in answer["message"]
            assert closed_by_node(sock)
        assert name not in tester_node.node.pins
    with socket.create_connection(("127.0.0.1", tester_node.port)) as sock:  # the owner still logs in
        assert login(sock, tester_node.data_dir, "alice")["type"] == "welcome"


def test_a_look_alike_pinned_between_hello_and_auth_is_refused_at_auth(tester_node):
    make_users(tester_node.data_dir, "alice")
    thief = crypto.generate_private_key(2048)
    sock = socket.create_connection(("127.0.0.1", tester_node.port), timeout=10)
    hs = ClientHandshake("aIice", crypto.public_key_pem(thief), eth_address(), lambda data: crypto.sign(thief, data))
    sock.sendall(hs.hello())
    auth = hs.receive(sock.recv(65536))  # challenged: the name was still free
    with socket.create_connection(("127.0.0.1", tester_node.port)) as owner:
        assert login(owner, tester_node.data_dir, "alice")["type"] == "welcome"
    sock.sendall(auth)
    with sock, pytest.raises(HandshakeRefused) as refused:
        while True:
            hs.receive(sock.recv(65536))
    assert refused.value.code == "name_confusable" and "'alice'" in refused.value.message
    assert "aIice" not in tester_node.node.pins
    _, pem, _ = user_keys(tester_node.data_dir, "alice")
    assert tester_node.node.pins.get("alice")["public_key"] == pem
