"""RSA keys, hybrid encryption, signatures and fingerprints for DistributedMessaging.

Pure functions only: no sockets, no chain. Wire format of an envelope (all values JSON):

    {"from": str, "to": str, "msg_id": str, "ts": int (unix seconds),
     "wrapped_key": b64, "nonce": b64, "ciphertext": b64, "signature": b64}

Binary fields are standard base64 (with padding). See ``seal`` for the exact crypto.
"""

import base64
import functools
import hashlib
import heapq
import json
import math
import os
import secrets
import threading
import time

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SIGNATURE_TAG = b"dm-envelope-v1"
HEADER_TAG = b"dm-header-v1"
NONCE_SIZE = 12
MAX_HEADER_FIELD = 256  # names and msg ids are short identifiers
ENVELOPE_FIELDS = ("from", "to", "msg_id", "ts", "wrapped_key", "nonce", "ciphertext", "signature")

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


class EnvelopeError(Exception):
    """Base for every failure to open an envelope; ``reason`` is short and user-facing."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BadSignature(EnvelopeError):
    """The signature does not verify with the given sender key."""


class ReplayedMessage(EnvelopeError):
    """The msg_id was already accepted from that sender, or ts is outside the window."""


class MalformedEnvelope(EnvelopeError):
    """Missing or ill-typed fields, bad base64, wrong recipient, payload not a JSON object."""


class DecryptionFailed(EnvelopeError):
    """RSA-OAEP unwrap or AES-GCM authentication failed."""


class KeyFileError(Exception):
    """A key file (or PEM text) is missing, unreadable, not an RSA key, or already exists."""


# ---------------------------------------------------------------- keys and files

def generate_private_key(bits: int = 2048) -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _write_new(path, data: bytes, mode: int, what: str) -> None:
    path = os.fspath(path)
    try:
        # O_EXCL + mode at creation: never overwrites, never briefly world-readable.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise KeyFileError(f"{what} file already exists, refusing to overwrite: {path}") from None
    except OSError as e:
        raise KeyFileError(f"cannot create {what} file {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException as e:
        os.unlink(path)  # a truncated key file would otherwise block every retry
        if isinstance(e, OSError):
            raise KeyFileError(f"cannot write {what} file {path}: {e.strerror}") from None
        raise


def save_private_key(path, key: RSAPrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS8 PEM, mode 0o600; KeyFileError if ``path`` exists."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_new(path, pem, 0o600, "private key")


def save_public_key(path, public_key: RSAPublicKey) -> None:
    """Write SubjectPublicKeyInfo PEM, mode 0o644; KeyFileError if ``path`` exists."""
    _write_new(path, public_key_pem(public_key).encode("ascii"), 0o644, "public key")


def _os_error(e: OSError, what: str, path) -> KeyFileError:
    if isinstance(e, FileNotFoundError):
        return KeyFileError(f"{what} file not found: {path}")
    return KeyFileError(f"cannot read {what} file {path}: {e.strerror}")


# Loading a private key validates it (tens of ms since cryptography 37), so each file is
# parsed once per process; the (mtime_ns, size) part of the key notices a rewritten file.
@functools.lru_cache(maxsize=32)
def _load_private_cached(realpath: str, mtime_ns: int, size: int) -> RSAPrivateKey:
    try:
        with open(realpath, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _os_error(e, "private key", realpath) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"private key file is password-protected (unsupported): {realpath}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"not a valid PEM private key: {realpath}") from None
    if not isinstance(key, RSAPrivateKey):
        raise KeyFileError(f"not an RSA private key: {realpath}")
    return key


def load_private_key(path) -> RSAPrivateKey:
    try:
        st = os.stat(path)
    except OSError as e:
        raise _os_error(e, "private key", os.fspath(path)) from None
    return _load_private_cached(os.path.realpath(path), st.st_mtime_ns, st.st_size)


def load_public_key(path) -> RSAPublicKey:
    """Public keys are small: re-read the file, parse through the cache keyed by content."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _os_error(e, "public key", os.fspath(path)) from None
    try:
        return _public_key_from_pem_bytes(data)
    except KeyFileError as e:
        raise KeyFileError(f"{e}: {os.fspath(path)}") from None


@functools.lru_cache(maxsize=1024)
def _public_key_from_pem_bytes(pem: bytes) -> RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError("not a valid PEM public key") from None
    if not isinstance(key, RSAPublicKey):
        raise KeyFileError("not an RSA public key")
    return key


def public_key_from_pem(pem) -> RSAPublicKey:
    """Parse SubjectPublicKeyInfo PEM (str or bytes); cached so per-message calls are free."""
    if isinstance(pem, str):
        try:
            pem = pem.encode("ascii")
        except UnicodeEncodeError:
            raise KeyFileError("not a valid PEM public key (non-ASCII text)") from None
    if not isinstance(pem, bytes):
        raise KeyFileError(f"PEM must be str or bytes, not {type(pem).__name__}")
    return _public_key_from_pem_bytes(pem)


def public_key_pem(key) -> str:
    """PEM (SubjectPublicKeyInfo) text of the public half of a private or public key."""
    if isinstance(key, RSAPrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def fingerprint(public_key_or_pem) -> str:
    """Full SHA-256 of the DER SubjectPublicKeyInfo, as "SHA256:" + 16 groups of 4 lower-case
    hex digits joined by ":" (e.g. "SHA256:3f2a:09bc:...", 87 chars). Accepts a private key,
    a public key, or PEM text/bytes; all give the same result for the same key pair."""
    key = public_key_or_pem
    if isinstance(key, (str, bytes)):
        key = public_key_from_pem(key)
    elif isinstance(key, RSAPrivateKey):
        key = key.public_key()
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(der).hexdigest()
    return "SHA256:" + ":".join(digest[i:i + 4] for i in range(0, 64, 4))


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


def seal(payload: dict, *, sender: str, recipient: str, sender_key: RSAPrivateKey,
         recipient_public_key: RSAPublicKey, msg_id: str | None = None,
         ts: int | None = None) -> dict:
    """Encrypt and sign ``payload`` (a JSON-serialisable dict) for ``recipient``.

    Plaintext: json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    encoded as UTF-8 (strings with lone surrogates are rejected with ValueError).

    Crypto, per message:
      * fresh 32-byte AES key K and 12-byte nonce N;
      * ciphertext = AES-256-GCM(K, N, plaintext, aad=H), 16-byte tag appended, where
        H = b"dm-header-v1" || lp(from) || lp(to) || lp(msg_id) || lp(ts);
      * wrapped_key = RSA-OAEP(recipient public key, K), MGF1-SHA256, SHA-256, no label;
      * signature = RSA-PSS(sender key, S), MGF1-SHA256, salt 32, SHA-256, where
        S = b"dm-envelope-v1" || lp(from) || lp(to) || lp(msg_id) || lp(ts)
            || lp(wrapped_key) || lp(nonce) || lp(ciphertext).
    lp(x) = 4-byte big-endian length of x, then x. Text fields are UTF-8; ts is its ASCII
    decimal form (e.g. b"1700000000"); binary fields are the raw bytes, not the base64.
    msg_id defaults to 32 random hex chars; ts to int(time.time()).
    """
    if not isinstance(payload, dict):
        raise TypeError("payload must be a dict")
    msg_id = secrets.token_hex(16) if msg_id is None else msg_id
    ts = int(time.time()) if ts is None else ts
    header = _header_fields(sender, recipient, msg_id, ts)
    plaintext = json.dumps(payload, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False).encode("utf-8")
    aes_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(NONCE_SIZE)
    ciphertext = AESGCM(aes_key).encrypt(nonce, plaintext, _length_prefixed(HEADER_TAG, header))
    wrapped_key = recipient_public_key.encrypt(aes_key, _OAEP)
    signature = sign(sender_key, _length_prefixed(
        SIGNATURE_TAG, header + [wrapped_key, nonce, ciphertext]))
    return {"from": sender, "to": recipient, "msg_id": msg_id, "ts": ts,
            "wrapped_key": _b64(wrapped_key), "nonce": _b64(nonce),
            "ciphertext": _b64(ciphertext), "signature": _b64(signature)}


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


def _reject_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")


def open_envelope(envelope: dict, *, recipient: str, recipient_key: RSAPrivateKey,
                  sender_public_key: RSAPublicKey,
                  replay_guard: "ReplayGuard | None" = None) -> dict:
    """Verify, replay-check and decrypt an envelope made by ``seal``; return the payload dict.

    The caller picks ``sender_public_key`` for envelope["from"]. Order matters: the signature
    is checked before anything is decrypted (so unauthenticated data never reaches RSA
    decryption) and before the replay guard records the id (so forgeries cannot burn ids).
    Any problem with the envelope's content raises an EnvelopeError subclass, nothing else.
    """
    if not isinstance(envelope, dict):
        raise MalformedEnvelope("envelope is not a JSON object")
    try:
        header = _header_fields(envelope.get("from"), envelope.get("to"),
                                envelope.get("msg_id"), envelope.get("ts"))
    except ValueError as e:
        raise MalformedEnvelope(str(e)) from None
    wrapped_key, nonce, ciphertext, signature = (
        _b64_field(envelope, n) for n in ("wrapped_key", "nonce", "ciphertext", "signature"))
    if len(nonce) != NONCE_SIZE:
        raise MalformedEnvelope(f"'nonce' must be {NONCE_SIZE} bytes")
    if envelope["to"] != recipient:
        raise MalformedEnvelope("envelope is addressed to someone else")

    signed = _length_prefixed(SIGNATURE_TAG, header + [wrapped_key, nonce, ciphertext])
    if not verify(sender_public_key, signature, signed):
        raise BadSignature("signature does not match the sender's key")
    if replay_guard is not None:
        replay_guard.check_and_record(envelope["from"], envelope["msg_id"], envelope["ts"])

    try:
        aes_key = recipient_key.decrypt(wrapped_key, _OAEP)
        if len(aes_key) != 32:
            raise ValueError("wrapped key is not an AES-256 key")
        plaintext = AESGCM(aes_key).decrypt(nonce, ciphertext,
                                            _length_prefixed(HEADER_TAG, header))
    except (ValueError, InvalidTag):
        raise DecryptionFailed("could not decrypt message (not for this key, or corrupted)") from None
    try:
        payload = json.loads(plaintext.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise MalformedEnvelope("payload is not valid JSON") from None
    if not isinstance(payload, dict):
        raise MalformedEnvelope("payload is not a JSON object")
    return payload


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
