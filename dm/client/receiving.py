"""Receiving, in two steps because of the node's key-release layer (docs/PROTOCOL.md §4):

1. `deliver`: verify the sender's signature (it covers the code slot and the digest of the
   end-to-end ciphertext, which the node's layer still hides), check for replay, read the code
   from its slot and return it in a `claim`. That code is what pays the node.
2. `release`: the node's key for that message opens its layer; the ciphertext under it must be
   the one the sender signed; decrypt, check the channel label, show the text.

A node that took the code but sends no key within `release_timeout` is reported (overdue()).
A claim whose key has not come is sent again on the next connection (reclaims()): the node
answers a repeated claim with the same key and is not paid twice. The claims waiting here are
also kept on disk (dm.client.awaiting), so a client restarted before their keys came claims
them again (restore()).
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Callable

from dm import crypto
from dm.client.awaiting import AwaitingLog
from dm.client.connection import RELEASE_TIMEOUT
from dm.client.errors import ClientError
from dm.client.scroll import text_lines, visible

MAX_AWAITING = 100_000  # claims waiting for their key; the oldest are dropped past this


@dataclass
class Incoming:
    sender: str
    text: str
    msg_id: str
    genuine: bool
    problem: str = ""  # why it is not genuine
    channel: str | None = None

    def line(self) -> str:
        """How a message is shown on piped stdout: [sender] text, or [#channel sender] text. Each
        line of a multi-line text gets the prefix again, and control characters are made visible,
        so that every output line starts with its authenticated sender."""
        prefix = f"[{visible(self.channel)} {visible(self.sender)}]" if self.channel else f"[{visible(self.sender)}]"
        return "\n".join(f"{prefix} {line}" for line in text_lines(self.text))


@dataclass
class Awaiting:
    """A message whose code went back to the node, waiting for the node's key."""
    opened: crypto.Opened
    sealed: str  # the relayed envelope's ciphertext, under the node's layer
    channel: str | None
    claimed_at: float
    reported: bool = False


class Receiver:
    """Opens what the node delivers and releases.

    Thread-safety: meant for the client's worker thread alone (deliver, release, overdue,
    reclaims, refused and restore are called only there), and so is its `store`; the replay
    guard and the unwrap cache it owns are thread-safe anyway.
    """

    def __init__(self, me: str, rsa_key, peer_key: Callable[[str], object],
                 release_timeout: float = RELEASE_TIMEOUT, clock=time.monotonic, store: AwaitingLog | None = None):
        """`peer_key(name)` returns the sender's pinned public key, or raises ClientError.
        `store` keeps the claims waiting for their key on disk (None: in memory only)."""
        self.me, self.rsa_key, self.peer_key = me, rsa_key, peer_key
        self.release_timeout, self.clock, self.store = release_timeout, clock, store
        self._stored = store.load() if store is not None else []  # for restore(), once connected
        self.replay_guard = crypto.ReplayGuard()
        self.unwrap_cache = crypto.UnwrapCache()  # one RSA unwrap per sender's session key
        self.awaiting: collections.OrderedDict[str, Awaiting] = collections.OrderedDict()  # msg_id -> claim, oldest first

    def deliver(self, message: dict, stored: bool = False) -> tuple[Incoming | None, dict | None]:
        """For a `deliver`: (what to show now, the `claim` to send back). A genuine message
        shows nothing yet (its text waits for the node's key); one that is not genuine is
        shown as such and its code is not returned. `stored`: it comes from the store already."""
        sender, msg_id, envelope = message["from"], message["msg_id"], message["envelope"]
        channel = message.get("channel")
        try:
            sender_key = self.peer_key(sender)
            if envelope.get("from") != sender:
                raise crypto.MalformedEnvelope("the envelope's sender is not the one the node authenticated")
            if envelope.get("msg_id") != msg_id:
                raise crypto.MalformedEnvelope("the envelope's id differs from the one the node relayed")
            if not isinstance(envelope.get("ciphertext"), str):
                raise crypto.MalformedEnvelope("the envelope has no ciphertext")
            opened = crypto.open_slot(envelope, recipient=self.me, recipient_key=self.rsa_key,
                                      sender_public_key=sender_key, replay_guard=self.replay_guard,
                                      unwrap_cache=self.unwrap_cache)
        except (crypto.EnvelopeError, ClientError) as exc:
            return Incoming(sender, "", msg_id, False, getattr(exc, "reason", None) or str(exc), channel), None
        self.awaiting[msg_id] = Awaiting(opened, envelope["ciphertext"], channel, self.clock())
        if self.store is not None and not stored:
            self.store.add(message)  # before the claim goes: the code pays for it
        while len(self.awaiting) > MAX_AWAITING:
            self._forget(self.awaiting.popitem(last=False)[0])
        return None, {"type": "claim", "msg_id": msg_id, "code": opened.code.hex()}

    def restore(self) -> int:
        """The claims an earlier run made whose key never came wait again (reclaims() sends them
        on the connection); one that no longer opens (its sender's key changed) is forgotten.
        Returns how many wait."""
        stored, self._stored = self._stored, []
        for message in stored:
            if message.get("msg_id") in self.awaiting:
                continue
            try:
                _, claim = self.deliver(message, stored=True)
            except (KeyError, TypeError, AttributeError):  # a record damaged on disk
                claim = None
            if claim is None:
                self._forget(message.get("msg_id"))
        return len(self.awaiting)

    def _forget(self, msg_id: str) -> None:
        if self.store is not None:
            self.store.done(msg_id)

    def close(self) -> None:
        """The store, compacted (from any thread: the store takes its own lock)."""
        if self.store is not None:
            self.store.close()

    def release(self, message: dict) -> Incoming | None:
        """For a `release`: the message it opens (None for a key we did not wait for)."""
        waiting = self.awaiting.pop(message["msg_id"], None)
        if waiting is None:
            return None
        self._forget(message["msg_id"])
        opened, channel = waiting.opened, waiting.channel
        try:
            key = bytes.fromhex(message["key"])
            payload = crypto.open_ciphertext(opened, crypto.open_node_layer(key, waiting.sealed))
        except (ValueError, crypto.WrongRelease, crypto.BadSignature):
            return Incoming(opened.sender, "", opened.msg_id, False, "the node took the code but its key does not "
                            "open the message: it was paid for a message you cannot read", channel)
        except crypto.EnvelopeError as exc:
            return Incoming(opened.sender, "", opened.msg_id, False, exc.reason, channel)
        text = payload.get("text")
        if not isinstance(text, str):
            return Incoming(opened.sender, "", opened.msg_id, False, "the message has no text", channel)
        if payload.get("channel") != channel:  # the label is signed inside; the node cannot move a message
            return Incoming(opened.sender, "", opened.msg_id, False, "the message was relabelled to another channel",
                            channel)
        return Incoming(opened.sender, text, opened.msg_id, True, channel=channel)

    def reclaims(self) -> list[dict]:
        """The claims to send again on a new connection: every message whose key has not come
        (lost with the old connection, or overdue). Their release clock starts again."""
        now, claims = self.clock(), []
        for msg_id, waiting in self.awaiting.items():  # all get the same time: still oldest first
            waiting.claimed_at = now
            claims.append({"type": "claim", "msg_id": msg_id, "code": waiting.opened.code.hex()})
        return claims

    def refused(self, msg_id: str, reason: str) -> str | None:
        """The node refused our claim: that message cannot be read. A notice for the user, or
        None for a claim we were not waiting on."""
        waiting = self.awaiting.pop(msg_id, None)
        if waiting is None:
            return None
        self._forget(msg_id)
        sender = waiting.opened.sender
        return f"{sender}'s message {msg_id} cannot be read: the node refused its code ({reason}). " \
               f"Ask {sender} to send it again."

    def overdue(self) -> list[str]:
        """A notice for each claim whose key is now overdue, once per claim."""
        notices, deadline = [], self.clock() - self.release_timeout
        for msg_id, waiting in self.awaiting.items():
            if waiting.claimed_at > deadline:
                break  # oldest first: the rest are younger
            if not waiting.reported:
                waiting.reported = True
                notices.append(f"the node took the code for {waiting.opened.sender}'s message {msg_id} but sent no "
                               f"key within {self.release_timeout:g}s: it was paid for a message you cannot read. "
                               "If this goes on, use another node.")
        return notices
