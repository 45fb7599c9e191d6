"""Sending: one path for a message to a peer and for a channel's copies. Each copy
is paid for (one bounty each), sealed to its recipient, framed as a `send`, and
tracked until the node answers it with a receipt or a refusal.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

from dm import crypto, wire
from dm.chain import ethereum
from dm.client.errors import ClientError
from dm.client.outbox import Queued

# What fits in one frame once encrypted: base64 adds a third, plus the envelope's fields.
MAX_TEXT_BYTES = (wire.MAX_FRAME - 16_384) * 3 // 4


def check_length(text: str) -> None:
    """Refuse a message too long for one frame before anything is paid for it."""
    size = len(json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise ClientError(f"that message is {size:,} bytes once encoded; the limit is {MAX_TEXT_BYTES:,} bytes "
                          "(about 6 MB): send it in parts")


@dataclass
class Outstanding:
    to: str
    sent_at: float = field(default_factory=time.monotonic)


class Unanswered:
    """Sent messages the node has not answered yet (by receipt or refusal), by msg_id.

    Thread-safety: the condition `changed` guards `by_msg_id`. Senders add under it;
    the client's worker settles under it and wakes whoever waits.
    """

    def __init__(self):
        self.by_msg_id: dict[str, Outstanding] = {}
        self.changed = threading.Condition()

    def settle(self, msg_id: str) -> bool:
        """Forgets an answered message; False if it was not ours or was already answered."""
        with self.changed:
            if self.by_msg_id.pop(msg_id, None) is None:
                return False
            self.changed.notify_all()
            return True

    def track(self, entries) -> None:
        """Messages sent again (after a reconnect, or when their peer came online) wait for an answer."""
        with self.changed:
            for entry in entries:
                self.by_msg_id[entry.msg_id] = Outstanding(entry.to)

    def wake(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def wait_until_empty(self, timeout: float | None, stopped: threading.Event) -> bool:
        """Until every message is answered, `stopped` is set, or `timeout` passes; True if none is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.changed:
            while self.by_msg_id and not stopped.is_set():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self.changed.wait(remaining if remaining is not None else 1)
            return not self.by_msg_id


class Sender:
    """Pays, seals and frames outgoing messages.

    Thread-safety: any thread may call prepare(); the payer, the session keys and
    `unanswered` each take their own lock. `last_bounty` is the last bounty of
    whichever batch was prepared last.
    """

    def __init__(self, me: str, rsa_key, payer, unanswered: Unanswered):
        self.me, self.rsa_key, self.payer, self.unanswered = me, rsa_key, payer, unanswered
        self.session_keys = crypto.SessionKeys()  # one RSA wrap per peer per 1,000 messages
        self.last_bounty: dict | None = None

    def prepare(self, copies: list[tuple[str, object, str]], channel: str | None = None) -> list[Queued]:
        """One paid `send` per (recipient, recipient's public key, text), in order, each tracked
        as unanswered. Returns them as outbox entries, each with its frame to write. One RSA
        signature covers the whole batch (crypto.seal_many), so piped input is not bound by RSA."""
        if not copies:
            return []
        try:
            bounties = self.payer.next_bounties(len(copies))
        except ethereum.ChainError as exc:
            raise ClientError(f"paying the {'bounties' if channel else 'bounty'} failed: {exc}") from None
        label = {"channel": channel} if channel else {}
        envelopes = crypto.seal_many(  # the code travels in each envelope's code slot
            [({"text": text, **label}, name, key, None, bounty.code)
             for (name, key, text), bounty in zip(copies, bounties)],
            sender=self.me, sender_key=self.rsa_key, session_keys=self.session_keys)
        entries = []
        with self.unanswered.changed:
            for (name, _, text), bounty, envelope in zip(copies, bounties, envelopes):
                self.unanswered.by_msg_id[envelope["msg_id"]] = Outstanding(name)
                # Canonical key order (type, to, msg_id, bounty, [channel,] envelope): the node's fast path.
                frame = wire.encode({"type": "send", "to": name, "msg_id": envelope["msg_id"],
                                     "bounty": bounty.wire, **label, "envelope": envelope})
                entries.append(Queued(envelope["msg_id"], name, text, frame, channel))
        self.last_bounty = bounties[-1].wire
        return entries
