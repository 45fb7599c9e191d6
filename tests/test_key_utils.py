"""Tests for key_utils: keys on disk, fingerprints, signatures, envelopes, replay guard."""

import base64
import hashlib
import hmac
import json
import os
import re
import struct
import time

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import key_utils as ku
from dm.crypto import (
    BadSignature,
    DecryptionFailed,
    EnvelopeError,
    KeyFileError,
    MalformedEnvelope,
    ReplayedMessage,
    ReplayGuard,
)

NOW = 1_700_000_000
FIELDS = ("from", "to", "msg_id", "ts", "wrapped_key", "nonce", "code_slot", "digest", "ciphertext", "signature")
BINARY_FIELDS = ("wrapped_key", "nonce", "code_slot", "digest", "ciphertext", "signature")
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
fuzz = settings(database=None, deadline=None)


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="session")
def alice():
    return ku.generate_private_key(2048)


@pytest.fixture(scope="session")
def bob():
    return ku.generate_private_key(2048)


@pytest.fixture(scope="session")
def carol():
    return ku.generate_private_key(2048)


@pytest.fixture(scope="session")
def sealed(alice, bob):
    """One genuine alice->bob envelope, sealed at NOW (tests copy it before mutating)."""
    return ku.seal({"text": "hello bob"}, sender="alice", recipient="bob", sender_key=alice,
                   recipient_public_key=bob.public_key(), msg_id="m-1", ts=NOW)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def seal_ab(alice, bob, payload, **kw):
    kw.setdefault("ts", NOW)
    return ku.seal(payload, sender="alice", recipient="bob", sender_key=alice,
                   recipient_public_key=bob.public_key(), **kw)


def open_b(alice, bob, env, **kw):
    kw.setdefault("recipient", "bob")
    kw.setdefault("recipient_key", bob)
    kw.setdefault("sender_public_key", alice.public_key())
    return ku.open_envelope(env, **kw)


def b64d(s):
    return base64.b64decode(s)


def b64e(b):
    return base64.b64encode(b).decode("ascii")


def lp(*fields):
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def header(env):
    return [env["from"].encode(), env["to"].encode(), env["msg_id"].encode(),
            str(env["ts"]).encode()]


def signing_input(env, wrapped, nonce, ct):
    """The signed bytes, rebuilt independently from the documented format: the ciphertext
    enters through its SHA-256 digest, after the code slot."""
    return b"dm-envelope-v2" + lp(*header(env), wrapped, nonce, b64d(env["code_slot"]), hashlib.sha256(ct).digest())


def slot_pad(aes_key, env, nonce):
    return hmac.digest(aes_key, b"dm-code-slot-v1" + lp(*header(env), nonce), "sha256")


def resign(env, key):
    """What a holder of the sender's key could do: re-sign an edited envelope."""
    env = dict(env)
    env["digest"] = b64e(hashlib.sha256(b64d(env["ciphertext"])).digest())
    env["signature"] = b64e(key.sign(signing_input(
        env, b64d(env["wrapped_key"]), b64d(env["nonce"]), b64d(env["ciphertext"])),
        PSS, hashes.SHA256()))
    return env


def forge(plaintext, sender_key, recipient_pub, aes_key=None, **hdr):
    """Hand-build a genuinely signed envelope from raw plaintext, per the documentation."""
    env = {"from": "alice", "to": "bob", "msg_id": "hand-1", "ts": NOW, **hdr}
    aes_key = aes_key or os.urandom(32)
    nonce = os.urandom(12)
    ct = AESGCM(aes_key).encrypt(nonce, plaintext, b"dm-header-v1" + lp(*header(env)))
    wrapped = recipient_pub.encrypt(aes_key, OAEP)
    code = bytes(range(32))
    env["code_slot"] = b64e(bytes(a ^ b for a, b in zip(code, slot_pad(aes_key, env, nonce))))
    sig = sender_key.sign(signing_input(env, wrapped, nonce, ct), PSS, hashes.SHA256())
    env.update(wrapped_key=b64e(wrapped), nonce=b64e(nonce), digest=b64e(hashlib.sha256(ct).digest()),
               ciphertext=b64e(ct), signature=b64e(sig))
    return env


def text_of_size(n):
    """Text whose UTF-8 encoding is exactly n bytes, mixing 1- to 4-byte characters."""
    unit = "aé€😀中!"  # 1+2+3+4+3+1 = 14 bytes
    text = unit * (n // 14) + "a" * (n % 14)
    assert len(text.encode("utf-8")) == n
    return text


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("size", [0, 1, 190, 191, 10_000, 1_000_000])
def test_round_trip_sizes(alice, bob, size):
    payload = {"text": text_of_size(size), "code": "print('hi')\n\t€",
               "meta": {"n": size, "ok": True, "none": None, "list": [1, 2.5, "ж"]}}
    env = seal_ab(alice, bob, payload)
    assert set(env) == set(FIELDS)
    assert len(b64d(env["nonce"])) == 12
    assert len(b64d(env["wrapped_key"])) == 256
    got = open_b(alice, bob, env)
    assert got == payload
    assert json.dumps(got, sort_keys=True) == json.dumps(payload, sort_keys=True)
    if size >= 10_000:  # content must not leak into the envelope
        assert payload["text"][:50] not in json.dumps(env, ensure_ascii=False)


@fuzz
@given(st.dictionaries(
    st.text(max_size=8),
    st.recursive(st.none() | st.booleans() | st.integers()
                 | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                 lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
                 max_leaves=12),
    max_size=5))
def test_round_trip_arbitrary_payload(alice, bob, payload):
    assert open_b(alice, bob, seal_ab(alice, bob, payload)) == payload


def test_each_message_gets_fresh_key_nonce_and_id(alice, bob):
    a = ku.seal({"t": "same"}, sender="alice", recipient="bob", sender_key=alice,
                recipient_public_key=bob.public_key())
    b = ku.seal({"t": "same"}, sender="alice", recipient="bob", sender_key=alice,
                recipient_public_key=bob.public_key())
    for field in ("msg_id", "wrapped_key", "nonce", "ciphertext", "signature"):
        assert a[field] != b[field], field
    assert re.fullmatch(r"[0-9a-f]{32}", a["msg_id"])
    assert type(a["ts"]) is int and abs(a["ts"] - time.time()) < 5


def test_seal_rejects_bad_arguments(alice, bob):
    with pytest.raises(TypeError):
        seal_ab(alice, bob, ["not", "a", "dict"])
    with pytest.raises(ValueError):
        seal_ab(alice, bob, {"x": float("nan")})
    with pytest.raises(ValueError):
        seal_ab(alice, bob, {"x": 1}, ts=1.5)
    with pytest.raises(ValueError):
        seal_ab(alice, bob, {"x": 1}, msg_id="")


def test_documented_encoding_is_what_seal_produces(alice, bob, sealed):
    """Another client must be able to reproduce the format from the docstring alone."""
    wrapped, nonce, ct = (b64d(sealed[f]) for f in ("wrapped_key", "nonce", "ciphertext"))
    # The signature covers exactly the documented length-prefixed encoding ...
    alice.public_key().verify(b64d(sealed["signature"]), signing_input(sealed, wrapped, nonce, ct),
                              PSS, hashes.SHA256())
    # ... and the ciphertext decrypts with the documented OAEP + AES-GCM + header AAD.
    aes_key = bob.decrypt(wrapped, OAEP)
    plain = AESGCM(aes_key).decrypt(nonce, ct, b"dm-header-v1" + lp(*header(sealed)))
    assert plain == b'{"text":"hello bob"}'
    # And a hand-built envelope opens with the library.
    env = forge(b'{"text":"hi \xc3\xa9"}', alice, bob.public_key())
    assert open_b(alice, bob, env) == {"text": "hi é"}


# ---------------------------------------------------------------- tampering

@pytest.mark.parametrize("field", BINARY_FIELDS)
@pytest.mark.parametrize("where", [0, -1])
def test_flipped_byte_is_rejected(alice, bob, sealed, field, where):
    raw = bytearray(b64d(sealed[field]))
    raw[where] ^= 0x01
    env = {**sealed, field: b64e(bytes(raw))}
    with pytest.raises(BadSignature) as exc:
        open_b(alice, bob, env)
    assert exc.value.reason


@pytest.mark.parametrize("field,value", [
    ("from", "mallory"), ("msg_id", "m-2"), ("ts", NOW + 1), ("ts", NOW - 1)])
def test_edited_header_is_rejected(alice, bob, sealed, field, value):
    with pytest.raises(BadSignature):
        open_b(alice, bob, {**sealed, field: value})


def test_edited_to_is_rejected(alice, bob, sealed):
    env = {**sealed, "to": "mallory"}
    with pytest.raises(MalformedEnvelope):
        open_b(alice, bob, env)  # bob sees it is not for him
    with pytest.raises(BadSignature):
        open_b(alice, bob, env, recipient="mallory")  # "mallory" sees the edit


def test_header_is_bound_to_ciphertext_even_if_resigned(alice, bob, sealed):
    # The signer re-signing an edited header still cannot move the ciphertext (GCM AAD).
    assert open_b(alice, bob, resign(sealed, alice)) == {"text": "hello bob"}
    for field, value in (("ts", NOW + 7), ("msg_id", "other"), ("from", "alicia")):
        with pytest.raises(DecryptionFailed):
            open_b(alice, bob, resign({**sealed, field: value}, alice))


def test_wrong_signer_is_rejected(alice, bob, carol):
    env = ku.seal({"text": "I am alice"}, sender="alice", recipient="bob", sender_key=carol,
                  recipient_public_key=bob.public_key(), ts=NOW)
    with pytest.raises(BadSignature):
        open_b(alice, bob, env)


def test_wrong_recipient_key_fails_decryption(alice, bob, carol, sealed):
    with pytest.raises(DecryptionFailed):
        open_b(alice, bob, sealed, recipient_key=carol)


def test_wrong_recipient_name_is_malformed(alice, bob, sealed):
    with pytest.raises(MalformedEnvelope) as exc:
        open_b(alice, bob, sealed, recipient="carol")
    assert "someone else" in exc.value.reason


@pytest.mark.parametrize("plaintext", [b"[1,2]", b'"text"', b"\xff\xfe", b"{not json",
                                       b'{"x":NaN}', b""])
def test_signed_but_bad_payload_is_malformed(alice, bob, plaintext):
    with pytest.raises(MalformedEnvelope):
        open_b(alice, bob, forge(plaintext, alice, bob.public_key()))


def test_signed_but_short_aes_key_fails_decryption(alice, bob):
    env = forge(b"{}", alice, bob.public_key(), aes_key=os.urandom(16))
    with pytest.raises(DecryptionFailed):
        open_b(alice, bob, env)


@pytest.mark.parametrize("field,value", [
    ("from", None), ("from", ""), ("from", "x" * 257), ("from", "\ud800"), ("to", 7),
    ("msg_id", ["m-1"]), ("ts", True), ("ts", float(NOW)), ("ts", str(NOW)), ("ts", -1),
    ("ts", 2 ** 63), pytest.param("ts", 10 ** 5000, id="ts-huge"), ("nonce", "AAAA"), ("nonce", None),
    ("ciphertext", "not base64!"), ("wrapped_key", "é"), ("signature", b"raw bytes")])
def test_ill_formed_fields_are_malformed(alice, bob, sealed, field, value):
    with pytest.raises(MalformedEnvelope) as exc:
        open_b(alice, bob, {**sealed, field: value})
    assert field in exc.value.reason


@pytest.mark.parametrize("field", FIELDS)
def test_missing_field_is_malformed(alice, bob, sealed, field):
    env = {k: v for k, v in sealed.items() if k != field}
    with pytest.raises(MalformedEnvelope):
        open_b(alice, bob, env)


@pytest.mark.parametrize("env", [None, [], "envelope", 42])
def test_non_object_envelope_is_malformed(alice, bob, env):
    with pytest.raises(MalformedEnvelope):
        open_b(alice, bob, env)


# ---------------------------------------------------------------- replay

def test_replay_is_rejected_and_new_ids_pass(alice, bob, carol, sealed):
    guard = ReplayGuard(clock=lambda: NOW)
    assert open_b(alice, bob, sealed, replay_guard=guard) == {"text": "hello bob"}
    with pytest.raises(ReplayedMessage) as exc:
        open_b(alice, bob, sealed, replay_guard=guard)
    assert "replayed" in exc.value.reason
    assert open_b(alice, bob, seal_ab(alice, bob, {"n": 2}, msg_id="m-2"), replay_guard=guard) == {"n": 2}
    # The same msg_id from a different sender is a different message.
    from_carol = ku.seal({"n": 3}, sender="carol", recipient="bob", sender_key=carol,
                         recipient_public_key=bob.public_key(), msg_id="m-1", ts=NOW)
    assert open_b(carol, bob, from_carol, replay_guard=guard) == {"n": 3}


def test_forgery_does_not_burn_the_msg_id(alice, bob, sealed):
    guard = ReplayGuard(clock=lambda: NOW)
    forged = {**sealed, "signature": b64e(bytes(256))}
    with pytest.raises(BadSignature):
        open_b(alice, bob, forged, replay_guard=guard)
    assert len(guard) == 0
    assert open_b(alice, bob, sealed, replay_guard=guard) == {"text": "hello bob"}


@pytest.mark.parametrize("offset,ok,word", [
    (-86400, True, None), (-86401, False, "too old"),
    (300, True, None), (301, False, "future")])
def test_replay_window_limits(alice, bob, offset, ok, word):
    guard = ReplayGuard(clock=lambda: NOW)
    env = seal_ab(alice, bob, {"x": 1}, ts=NOW + offset)
    if ok:
        assert open_b(alice, bob, env, replay_guard=guard) == {"x": 1}
    else:
        with pytest.raises(ReplayedMessage) as exc:
            open_b(alice, bob, env, replay_guard=guard)
        assert word in exc.value.reason
        assert len(guard) == 0


def test_guard_forgets_old_ids_but_still_rejects_them():
    clock = [NOW]
    guard = ReplayGuard(max_age=100, max_skew=10, clock=lambda: clock[0])
    guard.check_and_record("alice", "a", NOW)
    assert len(guard) == 1
    clock[0] = NOW + 101
    guard.check_and_record("alice", "b", NOW + 101)
    assert len(guard) == 1  # "a" was forgotten ...
    with pytest.raises(ReplayedMessage, match="too old"):
        guard.check_and_record("alice", "a", NOW)  # ... yet is still refused
    clock[0] = NOW  # a clock stepping back must not reopen the window
    with pytest.raises(ReplayedMessage, match="too old"):
        guard.check_and_record("alice", "a", NOW)
    guard.check_and_record("alice", "c", NOW + 100, now=NOW + 95)  # explicit now works too
    with pytest.raises(ReplayedMessage, match="replayed"):
        guard.check_and_record("alice", "c", NOW + 100, now=NOW + 95)


def test_guard_entry_cap_keeps_evicted_ids_rejected():
    guard = ReplayGuard(clock=lambda: NOW, max_entries=3)
    for i in range(4):
        guard.check_and_record("alice", f"id{i}", NOW - 10 + i)
    assert len(guard) == 3
    with pytest.raises(ReplayedMessage):
        guard.check_and_record("alice", "id0", NOW - 10)
    guard.check_and_record("alice", "id4", NOW)
    assert len(guard) == 3


# ---------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([-1, 2 ** 63, NOW])
    | st.just(5000).map(lambda n: 10 ** n)  # str() of it raises; must stay contained
    | st.floats() | st.text(max_size=30) | st.binary(max_size=40).map(b64e),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8)


@fuzz
@given(st.one_of(
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), json_values, max_size=10),
    st.fixed_dictionaries({f: json_values for f in FIELDS}),
    json_values))
def test_garbage_envelopes_only_raise_envelope_errors(alice, bob, env):
    with pytest.raises(EnvelopeError):
        open_b(alice, bob, env, replay_guard=ReplayGuard(clock=lambda: NOW))


@settings(fuzz, max_examples=300)
@given(field=st.sampled_from(FIELDS), value=json_values, delete=st.booleans())
def test_mutated_envelopes_only_raise_envelope_errors(alice, bob, sealed, field, value, delete):
    env = dict(sealed)
    if delete:
        del env[field]
    else:
        assume(not (type(value) is type(sealed[field]) and value == sealed[field]))
        env[field] = value
    with pytest.raises(EnvelopeError):
        open_b(alice, bob, env, replay_guard=ReplayGuard(clock=lambda: NOW))


# ---------------------------------------------------------------- key files

def test_private_key_file_mode_no_overwrite_and_round_trip(tmp_path, alice, bob, umask_022):
    path = tmp_path / "alice.pem"
    ku.save_private_key(path, alice)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="exists"):
        ku.save_private_key(path, bob)
    assert path.read_bytes() == before
    assert ku.load_private_key(path).private_numbers() == alice.private_numbers()
    assert ku.load_private_key(str(path)).private_numbers() == alice.private_numbers()


def test_failed_write_leaves_no_partial_key_file(tmp_path, alice, monkeypatch):
    real_fdopen = os.fdopen

    class DiskFull:
        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", DiskFull)
    path = tmp_path / "k.pem"
    with pytest.raises(KeyFileError, match="No space left"):
        ku.save_private_key(path, alice)
    assert not path.exists()


def test_public_key_file_round_trip(tmp_path, alice, bob, umask_022):
    path = tmp_path / "alice.pub"
    ku.save_public_key(path, alice.public_key())
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert ku.load_public_key(path).public_numbers() == alice.public_key().public_numbers()
    with pytest.raises(KeyFileError, match="exists"):
        ku.save_public_key(path, bob.public_key())


def test_bad_key_files_raise_clear_errors(tmp_path, alice):
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"this is not a key\n")
    with pytest.raises(KeyFileError, match="not a valid PEM private key") as exc:
        ku.load_private_key(garbage)
    assert str(garbage) in str(exc.value)
    with pytest.raises(KeyFileError, match="not a valid PEM public key"):
        ku.load_public_key(garbage)
    with pytest.raises(KeyFileError, match="not found"):
        ku.load_private_key(tmp_path / "missing.pem")
    with pytest.raises(KeyFileError, match="not found"):
        ku.load_public_key(tmp_path / "missing.pub")
    with pytest.raises(KeyFileError):
        ku.save_private_key(tmp_path / "no-such-dir" / "k.pem", alice)

    pub = tmp_path / "alice.pub"
    ku.save_public_key(pub, alice.public_key())
    with pytest.raises(KeyFileError):
        ku.load_private_key(pub)  # a public key is not a private key

    ed = ed25519.Ed25519PrivateKey.generate()
    ed_path = tmp_path / "ed.pem"
    ed_path.write_bytes(ed.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    with pytest.raises(KeyFileError, match="not an RSA"):
        ku.load_private_key(ed_path)
    ed_pub_pem = ed.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(KeyFileError, match="not an RSA"):
        ku.public_key_from_pem(ed_pub_pem)
    for bad in ("garbage", b"", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "é"):
        with pytest.raises(KeyFileError):
            ku.public_key_from_pem(bad)


def test_load_private_key_is_cached_until_file_changes(tmp_path, alice, bob):
    path = tmp_path / "me.pem"
    ku.save_private_key(path, alice)
    first = ku.load_private_key(path)
    assert ku.load_private_key(path) is first
    assert ku.load_private_key(tmp_path / "." / "me.pem") is first  # same realpath

    mtime = os.stat(path).st_mtime_ns
    path.unlink()
    ku.save_private_key(path, bob)
    os.utime(path, ns=(mtime + 5 * 10 ** 9, mtime + 5 * 10 ** 9))  # force a distinct mtime
    second = ku.load_private_key(path)
    assert second is not first
    assert second.private_numbers() == bob.private_numbers()


def test_public_key_loading_is_cached(tmp_path, alice):
    path = tmp_path / "a.pub"
    ku.save_public_key(path, alice.public_key())
    assert ku.load_public_key(path) is ku.load_public_key(path)
    pem = ku.public_key_pem(alice)
    assert ku.public_key_from_pem(pem) is ku.public_key_from_pem(pem.encode())


# ---------------------------------------------------------------- fingerprints and signatures

def test_fingerprint(alice, bob):
    fp = ku.fingerprint(alice)
    assert re.fullmatch(r"SHA256:([0-9a-f]{4}:){15}[0-9a-f]{4}", fp)
    der = alice.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    assert fp.replace("SHA256:", "").replace(":", "") == hashlib.sha256(der).hexdigest()
    pem = ku.public_key_pem(alice)
    assert pem == ku.public_key_pem(alice.public_key())
    assert fp == ku.fingerprint(alice) == ku.fingerprint(alice.public_key())
    assert fp == ku.fingerprint(pem) == ku.fingerprint(pem.encode())
    assert ku.fingerprint(bob) != fp


def test_sign_and_verify(alice, bob):
    sig = ku.sign(alice, b"data")
    assert len(sig) == 256
    assert ku.verify(alice.public_key(), sig, b"data")
    assert not ku.verify(alice.public_key(), sig, b"datA")
    assert not ku.verify(bob.public_key(), sig, b"data")
    assert not ku.verify(alice.public_key(), sig[:-1], b"data")
    assert ku.sign(alice, b"data") != sig  # PSS is salted
    alice.public_key().verify(sig, b"data", PSS, hashes.SHA256())  # pinned parameters


# ---------------------------------------------------------------- batch signatures (seal_many)

def leaf_hash(env):
    """leaf = SHA-256(b"dm-leaf-v1" || S), rebuilt from the documented format."""
    s = signing_input(env, *(b64d(env[f]) for f in ("wrapped_key", "nonce", "ciphertext")))
    return hashlib.sha256(b"dm-leaf-v1" + s).digest()


def ref_tree(leaves):
    """Reference Merkle levels: pad to a power of two with 32 zero bytes, then pair up."""
    size = 1
    while size < len(leaves):
        size *= 2
    levels = [list(leaves) + [bytes(32)] * (size - len(leaves))]
    while len(levels[-1]) > 1:
        lv = levels[-1]
        levels.append([hashlib.sha256(b"dm-node-v1" + lv[i] + lv[i + 1]).digest()
                       for i in range(0, len(lv), 2)])
    return levels


def batch(alice, recipients, n, **kw):
    kw.setdefault("ts", NOW)
    items = [({"i": i}, name, key.public_key()) for i, (name, key) in
             zip(range(n), (recipients[i % len(recipients)] for i in range(n)))]
    return ku.seal_many(items, sender="alice", sender_key=alice, **kw)


def open_as(alice, env, keys, **kw):
    kw.setdefault("recipient", env["to"] if isinstance(env.get("to"), str) else "bob")
    return ku.open_envelope(env, recipient_key=keys[kw["recipient"]],
                            sender_public_key=alice.public_key(), **kw)


@pytest.fixture(scope="session")
def keys(bob, carol):
    return {"bob": bob, "carol": carol}


@pytest.fixture(scope="session")
def batch5(alice, bob, carol):
    return batch(alice, [("bob", bob), ("carol", carol)], 5)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64])
def test_seal_many_all_open_alone(alice, bob, carol, keys, n):
    envs = batch(alice, [("bob", bob), ("carol", carol)], n)
    assert len(envs) == n
    depth = (n - 1).bit_length()
    guard = ReplayGuard(clock=lambda: NOW)
    for i, env in enumerate(envs):
        assert set(env) == set(FIELDS) | {"proof", "leaf"}
        assert env["leaf"] == i and len(env["proof"]) == depth
        assert env["signature"] == envs[0]["signature"]
        assert env["to"] == ("bob" if i % 2 == 0 else "carol")
        assert open_as(alice, json.loads(json.dumps(env)), keys, replay_guard=guard) == {"i": i}
    assert len({e["msg_id"] for e in envs}) == n
    assert len({e["nonce"] for e in envs}) == n


@pytest.mark.parametrize("n", [1, 3, 6])
def test_batch_encoding_is_reproducible_from_the_docstring(alice, bob, n):
    envs = batch(alice, [("bob", bob)], n)
    levels = ref_tree([leaf_hash(e) for e in envs])
    alice.public_key().verify(b64d(envs[0]["signature"]), b"dm-batch-v1" + levels[-1][0],
                              PSS, hashes.SHA256())
    for i, env in enumerate(envs):
        assert [b64d(p) for p in env["proof"]] == [levels[k][(i >> k) ^ 1]
                                                   for k in range(len(levels) - 1)]
    # A batch built by hand from the documentation opens with the library.
    hand = [forge(b'{"n":%d}' % i, alice, bob.public_key(), msg_id=f"h-{i}") for i in range(3)]
    levels = ref_tree([leaf_hash(e) for e in hand])
    sig = b64e(alice.sign(b"dm-batch-v1" + levels[-1][0], PSS, hashes.SHA256()))
    for i, env in enumerate(hand):
        env = {**env, "signature": sig, "leaf": i,
               "proof": [b64e(levels[k][(i >> k) ^ 1]) for k in range(len(levels) - 1)]}
        assert open_b(alice, bob, env) == {"n": i}


def flip(b64, where=0):
    raw = bytearray(b64d(b64))
    raw[where] ^= 0x01
    return b64e(bytes(raw))


@pytest.mark.parametrize("mutate,error", [
    (lambda e: {**e, "ciphertext": flip(e["ciphertext"], -1)}, BadSignature),
    (lambda e: {**e, "wrapped_key": flip(e["wrapped_key"])}, BadSignature),
    (lambda e: {**e, "nonce": flip(e["nonce"])}, BadSignature),
    (lambda e: {**e, "to": "mallory"}, MalformedEnvelope),
    (lambda e: {**e, "msg_id": e["msg_id"] + "x"}, BadSignature),
    (lambda e: {**e, "ts": NOW + 1}, BadSignature),
    (lambda e: {**e, "from": "carol"}, BadSignature),
    (lambda e: {**e, "proof": [flip(e["proof"][0])] + e["proof"][1:]}, BadSignature),
    (lambda e: {**e, "proof": e["proof"][:1] + [flip(e["proof"][1], 31)] + e["proof"][2:]}, BadSignature),
    (lambda e: {**e, "proof": e["proof"][:-1] + [flip(e["proof"][-1])]}, BadSignature),
    (lambda e: {**e, "proof": e["proof"][::-1]}, BadSignature),
    (lambda e: {**e, "proof": e["proof"][:-1]}, BadSignature),  # leaf 2 < 4 still in range
    (lambda e: {**e, "proof": e["proof"] + [e["proof"][0]]}, BadSignature),
    (lambda e: {**e, "proof": []}, MalformedEnvelope),  # leaf 2 out of range for depth 0
    (lambda e: {**e, "leaf": 3}, BadSignature),
    (lambda e: {**e, "leaf": 0}, BadSignature),
    (lambda e: {**e, "leaf": 6}, BadSignature),
    (lambda e: {**e, "leaf": 8}, MalformedEnvelope),
    (lambda e: {**e, "leaf": -1}, MalformedEnvelope),
    (lambda e: {**e, "leaf": 2.0}, MalformedEnvelope),
    (lambda e: {**e, "leaf": True}, MalformedEnvelope),
    (lambda e: {**e, "leaf": "2"}, MalformedEnvelope),
    (lambda e: {k: v for k, v in e.items() if k != "leaf"}, MalformedEnvelope),
    (lambda e: {k: v for k, v in e.items() if k not in ("leaf", "proof")}, BadSignature),
    (lambda e: {k: v for k, v in e.items() if k != "proof"}, MalformedEnvelope),
    (lambda e: {**e, "proof": e["proof"][0]}, MalformedEnvelope),
    (lambda e: {**e, "proof": tuple(e["proof"])}, MalformedEnvelope),
    (lambda e: {**e, "proof": [e["proof"][0][:-4]] + e["proof"][1:]}, MalformedEnvelope),
    (lambda e: {**e, "proof": [b64e(bytes(33))] + e["proof"][1:]}, MalformedEnvelope),
    (lambda e: {**e, "proof": ["!" * 44] + e["proof"][1:]}, MalformedEnvelope),
    (lambda e: {**e, "proof": [b64e(bytes(32))] * 33, "leaf": 0}, MalformedEnvelope),
    (lambda e: {**e, "signature": flip(e["signature"], 100)}, BadSignature),
    (lambda e: {**e, "signature": "AAAA"}, BadSignature),
])
def test_tampered_batch_envelope_fails_alone(alice, keys, batch5, mutate, error):
    target = batch5[2]
    assert target["to"] == "bob" and len(target["proof"]) == 3
    guard = ReplayGuard(clock=lambda: NOW)
    with pytest.raises(error):
        open_as(alice, mutate(target), keys, recipient="bob", replay_guard=guard)
    assert len(guard) == 0  # nothing recorded for a rejected envelope
    for i, env in enumerate(batch5):  # the siblings (and the original) are unaffected
        assert open_as(alice, env, keys, replay_guard=guard) == {"i": i}


def test_proof_or_signature_from_another_batch_fails(alice, bob, keys, batch5):
    other = batch(alice, [("bob", bob)], 5)
    env = batch5[0]
    for swap in ({"proof": other[0]["proof"]}, {"signature": other[0]["signature"]},
                 {"proof": other[0]["proof"], "signature": other[0]["signature"]},
                 {"proof": batch5[4]["proof"], "leaf": 4}):
        with pytest.raises(BadSignature):
            open_as(alice, {**env, **swap}, keys)
    # Nor does a single-envelope signature work with a proof, or a batch one without.
    single = seal_ab(alice, bob, {"x": 1})
    with pytest.raises(BadSignature):
        open_as(alice, {**single, "proof": [], "leaf": 0}, keys)
    with pytest.raises(BadSignature):
        open_as(alice, {**single, "signature": env["signature"]}, keys)


def test_batch_envelope_moved_to_another_recipient_fails(alice, keys, batch5):
    for_bob = batch5[0]
    with pytest.raises(MalformedEnvelope, match="someone else"):
        open_as(alice, for_bob, keys, recipient="carol")
    with pytest.raises(BadSignature):
        open_as(alice, {**for_bob, "to": "carol"}, keys)
    # Re-labelled with carol's own leaf index and proof: still bound to bob's leaf hash.
    for_carol = batch5[1]
    with pytest.raises(BadSignature):
        open_as(alice, {**for_bob, "to": "carol", "leaf": 1, "proof": for_carol["proof"]}, keys)


def test_replayed_batch_envelope_is_caught(alice, keys, batch5):
    guard = ReplayGuard(clock=lambda: NOW)
    env = batch5[3]
    forged = {**env, "proof": [flip(env["proof"][0])] + env["proof"][1:]}
    with pytest.raises(BadSignature):
        open_as(alice, forged, keys, replay_guard=guard)  # does not burn the id
    assert open_as(alice, env, keys, replay_guard=guard) == {"i": 3}
    with pytest.raises(ReplayedMessage, match="replayed"):
        open_as(alice, env, keys, replay_guard=guard)
    with pytest.raises(ReplayedMessage, match="replayed"):
        open_as(alice, dict(env), keys, replay_guard=guard, unwrap_cache=ku.UnwrapCache())


def test_seal_many_arguments(alice, bob):
    assert ku.seal_many([], sender="alice", sender_key=alice) == []
    pub = bob.public_key()
    envs = ku.seal_many([({"a": 1}, "bob", pub, "id-1"), [{"b": 2}, "bob", pub, None]],
                        sender="alice", sender_key=alice)
    assert envs[0]["msg_id"] == "id-1" and re.fullmatch(r"[0-9a-f]{32}", envs[1]["msg_id"])
    assert envs[0]["ts"] == envs[1]["ts"] and abs(envs[0]["ts"] - time.time()) < 5
    assert [open_b(alice, bob, e) for e in envs] == [{"a": 1}, {"b": 2}]
    for bad, exc in ((["x", "bob", pub], TypeError), (({"a": 1}, "bob"), TypeError),
                     ("abc", TypeError), (({"a": 1}, "", pub), ValueError),
                     (({"a": 1}, "bob", pub, ""), ValueError),
                     (({"a": float("inf")}, "bob", pub), ValueError)):
        with pytest.raises(exc):
            ku.seal_many([({"ok": 1}, "bob", pub), bad], sender="alice", sender_key=alice)
    with pytest.raises(ValueError):
        ku.seal_many([({"ok": 1}, "bob", pub)], sender="alice", sender_key=alice, ts=-1)


proof_entries = (st.binary(min_size=32, max_size=32).map(b64e) | st.binary(max_size=40).map(b64e)
                 | json_values)


@settings(fuzz, max_examples=200)
@given(proof=st.lists(proof_entries, max_size=6) | json_values | st.just(missing := object()),
       leaf=st.integers(-2, 70) | json_values | st.just(missing))
def test_garbage_proof_and_leaf_only_raise_envelope_errors(alice, keys, batch5, proof, leaf):
    env = {k: v for k, v in batch5[2].items() if k not in ("proof", "leaf")}
    if proof is not missing:
        env["proof"] = proof
    if leaf is not missing:
        env["leaf"] = leaf
    assume(env.get("proof") != batch5[2]["proof"] or env.get("leaf") != 2)
    with pytest.raises(EnvelopeError):
        open_as(alice, env, keys, recipient="bob", replay_guard=ReplayGuard(clock=lambda: NOW),
                unwrap_cache=ku.UnwrapCache())


# ---------------------------------------------------------------- SessionKeys and UnwrapCache

class CountingKey:
    """A recipient private key that counts its RSA decryptions."""

    def __init__(self, key):
        self.key, self.calls = key, 0

    def decrypt(self, data, pad):
        self.calls += 1
        return self.key.decrypt(data, pad)


def test_session_keys_reuse_then_rotate_by_count_age_and_key(bob, carol):
    clock = [100.0]
    sk = ku.SessionKeys(max_messages=3, max_age=60, clock=lambda: clock[0])
    pub = bob.public_key()
    first = [sk.key_for("bob", pub) for _ in range(3)]
    assert len(set(first)) == 1 and len(first[0][0]) == 32
    assert bob.decrypt(first[0][1], OAEP) == first[0][0]
    second = sk.key_for("bob", pub)  # 4th use: rotated
    assert second != first[0]
    assert sk.key_for("carol", carol.public_key()) != second  # per recipient ...
    assert sk.key_for("bob", pub, sender="dave") != second  # ... and per sender
    assert sk.key_for("bob", bob.public_key()) == second  # equal key object is the same key
    clock[0] += 59.9
    assert sk.key_for("bob", pub) == second
    clock[0] += 0.1  # max_age reached
    third = sk.key_for("bob", pub)
    assert third != second
    fourth = sk.key_for("bob", carol.public_key())  # the recipient's key changed
    assert fourth != third and carol.decrypt(fourth[1], OAEP) == fourth[0]
    sk.forget("bob")
    assert sk.key_for("bob", carol.public_key()) != fourth
    sk.forget()
    assert len(sk) == 0
    with pytest.raises(ValueError):
        ku.SessionKeys(max_messages=0)


def test_session_keys_are_thread_safe_and_bounded(bob, carol):
    import threading
    sk = ku.SessionKeys(max_messages=20, max_recipients=1)
    got, pubs = [], {"bob": bob.public_key(), "carol": carol.public_key()}

    def work(name):
        for _ in range(60):
            got.append(sk.key_for(name, pubs[name]))
    threads = [threading.Thread(target=work, args=(n,)) for n in ("bob", "carol") * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 240 and len(sk) == 1
    assert max(got.count(k) for k in set(got)) <= 20


def test_seal_with_session_keys_and_open_with_unwrap_cache(alice, bob, carol):
    sk, cache, counting = ku.SessionKeys(), ku.UnwrapCache(), CountingKey(bob)
    envs = [seal_ab(alice, bob, {"n": i}, session_keys=sk) for i in range(3)]
    envs += ku.seal_many([({"n": i}, "bob", bob.public_key()) for i in range(3, 6)],
                         sender="alice", sender_key=alice, session_keys=sk, ts=NOW)
    assert len({e["wrapped_key"] for e in envs}) == 1
    assert len({e["nonce"] for e in envs}) == 6
    for i, env in enumerate(envs):
        assert open_b(alice, bob, env, recipient_key=counting, unwrap_cache=cache) == {"n": i}
        assert open_b(alice, bob, env) == {"n": i}  # and without any cache
    assert counting.calls == 1 and len(cache) == 1
    # One SessionKeys never gives two senders the same key ...
    other = ku.seal({"c": 0}, sender="carol", recipient="bob", sender_key=carol,
                    recipient_public_key=bob.public_key(), session_keys=sk)
    assert other["wrapped_key"] != envs[0]["wrapped_key"]
    # ... and the cache is keyed by sender: carol re-using alice's wrapped key misses it.
    alices = sk.key_for("bob", bob.public_key(), sender="alice")
    assert b64e(alices[1]) == envs[0]["wrapped_key"]

    class Fixed:
        def key_for(self, recipient, public_key, *, sender=None):
            return alices
    from_carol = ku.seal({"c": 1}, sender="carol", recipient="bob", sender_key=carol,
                         recipient_public_key=bob.public_key(), session_keys=Fixed())
    assert from_carol["wrapped_key"] == envs[0]["wrapped_key"]
    assert open_b(carol, bob, from_carol, recipient_key=counting, unwrap_cache=cache) == {"c": 1}
    assert counting.calls == 2 and len(cache) == 2


def test_unwrap_cache_is_not_filled_by_unauthenticated_or_undecryptable_data(alice, bob):
    sk, cache, counting = ku.SessionKeys(), ku.UnwrapCache(), CountingKey(bob)
    env = seal_ab(alice, bob, {"x": 1}, session_keys=sk)
    for bad in ({**env, "signature": flip(env["signature"])}, {**env, "to": "carol"},
                {**env, "nonce": "AAAA"}):
        with pytest.raises(EnvelopeError):
            open_b(alice, bob, bad, recipient_key=counting, unwrap_cache=cache)
    assert len(cache) == 0 and counting.calls == 0  # no RSA op, nothing cached
    # Signed, right wrapped key, corrupt ciphertext: decrypts the key but caches nothing.
    corrupt = resign({**env, "ciphertext": flip(env["ciphertext"], -1)}, alice)
    with pytest.raises(DecryptionFailed):
        open_b(alice, bob, corrupt, recipient_key=counting, unwrap_cache=cache)
    assert len(cache) == 0 and counting.calls == 1
    assert open_b(alice, bob, env, recipient_key=counting, unwrap_cache=cache) == {"x": 1}
    assert len(cache) == 1 and counting.calls == 2
    # Now cached: a signed envelope whose ciphertext fails still raises DecryptionFailed.
    with pytest.raises(DecryptionFailed):
        open_b(alice, bob, corrupt, recipient_key=counting, unwrap_cache=cache)
    assert counting.calls == 2
    # A poisoned entry (wrong AES key) is never trusted: GCM fails, DecryptionFailed.
    poisoned = ku.UnwrapCache()
    poisoned.put(("bob", "alice", b64d(env["wrapped_key"])), os.urandom(32))
    with pytest.raises(DecryptionFailed):
        open_b(alice, bob, env, unwrap_cache=poisoned)


def test_unwrap_cache_is_lru():
    cache = ku.UnwrapCache(max_entries=2)
    cache.put("a", b"A" * 32)
    cache.put("b", b"B" * 32)
    assert cache.get("a") == b"A" * 32  # a is now the most recent
    cache.put("c", b"C" * 32)
    assert cache.get("b") is None and cache.get("a") and cache.get("c") and len(cache) == 2
    with pytest.raises(ValueError):
        ku.UnwrapCache(max_entries=0)
