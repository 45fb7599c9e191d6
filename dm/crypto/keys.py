"""RSA keys, key files and fingerprints. Pure functions: no sockets, no chain."""

import functools
import hashlib
import os

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey


class KeyFileError(Exception):
    """A key file (or PEM text) is missing, unreadable, not an RSA key, or already exists."""


class WeakKeyError(ValueError):
    """An RSA public key outside what the node and the client accept (check_key_strength)."""


# The only keys the node and the client accept: RSA of MIN_KEY_BITS to MAX_KEY_BITS bits with
# the public exponent PUBLIC_EXPONENT. Smaller moduli can be factored; larger ones or other
# exponents only make each verification (and the node's work per hello) slower.
MIN_KEY_BITS = 2048
MAX_KEY_BITS = 4096
PUBLIC_EXPONENT = 65537
DEFAULT_KEY_BITS = 3072  # what `main.py Y NAME` makes


def check_key_strength(public_key) -> RSAPublicKey:
    """The RSA public key (a public or private key, or PEM text) if its modulus has
    MIN_KEY_BITS..MAX_KEY_BITS bits and its exponent is PUBLIC_EXPONENT; WeakKeyError
    (saying what is wrong) otherwise. KeyFileError if PEM text does not parse."""
    if isinstance(public_key, (str, bytes)):
        public_key = public_key_from_pem(public_key)
    elif isinstance(public_key, RSAPrivateKey):
        public_key = public_key.public_key()
    if not isinstance(public_key, RSAPublicKey):
        raise WeakKeyError(f"not an RSA public key: {type(public_key).__name__}")
    bits, exponent = public_key.key_size, public_key.public_numbers().e
    if not MIN_KEY_BITS <= bits <= MAX_KEY_BITS:
        raise WeakKeyError(f"the RSA key has {bits:,} bits; only {MIN_KEY_BITS:,} to {MAX_KEY_BITS:,} "
                           "bits are accepted")
    if exponent != PUBLIC_EXPONENT:
        shown = f"{exponent:,}" if exponent.bit_length() <= 64 else f"a {exponent.bit_length():,}-bit number"
        raise WeakKeyError(f"the RSA key's public exponent is {shown}; only {PUBLIC_EXPONENT} is accepted")
    return public_key


# ---------------------------------------------------------------- keys and files

def generate_private_key(bits: int = DEFAULT_KEY_BITS) -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=bits)


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
