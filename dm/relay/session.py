"""One client's session, sans-IO: bytes in, frames out through a transport; time passed in.

Once a session is ready, a canonical `send` is read by the fast reader (dm.wire.send);
every other frame goes through `_handle`, the one place that enforces message order
(dm.wire.check_client_message and its PHASES table). Either way a send then takes the one
relay step in `_handle_burst`: the rule set (dm.relay.rules), the ledger's reservation, the
deliver. Every refusal leaves through ProtocolError -> an `error` frame.
The node never decrypts: it routes on `to` and passes the envelope on untouched.
"""
from __future__ import annotations

import base64
import logging
import secrets

from eth_utils import keccak
from web3 import Web3

from dm import crypto, datadir, wire
from dm.relay.connection import burst
from dm.relay.redeemer import Claim
from dm.wire import ProtocolError
from dm.wire.send import SEND_PREFIX, deliver_prefix, encode_deliver, read_send, send_header

log = logging.getLogger("node")

_FRAME_LENGTH = wire.HEADER.pack
_RECEIPT_HEAD = b'{"type":"receipt","msg_id":"'
_RECEIPT_DELIVERED = b'","status":"delivered"}'
_RECEIPT_FIXED = len(_RECEIPT_HEAD) + len(_RECEIPT_DELIVERED)
_SEND_PREFIX_LENGTH = len(SEND_PREFIX)
_BACKSLASH = 92


def _confusable(name: str, look_alike: str) -> ProtocolError:
    return ProtocolError("name_confusable", f"the name {name!r} looks like {look_alike!r}, already pinned on this "
                         "node: choose a clearly different name", fatal=True)


def receipt(msg_id: str, status: str) -> bytes:
    return wire.encode({"type": "receipt", "msg_id": msg_id, "status": status})


class Session:
    """Phases, the handshake and dispatch for one connection.

    `node` is the hub (dm.relay.node.Node): pins, ledger, channels, bounty index, redeemer and
    the directory of online sessions. `transport` is the connection's writer
    (dm.relay.connection.Connection): send(), send_bytes(), queue(), close(), `closed`.

    Thread-safety: a session is owned by its connection thread; only that thread calls
    receive(). Other threads touch it only through its transport (which has its own lock)
    and read `name`; the watchdog reads the timing fields through timeout_reason().
    """

    def __init__(self, node, transport, now: float):
        self.node = node
        self.transport = transport
        self.decoder = wire.FrameDecoder()
        self.phase = "connected"
        self.name: str | None = None
        self.eth_address = ""  # the account the name is pinned with, once proved
        self.hello: dict | None = None
        self.nonce = ""
        self.proved = False
        self.connected_at = self.last_frame_at = now
        self.frame_started_at: float | None = None
        self.errors = 0  # refusals in a row
        self.relayed = 0  # messages this session sent that reached their recipient
        self._deliver_prefix = b""
        # A burst's deliveries, held until the burst ends or something else must be written
        # first: recipient session -> [frame parts]; the deliveries and receipts in send order.
        self._held: dict = {}
        self._held_deliveries: list[tuple] = []
        self._held_receipts: list[bytes] = []
        self._req: int | None = None  # the request id of the message being handled
        self._plain_buffer = True  # the decoder holds no byte that is non-ASCII or a backslash
        self._frame_clock_waits = False  # an unfinished frame's clock restarts once the read is answered

    @property
    def label(self) -> str:
        return self.name or self.transport.label

    # --- bytes in -----------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> None:
        """Bytes from the client; everything they cause is written once per destination."""
        # One check per read instead of one per frame: frames made only of plain bytes (ASCII,
        # no backslash) spare the fast reader its own check.
        plain = self._plain_buffer and _BACKSLASH not in data and data.isascii()
        try:
            payloads = self.decoder.feed(data)
        except ProtocolError as exc:
            self.transport.send(exc.to_message())
            self.transport.close()
            return
        self._plain_buffer = plain or not self.decoder.mid_frame
        if payloads:
            self.last_frame_at = now
        if not self.decoder.mid_frame:
            self.frame_started_at = None
        elif payloads:  # a frame started behind complete ones: its clock starts once they are answered
            self.frame_started_at, self._frame_clock_waits = None, True
        elif self.frame_started_at is None:  # a frame started in this read
            self.frame_started_at = now
        if payloads:
            self._handle_burst(payloads, now, plain)

    def answered(self, now: float) -> None:
        """The node has answered every complete frame of the last read, at `now`. A frame left
        unfinished behind them is the client's to finish from here: the time the node spends
        answering never counts against the client's frame timeout."""
        if self._frame_clock_waits and self.decoder.mid_frame:
            self.frame_started_at = now
        self._frame_clock_waits = False

    def timeout_reason(self, now: float, handshake_timeout: float, frame_timeout: float,
                       idle_timeout: float) -> str | None:
        if self.phase != "ready" and not self.proved and now - self.connected_at > handshake_timeout:
            return f"no authentication within {handshake_timeout:g}s"
        if self.frame_started_at is not None and now - self.frame_started_at > frame_timeout:
            return f"a frame took longer than {frame_timeout:g}s to arrive"
        if now - self.last_frame_at > idle_timeout:
            return f"idle for {idle_timeout:g}s"
        return None

    def _handle_burst(self, payloads: list[bytes], now: float, plain: bool) -> None:
        burst.outbox = outbox = set()
        node, transport = self.node, self.transport
        chain_now = node.index.clock()  # one clock read per burst for bounty expiry
        rule, reserve = node.send_rule, node.ledger.reserve
        held, in_order, receipts = self._held, self._held_deliveries, self._held_receipts
        try:
            for payload in payloads:
                if transport.closed:
                    break
                try:
                    header = read_send(payload, plain) if self.phase == "ready" else None
                    if header is not None:  # splice_deliver, inline: this is the per-message loop
                        body, plain_id = self._deliver_prefix + payload[_SEND_PREFIX_LENGTH:], True
                    else:
                        send = self._handle(payload)
                        if send is None:
                            self.errors = 0
                            continue
                        (header, body), plain_id = send, False
                    # One relay step for a send, whichever reader read it: the rule set, the
                    # ledger's reservation, then the deliver and receipt held until the burst ends.
                    recipient = rule(header, self.name, self.eth_address, len(body), chain_now)
                    msg_id = header[1]
                    if recipient is None:
                        self._write_held(outbox)
                        if node.cluster is not None and header[0] not in node.online:
                            # Not connected here: another node of the network may have them;
                            # the receipt follows that node's answer (dm.cluster.routing).
                            delivery = (msg_id, self.name, header[0], header[2], now)
                            reserve(delivery)
                            node.cluster.route(transport, delivery, body)
                        else:
                            transport.send_bytes(receipt(msg_id, "offline"))
                    else:
                        delivery = (msg_id, self.name, header[0], header[2], now)
                        reserve(delivery)
                        frames = held.get(recipient)
                        if frames is None:
                            held[recipient] = frames = []
                        frames += (_FRAME_LENGTH(len(body)), body)
                        in_order.append(delivery)
                        if plain_id:  # the fast reader's msg ids need no escaping: a receipt from a template
                            encoded = msg_id.encode()
                            receipts += (_FRAME_LENGTH(_RECEIPT_FIXED + len(encoded)), _RECEIPT_HEAD, encoded,
                                         _RECEIPT_DELIVERED)
                        else:
                            receipts.append(receipt(msg_id, "delivered"))
                    self.errors = 0
                except ProtocolError as exc:
                    self._refuse(exc)
        except Exception:  # a bug must cost one connection, never the node
            log.exception("internal error handling a message from %s", self.label)
            self._release_held()
            transport.send(wire.error("internal"))
            transport.close()
        finally:
            self._write_held(outbox)
            burst.outbox = None
            node.redeemer.journal.sync()  # one fsync for every claim of the burst, before anything else
            for target in outbox:
                target.flush()

    def _refuse(self, exc: ProtocolError) -> None:
        self._write_held(burst.outbox)
        self.errors += 1
        refusal = exc.to_message()
        if exc.req is not None:
            refusal["req"] = exc.req
        try:
            self.transport.send(refusal)
        except (ProtocolError, ValueError):  # an unencodable ref: answer without it
            self.transport.send(wire.error(exc.code, exc.message))
        if exc.fatal or self.errors >= self.node.max_errors:
            self.transport.close()

    # --- the general path: parse, check, dispatch ------------------------------------

    def _handle(self, payload: bytes) -> tuple | None:
        """A frame the fast reader did not take. Returns (header, deliver body) for a send,
        for the burst loop to relay; answers anything else itself."""
        message = wire.parse(payload)
        self._req = req = wire.request_id(message)
        try:
            wire.check_client_message(message, self.phase)
            kind = message["type"]
            if kind == "send":
                header = send_header(message)
                try:
                    return header, encode_deliver(self.name, message)
                except ValueError:  # text that cannot be UTF-8 (a lone surrogate)
                    raise ProtocolError("bad_frame", "the message is not valid text", ref=header.msg_id) from None
            self._write_held(burst.outbox)  # whatever this answers goes after the burst so far
            reply = getattr(self, "on_" + kind)(message)
        except ProtocolError as exc:
            exc.req = req
            raise
        if reply is not None:
            self._reply(reply)
        return None

    def _reply(self, reply: dict) -> None:
        """Answer the request being handled, echoing its `req` id."""
        if self._req is not None:
            reply["req"] = self._req
        self.transport.send(reply)

    # --- what a burst holds back ------------------------------------------------------

    def _write_held(self, outbox: set | None) -> None:
        """Hand the held deliveries to their recipients and the receipts to the sender."""
        if not self._held:
            return
        held, in_order, receipts = self._held, self._held_deliveries, self._held_receipts
        gone = {recipient.name for recipient, frames in held.items() if not recipient.transport.queue(frames, outbox)}
        ledger = self.node.ledger
        try:
            if not gone:
                ledger.delivered(in_order)
                self.relayed += len(in_order)
                self.transport.queue(receipts, outbox)
            else:
                self._write_lost(gone, outbox)
        finally:  # cleared in place: the burst loop holds these lists
            held.clear()
            in_order.clear()
            receipts.clear()

    def _write_lost(self, gone: set, outbox: set | None) -> None:
        """Rare: a recipient hung up since we looked. Nothing was delivered to it: release those
        reservations and rebuild the receipts, in order, with those marked offline."""
        ledger, in_order = self.node.ledger, self._held_deliveries
        for delivery in in_order:
            if delivery[2] in gone:
                ledger.release(delivery)
        delivered = [d for d in in_order if d[2] not in gone]
        ledger.delivered(delivered)
        self.relayed += len(delivered)
        self.transport.queue([receipt(d[0], "offline" if d[2] in gone else "delivered") for d in in_order], outbox)

    def _release_held(self) -> None:
        for delivery in self._held_deliveries:
            self.node.ledger.release(delivery)
        self._held.clear()
        self._held_deliveries.clear()
        self._held_receipts.clear()

    # --- the handshake -----------------------------------------------------------------

    def on_ping(self, message: dict) -> dict:
        return {"type": "pong"}

    def on_hello(self, message: dict) -> dict:
        name = message["name"]
        try:
            datadir.check_name(name)
        except datadir.DataError:
            raise ProtocolError("invalid_name", fatal=True) from None
        try:
            public_key = crypto.public_key_from_pem(message["public_key"])
        except Exception:
            raise ProtocolError("bad_field", "hello.public_key is not an RSA public key in PEM form",
                                fatal=True) from None
        try:
            crypto.check_key_strength(public_key)
        except crypto.WeakKeyError as exc:
            log.warning("! refused %s from %s: %s", name, self.label, exc)
            raise ProtocolError("weak_key", f"{exc}: make new keys with `python3 main.py Y NAME`",
                                fatal=True) from None
        if not Web3.is_checksum_address(message["eth_address"]):
            raise ProtocolError("bad_field", "hello.eth_address must be a checksummed Ethereum address", fatal=True)
        pins = self.node.pins
        pinned = pins.get(name)
        if pinned and pinned["public_key"].strip() != message["public_key"].strip():
            log.warning("! refused %s from %s: a different key than the pinned one", name, self.label)
            raise ProtocolError("name_taken", f"the name {name!r} is pinned to another key on this node",
                                fatal=True)
        look_alike = pins.confusable_with(name)
        if look_alike is not None:
            log.warning("! refused %s from %s: it looks like the pinned name %s", name, self.label, look_alike)
            raise _confusable(name, look_alike)
        if self.node.cluster is not None:  # the network's pins, not only this node's
            self.node.cluster.check_name(name, message["public_key"])
        self.hello = message
        self.nonce = base64.b64encode(secrets.token_bytes(32)).decode()
        self.phase = "challenged"
        return {"type": "challenge", "nonce": self.nonce, "node_id": self.node.node_id}

    def on_auth(self, message: dict) -> dict:
        node, hello = self.node, self.hello
        name = hello["name"]
        data = wire.auth_payload(self.nonce, node.node_id, name, hello["public_key"], hello["eth_address"])
        try:
            signature = base64.b64decode(message["signature"], validate=True)
        except ValueError:
            signature = b""
        public_key = crypto.public_key_from_pem(hello["public_key"])
        if not crypto.verify(public_key, signature, data):
            log.warning("! failed proof for %s from %s", name, self.label)
            raise ProtocolError("auth_failed", fatal=True)
        self.proved = True  # the handshake clock stops: funding a new user may take a while
        if node.cluster is not None:  # pinned network-wide (create-only) before here
            node.cluster.claim_name(name, hello["public_key"], hello["eth_address"])
        outcome = node.pins.pin(name, hello["public_key"], hello["eth_address"])
        if outcome == "conflict":  # another key won the name between our hello and auth
            raise ProtocolError("name_taken", f"the name {name!r} is pinned to another key on this node", fatal=True)
        if outcome == "confusable":  # a look-alike name was pinned between our hello and auth
            raise _confusable(name, node.pins.confusable_with(name) or "?")
        if outcome == "new":
            log.info("pinned %s to key %s", name, crypto.fingerprint(public_key)[:27])
        if node.faucet is not None:
            if outcome == "same":  # a returning user: top up in the background, don't hold the handshake
                node.faucet.top_up_later(name, hello["eth_address"])
            else:  # a new account must be able to pay right after welcome
                node.faucet.fund_now(name, hello["eth_address"])
        self.name, self.eth_address = name, hello["eth_address"]
        self._deliver_prefix = deliver_prefix(name)
        self.phase = "ready"
        # The welcome goes out before any deliver can reach this session.
        self._reply({**node.welcome, "name": name})
        node.go_online(self)
        return None

    # --- requests ---------------------------------------------------------------------

    def on_lookup(self, message: dict) -> dict:
        pinned = self.node.pins.get(message["name"])
        if not pinned and self.node.cluster is not None:  # pinned on another node of the network
            pinned = self.node.cluster.resolve(message["name"])
        if not pinned:
            raise ProtocolError("unknown_peer", f"no user {message['name'][:40]!r} is known to this node",
                                ref=message["name"][:64])
        try:  # a pin made before keys were checked: never hand it out to be encrypted to
            crypto.check_key_strength(pinned["public_key"])
        except (crypto.WeakKeyError, crypto.KeyFileError) as exc:
            raise ProtocolError("weak_key", f"{message['name']} has a key this node no longer accepts ({exc}); "
                                "they must make new keys with `python3 main.py Y NAME`",
                                ref=message["name"][:64]) from None
        return {"type": "lookup", "name": message["name"], **pinned}

    def on_peers(self, message: dict) -> dict:
        return {"type": "peers", "names": self.node.online_names()}

    def on_book(self, message: dict) -> dict:
        try:
            root = bytes.fromhex(message["root"].removeprefix("0x"))
            leaves = [bytes.fromhex(leaf.removeprefix("0x")) for leaf in message["leaves"]]
            book = self.node.index.announce_book(root, leaves)
        except (ValueError, TypeError, AttributeError):
            raise ProtocolError("bad_field", "book.leaves do not make book.root") from None
        if book is None:
            raise ProtocolError("unpaid", "no open book with that root and size is bound to this node")
        return {"type": "book", "root": message["root"], "size": book.size}

    def on_claim(self, message: dict) -> None:
        node, msg_id = self.node, message["msg_id"]
        delivery = node.ledger.awaiting(msg_id, self.name)
        if delivery is None:
            raise ProtocolError("unknown_message", ref=msg_id)
        _, sender, _, paid_by, _ = delivery
        if paid_by[0] == "remote":  # relayed by another node: its code goes there (dm.cluster.claims)
            node.cluster.forward_claim(delivery, message["code"], self.transport)
            return None
        try:
            code = bytes.fromhex(message["code"].removeprefix("0x"))
        except ValueError:
            code = b""
        if paid_by[0] == "single":
            valid = len(code) == 32 and keccak(code).hex() == paid_by[1]
            claim = Claim(msg_id, sender, code)
        else:
            root = bytes.fromhex(paid_by[1])
            book = node.index.book(root)
            valid = len(code) == 32 and book is not None and book.tree is not None and \
                book.tree.check_code(paid_by[2], code)
            claim = Claim(msg_id, sender, code, root, paid_by[2])
        if not valid:
            raise ProtocolError("bad_code", ref=msg_id)
        if not node.ledger.settle(delivery):
            raise ProtocolError("unknown_message", ref=msg_id)
        node.redeemer.submit(claim, sync=False)  # fsynced at the end of this burst
        return None

    def on_join(self, message: dict) -> dict:
        channel = message["channel"]
        if self.node.cluster is not None:  # network-wide membership, mirrored into the registry
            self.node.cluster.change_membership(channel, self.name, True)
        self.node.channels.join(channel, self.name)
        log.info("%s joined %s", self.name, channel)
        return self.node.channel_reply(self.name, channel)

    def on_leave(self, message: dict) -> dict:
        channel = message["channel"]
        cluster = self.node.cluster
        left = cluster.change_membership(channel, self.name, False) if cluster is not None else \
            self.node.channels.leave(channel, self.name)
        if not left:
            raise ProtocolError("not_a_member", f"you are not in {channel}", ref=channel)
        log.info("%s left %s", self.name, channel)
        return self.node.channel_reply(self.name, channel)

    def on_channels(self, message: dict) -> dict:
        return self.node.channel_reply(self.name)

    def on_members(self, message: dict) -> dict:
        channel = message["channel"]
        members = self.node.channels.members.get(channel, frozenset())
        if self.name not in members:
            raise ProtocolError("not_a_member", f"join {channel} first", ref=channel)
        online = sorted(m for m in members if self.node.is_online(m))
        return {"type": "members", "channel": channel, "online": online, "offline": sorted(members - set(online))}
