"""The one rule set for a `send`, whichever reader (dm.wire.send) read it.

The checks, in this order (docs/PROTOCOL.md lists the same order):
  1. the recipient is a known (pinned) user                 -> unknown_peer
     (--cluster: asked of the network; no answer             -> unavailable)
  2. for a channel message, sender and recipient are members -> not_a_member
  3. the bounty is open, bound to this node, not about to
     expire, and (a book) announced with the leaf in range;
     and it was paid for by the sender's own account         -> unpaid
  4. the `deliver` fits in one frame                         -> frame_too_large
  5. the recipient is online                                 -> receipt "offline" (not an error)
  6. neither the sender nor the recipient already has
     --max-unclaimed deliveries waiting for their code        -> unclaimed_limit
The reservation of the bounty and the msg_id (dm.relay.ledger) comes after these. Check 6
counts the burst's own deliveries too, so the burst loop (dm.relay.session) makes it, with the
ledger's counts, and raises unclaimed_limit() below. With --cluster, for a recipient on another
node, the sender's half is made here (a routed delivery counts from the moment it goes) and the
recipient's half by the recipient's node (dm.cluster.routing), whose answer the sender gets.
"""
from __future__ import annotations

from typing import Callable

from dm.chain import ethereum
from dm.relay.bounties import EXPIRY_MARGIN
from dm.wire import MAX_FRAME, ProtocolError
from dm.wire.send import SendHeader


def make_send_rule(pinned, channels, index, online: dict, resolve: Callable | None = None,
                   expiry_margin: float = EXPIRY_MARGIN) -> Callable:
    """rule_on_send bound to the node's parts: `pinned` (names with a pin, a live view),
    `channels` (a ChannelRegistry), `index` (a BountyIndex), `online` (name -> session).
    A bounty must have more than `expiry_margin` seconds left (dm.relay.bounties).
    `resolve` (with --cluster) fetches a pin made on another node into `pinned`; it is asked
    only for a name not pinned here, so a known recipient costs nothing more."""
    members_of, online_get = channels.members.get, online.get
    books_get, announced_book, single_payer = index.books_by_hex.get, index.announced_book, index.single_payer

    def rule_on_send(header: SendHeader, sender: str, sender_address: str, deliver_size: int, chain_now: float):
        """The recipient's session when the message may go, None when the recipient is offline;
        raises ProtocolError (with the msg_id as ref) when it may not. `sender_address` is the
        Ethereum account the sender's name is pinned with."""
        to, msg_id, paid_by, channel = header
        if to not in pinned and (resolve is None or not resolve(to, msg_id)):
            raise ProtocolError("unknown_peer", f"no user {to[:40]!r} is known to this node", ref=msg_id)
        if channel is not None:
            members = members_of(channel.lower())  # channel names are case-insensitive
            if members is None or sender not in members or to not in members:
                raise ProtocolError("not_a_member", f"both sender and recipient must be in {channel}", ref=msg_id)
        try:
            if paid_by[0] == "book":  # announced, the leaf in range, not about to expire
                book = books_get(paid_by[1])
                if book is None or book.sender != sender_address:  # books are keyed by (sender, root)
                    book = announced_book(paid_by[1], sender_address) or book
                payable = book is not None and paid_by[2] < book.size and book.expiry > chain_now + expiry_margin
                payer = book.sender if payable else None
            else:
                payer = single_payer(sender_address, bytes.fromhex(paid_by[1]), chain_now, expiry_margin)
        except (ethereum.ChainError, OSError) as exc:
            raise ProtocolError("unpaid", f"could not check the bounty: {exc}", ref=msg_id) from None
        if payer is None:
            raise ProtocolError("unpaid", "no open bounty bound to this node backs this message "
                                "(unknown, spent, expired, or for another node)", ref=msg_id)
        if payer != sender_address:  # a bounty pays only for its own sender's messages
            raise ProtocolError("unpaid", f"that bounty was paid for by {payer}, not by {sender}'s account "
                                f"{sender_address}: pay with your own book", ref=msg_id)
        if deliver_size > MAX_FRAME:
            raise ProtocolError("frame_too_large", f"the relayed message would be {deliver_size} bytes; "
                                f"frames are limited to {MAX_FRAME}", ref=msg_id)
        recipient = online_get(to)
        return None if recipient is None or recipient.transport.closed else recipient

    return rule_on_send


def unclaimed_limit(ledger, delivery: tuple) -> ProtocolError:
    """Check 6's refusal: `delivery` (dm.relay.ledger.Delivery) would put its sender or its
    recipient past ledger.max_unclaimed deliveries waiting for their code."""
    msg_id, sender, recipient = delivery[0], delivery[1], delivery[2]
    cap = ledger.max_unclaimed
    if ledger.received_waiting.get(recipient, 0) >= cap > ledger.sent_waiting.get(sender, 0):
        who = f"{recipient} has {cap} messages"
    else:
        who = f"you have {cap} sent messages"
    return ProtocolError("unclaimed_limit", f"{who} waiting for their codes (the node's --max-unclaimed): send "
                         "again once codes come back, or after the claim timeout", ref=msg_id)
