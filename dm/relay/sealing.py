"""The node's key-release layer: no code, no reading (docs/PROTOCOL.md §4 `release`, §10).

Every relayed envelope's `ciphertext` (the only part that carries the text) goes out under
the node's own AEAD layer: ChaCha20-Poly1305 with a key fresh per message, so its nonce is
fixed (ChaCha20's key setup is cheaper than AES-GCM's, and a key is set up per message).
The key is derived, not stored: BLAKE2b keyed with the node's secret over the message's
identity (sender, msg_id, and the bounty that pays for it with its payer's account). The node
keeps nothing per message for it, and recomputes the key when the recipient's valid code comes
back in `claim`. A msg_id reused with another bounty (or the same hash under another account)
gets another key, and a bounty carries one message only (dm.relay.ledger), so no key and nonce
ever seal two texts. The node never sees the text: the ciphertext under its layer is the
sender's end-to-end one.
"""
from __future__ import annotations

import binascii
import hashlib
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from dm import datadir
from dm.crypto import NODE_LAYER_NONCE
from dm.wire import MAX_VISIBLE, ProtocolError

SECRET_FILE = "layer_secret"  # in DATA/node/, mode 0600
_PERSON = b"dm-node-layer-v1"


def load_secret(node_dir: Path) -> bytes:
    """The node's layer secret, made (32 random bytes, hex, mode 0600) the first time."""
    text = datadir.ensure_secret(node_dir / SECRET_FILE, lambda: secrets.token_hex(32))
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != 32:
        raise datadir.DataError(f"{node_dir / SECRET_FILE} must hold 64 hex digits; delete it to make a new one "
                                "(codes already returned stay paid, but unclaimed messages can no longer be read)")
    return secret


def identity(sender: str, msg_id: str, paid_by: tuple) -> bytes:
    """What a message's layer key is derived from; `paid_by` is the bounty and its payer
    (dm.relay.ledger.paying). Names hold no NUL and the bounty part none either, so the last
    NUL splits it unambiguously whatever the msg_id holds."""
    if paid_by[0] == "book":
        return f"{sender}\0{msg_id}\0b:{paid_by[1]}:{paid_by[2]}:{paid_by[3]}".encode()
    return f"{sender}\0{msg_id}\0s:{paid_by[1]}:{paid_by[2]}".encode()


class NodeLayer:
    """Seals ciphertexts for relaying and gives the key back for a claimed message.

    Thread-safety: immutable after construction (the secret); every method depends on its
    arguments only, so any connection thread calls it without a lock.
    """

    def __init__(self, secret: bytes, max_visible: int = MAX_VISIBLE):
        if len(secret) != 32:
            raise ValueError("the layer secret must be 32 bytes")
        self.max_visible = max_visible  # node.py --max-visible: checked by dm.wire.send's plans
        # Keyed once; each message's key starts from a copy (cheaper than keying BLAKE2b anew).
        self._keyed = hashlib.blake2b(key=secret, digest_size=32, person=_PERSON)

    def key(self, sender: str, msg_id: str, paid_by: tuple) -> bytes:
        """The layer key of one message (released to its recipient for the code). A msg_id that
        is not valid Unicode raises UnicodeEncodeError (the session refuses it as bad_frame)."""
        keyed = self._keyed.copy()
        keyed.update(identity(sender, msg_id, paid_by))
        return keyed.digest()

    def seal(self, sender: str, msg_id: str, paid_by: tuple, ciphertext: bytes,
             _a2b=binascii.a2b_base64, _b2a=binascii.b2a_base64, _aead=ChaCha20Poly1305, _nonce=NODE_LAYER_NONCE) -> bytes:
        """The seal of dm.wire.send.seal_deliver: this message's base64 ciphertext under its
        layer, base64 again. Refuses (bad_field) a ciphertext that is not strict base64. The
        hot path: key() is inlined."""
        try:
            raw = _a2b(ciphertext, strict_mode=True)
        except binascii.Error:
            raise ProtocolError("bad_field", "envelope.ciphertext must be standard base64", ref=msg_id) from None
        keyed = self._keyed.copy()
        keyed.update(f"{sender}\0{msg_id}\0b:{paid_by[1]}:{paid_by[2]}:{paid_by[3]}".encode() if paid_by[0] == "book"
                     else f"{sender}\0{msg_id}\0s:{paid_by[1]}:{paid_by[2]}".encode())
        return _b2a(_aead(keyed.digest()).encrypt(_nonce, raw, None), newline=False)
