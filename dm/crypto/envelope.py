"""Envelopes: hybrid encryption, RSA-PSS signatures (single or batched), replay protection.

Pure functions plus three small thread-safe helpers (SessionKeys, UnwrapCache, ReplayGuard);
no sockets, no chain. Every public name is re-exported by dm.crypto (and key_utils). Wire format (JSON):

    {"from": str, "to": str, "msg_id": str, "ts": int (unix seconds),
     "wrapped_key": b64, "nonce": b64, "code_slot": b64 (32 bytes), "digest": b64 (32 bytes),
     "ciphertext": b64, "signature": b64}

and an envelope made by ``seal_many`` additionally has ``"proof": [b64, ...]`` and
``"leaf": int``. Binary fields are standard base64 (with padding). ``seal`` documents the
crypto of one envelope, ``seal_many`` the batch (Merkle tree) signature.

Key release: the node covers ``ciphertext`` with its own layer (dm.relay.sealing) and hands
its key over only for the code. So a recipient opens a relayed envelope in two steps:
``open_slot`` (verify the signature, which covers the code slot and the ciphertext's digest
but not the ciphertext, check for replay, read the code), then, once the node released its
key, ``open_node_layer`` and ``open_ciphertext``. ``open_envelope`` does both steps for an
envelope whose ciphertext is the sender's own (not relayed).
"""

import base64
import collections
import hashlib
import heapq
import hmac
import json
import math
import os
import secrets
import threading
import time

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

SIGNATURE_TAG = b"dm-envelope-v2"
CODE_SLOT_TAG = b"dm-code-slot-v1"
HEADER_TAG = b"dm-header-v1"
BATCH_TAG = b"dm-batch-v1"
LEAF_TAG = b"dm-leaf-v1"
NODE_TAG = b"dm-node-v1"
NONCE_SIZE = 12
HASH_SIZE = 32
CODE_SIZE = 32  # the code slot holds exactly this many bytes
NODE_LAYER_NONCE = bytes(12)  # the node's layer key is fresh per message, so its nonce is fixed
MAX_PROOF = 32  # tree depth, so at most 2**32 envelopes per batch
MAX_HEADER_FIELD = 256  # names and msg ids are short identifiers
ENVELOPE_FIELDS = ("from", "to", "msg_id", "ts", "wrapped_key", "nonce", "code_slot", "digest", "ciphertext",
                   "signature")
BATCH_FIELDS = ("proof", "leaf")

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_B64_HASH_LEN = 44  # len(base64 of 32 bytes)


class EnvelopeError(Exception):
    """Base for every failure to open an envelope; ``reason`` is short and user-facing."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BadSignature(EnvelopeError):
    """The signature (or the batch proof) does not verify with the given sender key."""


class ReplayedMessage(EnvelopeError):
    """The msg_id was already accepted from that sender, or ts is outside the window."""


class MalformedEnvelope(EnvelopeError):
    """Missing or ill-typed fields, bad base64, wrong recipient, payload not a JSON object."""


class DecryptionFailed(EnvelopeError):
    """RSA-OAEP unwrap or AES-GCM authentication failed."""


class WrongRelease(EnvelopeError):
    """The key the node released does not open its layer, or what it opens is not the
    ciphertext the sender signed: the node took the code and withheld the text."""


# ---------------------------------------------------------------- signatures

def sign(private_key: RSAPrivateKey, data: bytes) -> bytes:
    """RSA-PSS, MGF1-SHA256, 32-byte salt, SHA-256."""
    return private_key.sign(data, _PSS, hashes.SHA256())


def verify(public_key: RSAPublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public_key.verify(signature, data, _PSS, hashes.SHA256())
        return True
    except InvalidSignature:
        return False


# ---------------------------------------------------------------- key reuse helpers

class SessionKeys:
    """Sender side: reuse one AES key (and its RSA-OAEP wrapping) per (sender, recipient).

    ``key_for`` returns the same (aes_key, wrapped_key) for a recipient for at most
    ``max_messages`` calls and while the key is younger than ``max_age`` seconds (by
    ``clock``); after that, or when the recipient's public key differs from the one the key
    was wrapped for, a fresh key is made. At most ``max_recipients`` (sender, recipient) pairs are
    remembered (least recently used dropped). Every message still gets its own random nonce,
    so the only cost saved is the RSA encryption and the recipient's RSA decryption.
    ``seal``/``seal_many`` pass ``sender=``, so one instance shared by several local
    identities never gives two senders the same key. Thread-safe.
    """

    def __init__(self, max_messages: int = 1000, max_age: float = 600.0, clock=time.monotonic,
                 max_recipients: int = 4096):
        if type(max_messages) is not int or max_messages < 1:
            raise ValueError("max_messages must be a positive integer")
        if not max_age > 0:
            raise ValueError("max_age must be positive")
        self.max_messages = max_messages
        self.max_age = max_age
        self.max_recipients = max_recipients
        self._clock = clock
        self._keys = collections.OrderedDict()  # (sender, recipient) -> [aes, wrapped, pub, born, uses]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def key_for(self, recipient: str, recipient_public_key: RSAPublicKey, *,
                sender: str | None = None) -> tuple:
        """(aes_key, wrapped_key) to use for the next message from ``sender`` to ``recipient``."""
        slot, now = (sender, recipient), self._clock()
        with self._lock:
            e = self._keys.get(slot)
            if (e is not None and e[4] < self.max_messages and e[3] <= now < e[3] + self.max_age
                    and (e[2] is recipient_public_key or e[2] == recipient_public_key)):
                e[4] += 1
                self._keys.move_to_end(slot)
                return e[0], e[1]
        aes_key = AESGCM.generate_key(bit_length=256)
        wrapped = recipient_public_key.encrypt(aes_key, _OAEP)  # outside the lock: ~50 us
        with self._lock:
            self._keys[slot] = [aes_key, wrapped, recipient_public_key, now, 1]
            self._keys.move_to_end(slot)
            while len(self._keys) > self.max_recipients:
                self._keys.popitem(last=False)
        return aes_key, wrapped

    def forget(self, recipient: str | None = None) -> None:
        """Drop the keys for ``recipient`` (all keys if None); its next message gets a new one."""
        with self._lock:
            for slot in [s for s in self._keys if recipient is None or s[1] == recipient]:
                del self._keys[slot]


class UnwrapCache:
    """Recipient side: LRU of (recipient, sender, wrapped_key bytes) -> AES key.

    ``open_envelope`` consults it to skip the RSA-OAEP private-key operation for a wrapped
    key it has already unwrapped, and fills it only after the envelope's signature verified
    and its ciphertext decrypted. Use one cache per recipient private key. Thread-safe.
    """

    def __init__(self, max_entries: int = 4096):
        if type(max_entries) is not int or max_entries < 1:
            raise ValueError("max_entries must be a positive integer")
        self.max_entries = max_entries
        self._d = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key):
        with self._lock:
            value = self._d.get(key)
            if value is not None:
                self._d.move_to_end(key)
            return value

    def put(self, key, aes_key: bytes) -> None:
        with self._lock:
            self._d[key] = aes_key
            self._d.move_to_end(key)
            while len(self._d) > self.max_entries:
                self._d.popitem(last=False)


# ---------------------------------------------------------------- envelopes

def _length_prefixed(tag: bytes, fields) -> bytes:
    parts = [tag]
    for f in fields:
        parts.append(len(f).to_bytes(4, "big"))
        parts.append(f)
    return b"".join(parts)


def _header_fields(frm, to, msg_id, ts) -> list:
    """Validate the header and return its encoded fields; ValueError says what is wrong."""
    out = []
    for name, v in (("from", frm), ("to", to), ("msg_id", msg_id)):
        if not isinstance(v, str) or not 0 < len(v) <= MAX_HEADER_FIELD:
            raise ValueError(f"'{name}' must be a non-empty string of at most {MAX_HEADER_FIELD} chars")
        try:
            out.append(v.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValueError(f"'{name}' is not valid Unicode") from None
    # bool is an int subclass; the bound keeps str(ts) cheap and fits any int64 reader.
    if type(ts) is not int or not 0 <= ts < 2 ** 63:
        raise ValueError("'ts' must be an integer number of seconds in [0, 2**63)")
    out.append(str(ts).encode("ascii"))
    return out


def _slot_pad(aes_key: bytes, header: list, nonce: bytes) -> bytes:
    """What the code is XORed with: only a holder of K (sender, recipient) can compute it."""
    return hmac.digest(aes_key, _length_prefixed(CODE_SLOT_TAG, header + [nonce]), "sha256")


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _signing_input(header: list, wrapped_key: bytes, nonce: bytes, code_slot: bytes, digest: bytes) -> bytes:
    return _length_prefixed(SIGNATURE_TAG, header + [wrapped_key, nonce, code_slot, digest])


def _encrypt(payload, sender, recipient, recipient_public_key, msg_id, ts, session_keys, code):
    """Encrypt one message; return (envelope without signature, bytes S that get signed)."""
    if not isinstance(payload, dict):
        raise TypeError("payload must be a dict")
    code = secrets.token_bytes(CODE_SIZE) if code is None else code
    if not isinstance(code, bytes) or len(code) != CODE_SIZE:
        raise ValueError(f"the code must be {CODE_SIZE} bytes")
    msg_id = secrets.token_hex(16) if msg_id is None else msg_id
    header = _header_fields(sender, recipient, msg_id, ts)
    plaintext = json.dumps(payload, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False).encode("utf-8")
    if session_keys is None:
        aes_key = AESGCM.generate_key(bit_length=256)
        wrapped_key = recipient_public_key.encrypt(aes_key, _OAEP)
    else:
        aes_key, wrapped_key = session_keys.key_for(recipient, recipient_public_key,
                                                      sender=sender)
    nonce = os.urandom(NONCE_SIZE)
    ciphertext = AESGCM(aes_key).encrypt(nonce, plaintext, _length_prefixed(HEADER_TAG, header))
    code_slot = _xor(code, _slot_pad(aes_key, header, nonce))
    digest = hashlib.sha256(ciphertext).digest()
    env = {"from": sender, "to": recipient, "msg_id": msg_id, "ts": ts,
           "wrapped_key": _b64(wrapped_key), "nonce": _b64(nonce), "code_slot": _b64(code_slot),
           "digest": _b64(digest), "ciphertext": _b64(ciphertext)}
    return env, _signing_input(header, wrapped_key, nonce, code_slot, digest)


def seal(payload: dict, *, sender: str, recipient: str, sender_key: RSAPrivateKey,
         recipient_public_key: RSAPublicKey, msg_id: str | None = None,
         ts: int | None = None, session_keys: SessionKeys | None = None,
         code: bytes | None = None) -> dict:
    """Encrypt and sign ``payload`` (a JSON-serialisable dict) and the 32-byte ``code`` for
    ``recipient``.

    Plaintext: json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    encoded as UTF-8 (strings with lone surrogates are rejected with ValueError).

    Crypto, per message:
      * 32-byte AES key K (fresh, or reused from ``session_keys``) and fresh 12-byte nonce N;
      * ciphertext = AES-256-GCM(K, N, plaintext, aad=H), 16-byte tag appended, where
        H = b"dm-header-v1" || lp(from) || lp(to) || lp(msg_id) || lp(ts);
      * wrapped_key = RSA-OAEP(recipient public key, K), MGF1-SHA256, SHA-256, no label;
      * code_slot = code XOR HMAC-SHA256(K, b"dm-code-slot-v1" || lp(from) || lp(to)
        || lp(msg_id) || lp(ts) || lp(N)): exactly 32 bytes, readable only with K;
      * digest = SHA-256(ciphertext);
      * signature = RSA-PSS(sender key, S), MGF1-SHA256, salt 32, SHA-256, where
        S = b"dm-envelope-v2" || lp(from) || lp(to) || lp(msg_id) || lp(ts)
            || lp(wrapped_key) || lp(N) || lp(code_slot) || lp(digest).
    The signature covers the ciphertext through its digest, so it can be checked while the
    node's layer still hides the ciphertext. lp(x) = 4-byte big-endian length of x, then x.
    Text fields are UTF-8; ts is its ASCII decimal form (e.g. b"1700000000"); binary fields are
    the raw bytes, not the base64. msg_id defaults to 32 random hex chars; ts to
    int(time.time()); code to 32 random bytes.
    """
    ts = int(time.time()) if ts is None else ts
    env, signed = _encrypt(payload, sender, recipient, recipient_public_key, msg_id, ts,
                           session_keys, code)
    env["signature"] = _b64(sign(sender_key, signed))
    return env


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_TAG + left + right).digest()


def _leaf(signed: bytes) -> bytes:
    return hashlib.sha256(LEAF_TAG + signed).digest()


def _merkle_levels(leaves: list) -> list:
    """All levels bottom-up, each odd level (except the root) padded with that level's Z."""
    levels, pad = [list(leaves)], bytes(HASH_SIZE)
    while len(levels[-1]) > 1:
        level = levels[-1]
        if len(level) % 2:
            level.append(pad)
        levels.append([_node(level[i], level[i + 1]) for i in range(0, len(level), 2)])
        pad = _node(pad, pad)
    return levels


def _merkle_root(leaf_hash: bytes, index: int, proof: list) -> bytes:
    h = leaf_hash
    for depth, sibling in enumerate(proof):
        h = _node(sibling, h) if (index >> depth) & 1 else _node(h, sibling)
    return h


def seal_many(items, *, sender: str, sender_key: RSAPrivateKey,
              session_keys: SessionKeys | None = None, ts: int | None = None) -> list:
    """Seal several messages from ``sender`` with ONE RSA signature (a Merkle batch).

    ``items``: (payload, recipient, recipient_public_key[, msg_id[, code]]) tuples; msg_id None
    or absent = 32 random hex chars, code None or absent = 32 random bytes, ts
    (shared) defaults to int(time.time()). Returns one envelope per item, in order; each is
    encrypted exactly like ``seal`` (plaintext, K, nonce, H, wrapped_key and S identical)
    and opens on its own, without the rest of the batch. All items are validated before
    anything is signed (TypeError/ValueError as in ``seal``). An empty list gives [].

    Batch signature, for n envelopes with signing inputs S_0 .. S_{n-1} (S as in ``seal``):
      * leaf_i = SHA-256(b"dm-leaf-v1" || S_i);
      * node(l, r) = SHA-256(b"dm-node-v1" || l || r) (raw 32-byte hashes);
      * the tree is the perfect binary tree over the leaves padded on the right to the next
        power of two 2**d (d = ceil(log2 n), 0 for n = 1) with padding leaves Z_0 = 32 zero
        bytes. Equivalently, level by level: while a level has more than one hash, if its
        count is odd append Z_k (k = the level, Z_{k+1} = node(Z_k, Z_k)), then pair
        neighbours with node(). root = the single hash left (leaf_0 itself when n = 1);
      * signature = RSA-PSS(sender key, b"dm-batch-v1" || root), parameters as in ``seal``;
    every envelope carries the same "signature" plus
      * "leaf": its index i in the batch (JSON integer, 0 <= i < 2**len(proof));
      * "proof": the d sibling hashes from the leaf up, as base64 strings: entry k is the
        hash at level k with index (i >> k) ^ 1 (a Z_k where that is padding).
    To verify: h = leaf_i; for k, s in enumerate(proof): h = node(s, h) if bit k of i is 1
    else node(h, s); then check the signature over b"dm-batch-v1" || h.
    """
    items = list(items)
    if len(items) > 2 ** MAX_PROOF:
        raise ValueError(f"at most 2**{MAX_PROOF} envelopes per batch")
    ts = int(time.time()) if ts is None else ts
    envelopes, leaves = [], []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) not in (3, 4, 5):
            raise TypeError("each item must be (payload, recipient, recipient_public_key[, msg_id[, code]])")
        payload, recipient, public_key, msg_id, code = (*item, None, None)[:5]
        env, signed = _encrypt(payload, sender, recipient, public_key, msg_id, ts, session_keys, code)
        envelopes.append(env)
        leaves.append(_leaf(signed))
    if not envelopes:
        return []
    levels = _merkle_levels(leaves)
    signature = _b64(sign(sender_key, BATCH_TAG + levels[-1][0]))
    encoded = [[_b64(h) for h in level] for level in levels[:-1]]
    for i, env in enumerate(envelopes):
        env["signature"] = signature
        env["proof"] = [level[(i >> k) ^ 1] for k, level in enumerate(encoded)]
        env["leaf"] = i
    return envelopes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64_field(envelope: dict, name: str) -> bytes:
    value = envelope.get(name)
    if not isinstance(value, str):
        raise MalformedEnvelope(f"missing or non-string '{name}'")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error, and non-ASCII text
        raise MalformedEnvelope(f"'{name}' is not valid base64") from None


def _batch_fields(envelope: dict):
    """(leaf index, [sibling hashes]) of a batch envelope, or None for a single one."""
    if "proof" not in envelope and "leaf" not in envelope:
        return None
    proof, leaf = envelope.get("proof"), envelope.get("leaf")
    if type(proof) is not list or len(proof) > MAX_PROOF:
        raise MalformedEnvelope(f"'proof' must be a list of at most {MAX_PROOF} hashes")
    siblings = []
    for entry in proof:
        if not isinstance(entry, str) or len(entry) != _B64_HASH_LEN:
            raise MalformedEnvelope("'proof' entries must be base64 of 32 bytes")
        try:
            siblings.append(base64.b64decode(entry, validate=True))
        except ValueError:
            raise MalformedEnvelope("'proof' entry is not valid base64") from None
        if len(siblings[-1]) != HASH_SIZE:
            raise MalformedEnvelope("'proof' entries must be base64 of 32 bytes")
    if type(leaf) is not int or not 0 <= leaf < 2 ** len(siblings):
        raise MalformedEnvelope("'leaf' must be an integer in [0, 2**len(proof))")
    return leaf, siblings


def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


class Opened:
    """An envelope whose signature verified and whose code slot was read (``open_slot``);
    its ciphertext still waits for the node's key. ``code`` is the 32 bytes to claim with."""

    __slots__ = ("sender", "msg_id", "code", "_aes_key", "_header", "_nonce", "_digest", "_cache_fill")

    def __init__(self, sender, msg_id, code, aes_key, header, nonce, digest, cache_fill):
        self.sender, self.msg_id, self.code = sender, msg_id, code
        self._aes_key, self._header, self._nonce, self._digest = aes_key, header, nonce, digest
        self._cache_fill = cache_fill  # (cache, key) to fill once the ciphertext decrypted, or None


def open_slot(envelope: dict, *, recipient: str, recipient_key: RSAPrivateKey,
              sender_public_key: RSAPublicKey, replay_guard: "ReplayGuard | None" = None,
              unwrap_cache: UnwrapCache | None = None) -> Opened:
    """Verify an envelope made by ``seal`` or ``seal_many``, replay-check it and read its code,
    without its ciphertext (which the node's layer may still cover).

    The caller picks ``sender_public_key`` for envelope["from"]. An envelope with "proof" or
    "leaf" is a batch envelope (both fields are then required and checked strictly, see
    ``seal_many``); otherwise the signature is over S directly. Order matters: the signature
    is checked before anything is decrypted (so unauthenticated data never reaches RSA
    decryption or the unwrap cache) and before the replay guard records the id (so forgeries
    cannot burn ids). ``unwrap_cache`` skips the RSA unwrap of a wrapped key already seen from
    this sender; it is filled only after a ciphertext decrypted (``open_ciphertext``). Any
    problem with the envelope raises an EnvelopeError subclass, nothing else.
    """
    if not isinstance(envelope, dict):
        raise MalformedEnvelope("envelope is not a JSON object")
    try:
        header = _header_fields(envelope.get("from"), envelope.get("to"),
                                envelope.get("msg_id"), envelope.get("ts"))
    except ValueError as e:
        raise MalformedEnvelope(str(e)) from None
    wrapped_key, nonce, code_slot, digest, signature = (
        _b64_field(envelope, n) for n in ("wrapped_key", "nonce", "code_slot", "digest", "signature"))
    if len(nonce) != NONCE_SIZE:
        raise MalformedEnvelope(f"'nonce' must be {NONCE_SIZE} bytes")
    if len(code_slot) != CODE_SIZE:
        raise MalformedEnvelope(f"'code_slot' must be {CODE_SIZE} bytes")
    if len(digest) != HASH_SIZE:
        raise MalformedEnvelope(f"'digest' must be {HASH_SIZE} bytes")
    batch = _batch_fields(envelope)
    if envelope["to"] != recipient:
        raise MalformedEnvelope("envelope is addressed to someone else")

    signed = _signing_input(header, wrapped_key, nonce, code_slot, digest)
    if batch is not None:
        signed = BATCH_TAG + _merkle_root(_leaf(signed), *batch)
    if not verify(sender_public_key, signature, signed):
        raise BadSignature("signature does not match the sender's key")
    if replay_guard is not None:
        replay_guard.check_and_record(envelope["from"], envelope["msg_id"], envelope["ts"])

    cache_key = (recipient, envelope["from"], wrapped_key)
    aes_key = None if unwrap_cache is None else unwrap_cache.get(cache_key)
    cached = aes_key is not None
    try:
        if not cached:
            aes_key = recipient_key.decrypt(wrapped_key, _OAEP)
        if len(aes_key) != 32:
            raise ValueError("wrapped key is not an AES-256 key")
    except ValueError:
        raise DecryptionFailed("could not decrypt message (not for this key, or corrupted)") from None
    code = _xor(code_slot, _slot_pad(aes_key, header, nonce))
    fill = None if unwrap_cache is None or cached else (unwrap_cache, cache_key)
    return Opened(envelope["from"], envelope["msg_id"], code, aes_key, header, nonce, digest, fill)


def open_ciphertext(opened: Opened, ciphertext: bytes) -> dict:
    """The payload of an envelope opened by ``open_slot``, from its end-to-end ciphertext
    (raw bytes). A ciphertext other than the one the sender signed raises BadSignature."""
    if not hmac.compare_digest(hashlib.sha256(ciphertext).digest(), opened._digest):
        raise BadSignature("the ciphertext is not the one the sender signed")
    try:
        plaintext = AESGCM(opened._aes_key).decrypt(opened._nonce, ciphertext,
                                                    _length_prefixed(HEADER_TAG, opened._header))
    except InvalidTag:
        raise DecryptionFailed("could not decrypt message (not for this key, or corrupted)") from None
    if opened._cache_fill is not None:
        cache, key = opened._cache_fill
        cache.put(key, opened._aes_key)
    try:
        payload = json.loads(plaintext.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise MalformedEnvelope("payload is not valid JSON") from None
    if not isinstance(payload, dict):
        raise MalformedEnvelope("payload is not a JSON object")
    return payload


def open_node_layer(key: bytes, sealed_ciphertext) -> bytes:
    """The end-to-end ciphertext under the node's layer (dm.relay.sealing), opened with the
    key the node released: ChaCha20-Poly1305(key, 12 zero bytes, no AAD) over the raw ciphertext.
    ``sealed_ciphertext`` is the relayed envelope's base64 "ciphertext". A key that does not
    open it raises WrongRelease."""
    try:
        sealed = base64.b64decode(sealed_ciphertext, validate=True)
        if len(key) != 32:
            raise ValueError("the node's key must be 32 bytes")
        return ChaCha20Poly1305(key).decrypt(NODE_LAYER_NONCE, sealed, None)
    except (ValueError, TypeError, InvalidTag):
        raise WrongRelease("the node's key does not open its layer") from None


def open_envelope(envelope: dict, *, recipient: str, recipient_key: RSAPrivateKey,
                  sender_public_key: RSAPublicKey,
                  replay_guard: "ReplayGuard | None" = None,
                  unwrap_cache: UnwrapCache | None = None) -> dict:
    """Verify, replay-check and decrypt an envelope whose ciphertext is the sender's own (not
    under a node's layer): ``open_slot`` then ``open_ciphertext``. Returns the payload dict.
    A ciphertext that is not the signed one is refused before the replay guard records the id."""
    if isinstance(envelope, dict) and "digest" in envelope:
        ciphertext, digest = _b64_field(envelope, "ciphertext"), _b64_field(envelope, "digest")
        if not hmac.compare_digest(hashlib.sha256(ciphertext).digest(), digest):
            raise BadSignature("the ciphertext is not the one the sender signed")
    opened = open_slot(envelope, recipient=recipient, recipient_key=recipient_key,
                       sender_public_key=sender_public_key, replay_guard=replay_guard,
                       unwrap_cache=unwrap_cache)
    return open_ciphertext(opened, _b64_field(envelope, "ciphertext"))


# ---------------------------------------------------------------- replay protection

class ReplayGuard:
    """Remembers accepted (sender, msg_id) pairs for a bounded window.

    Envelopes with ts older than ``max_age`` seconds, or more than ``max_skew`` seconds in the
    future, are rejected outright, so ids older than the window can be forgotten safely. The
    "too old" floor only ever rises (even if the clock steps back), and if more than
    ``max_entries`` ids are held, the oldest are dropped and the floor raised past them, so a
    forgotten id can never be accepted again. Thread-safe.
    """

    def __init__(self, max_age: float = 86400, max_skew: float = 300, clock=time.time,
                 max_entries: int = 1_000_000):
        self.max_age = max_age
        self.max_skew = max_skew
        self.max_entries = max_entries
        self._clock = clock
        self._seen = set()
        self._by_ts = []  # heap of (ts, sender, msg_id), oldest first, for cheap expiry
        self._floor = -math.inf
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self) -> None:
        while self._by_ts and self._by_ts[0][0] < self._floor:
            _, sender, msg_id = heapq.heappop(self._by_ts)
            self._seen.discard((sender, msg_id))

    def check_and_record(self, sender: str, msg_id: str, ts: int, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        with self._lock:
            self._floor = max(self._floor, now - self.max_age)
            self._expire()
            if ts < self._floor:
                raise ReplayedMessage("message too old")
            if ts > now + self.max_skew:
                raise ReplayedMessage("message from the future (check the sender's clock)")
            key = (sender, msg_id)
            if key in self._seen:
                raise ReplayedMessage("replayed message (already received)")
            self._seen.add(key)
            heapq.heappush(self._by_ts, (ts, sender, msg_id))
            if len(self._seen) > self.max_entries:
                oldest_ts = self._by_ts[0][0]
                self._floor = max(self._floor, math.nextafter(oldest_ts, math.inf))
                self._expire()
