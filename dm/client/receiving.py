"""Receiving: verify the sender, decrypt, check the channel label, and give back
the code, which is what pays the node for the delivery.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dm import crypto
from dm.client.errors import ClientError


@dataclass
class Incoming:
    sender: str
    text: str
    msg_id: str
    genuine: bool
    problem: str = ""  # why it is not genuine
    channel: str | None = None

    def line(self) -> str:
        """How a message is shown: [sender] text, or [#channel sender] text."""
        return f"[{self.channel} {self.sender}] {self.text}" if self.channel else f"[{self.sender}] {self.text}"


class Receiver:
    """Opens what the node delivers.

    Thread-safety: meant for the client's worker thread alone; the replay guard and
    the unwrap cache it owns are thread-safe anyway.
    """

    def __init__(self, me: str, rsa_key, peer_key: Callable[[str], object]):
        """`peer_key(name)` returns the sender's pinned public key, or raises ClientError."""
        self.me, self.rsa_key, self.peer_key = me, rsa_key, peer_key
        self.replay_guard = crypto.ReplayGuard()
        self.unwrap_cache = crypto.UnwrapCache()  # one RSA unwrap per sender's session key

    def deliver(self, message: dict) -> tuple[Incoming, dict | None]:
        """What to show for a `deliver`, and the `claim` to send back (None when the
        message is not genuine: its code is not returned)."""
        sender, msg_id, envelope = message["from"], message["msg_id"], message["envelope"]
        channel = message.get("channel")
        try:
            sender_key = self.peer_key(sender)
            if envelope.get("from") != sender:
                raise crypto.MalformedEnvelope("the envelope's sender is not the one the node authenticated")
            if envelope.get("msg_id") != msg_id:
                raise crypto.MalformedEnvelope("the envelope's id differs from the one the node relayed")
            payload = crypto.open_envelope(envelope, recipient=self.me, recipient_key=self.rsa_key,
                                           sender_public_key=sender_key, replay_guard=self.replay_guard,
                                           unwrap_cache=self.unwrap_cache)
        except (crypto.EnvelopeError, ClientError) as exc:
            return Incoming(sender, "", msg_id, False, getattr(exc, "reason", None) or str(exc)), None
        text, code = payload.get("text"), payload.get("code")
        if not isinstance(text, str) or not isinstance(code, str):
            return Incoming(sender, "", msg_id, False, "the message has no text or code"), None
        if payload.get("channel") != channel:  # the label is signed inside; the node cannot move a message
            return Incoming(sender, "", msg_id, False, "the message was relabelled to another channel", channel), None
        return Incoming(sender, text, msg_id, True, channel=channel), {"type": "claim", "msg_id": msg_id, "code": code}
