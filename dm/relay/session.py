"""One client's session, sans-IO: bytes in, frames out through a transport; time passed in.

Once a session is ready, a canonical `send` is read by the fast reader (dm.wire.send);
every other frame goes through `_handle`, the one place that enforces message order
(dm.wire.check_client_message and its PHASES table). Either way a send then takes the one
relay step in `_handle_burst`: the rule set (dm.relay.rules), the ledger's reservation, the
deliver. Every refusal leaves through ProtocolError -> an `error` frame.
The node never decrypts: it routes on `to` and passes the envelope on with its ciphertext under
the node's own layer (dm.relay.sealing), whose key it releases for the message's code.
"""
from __future__ import annotations

import base64
import collections
import logging
import math
import secrets
import time

from dm.chain.books import keccak  # safe-pysha3: ~10x faster than eth_utils.keccak
from web3 import Web3

from dm import crypto, datadir, wire
from dm.relay.budget import address_key
from dm.relay.connection import burst
from dm.relay.ledger import AlreadyDelivered
from dm.relay.redeemer import Claim
from dm.relay.rules import unclaimed_limit
from dm.wire import ProtocolError
from dm.wire.send import deliver_prefix, plan_encode, plan_splice, read_send, seal_deliver, send_header

log = logging.getLogger("node")

_FRAME_LENGTH = wire.HEADER.pack
_RECEIPT_HEAD = b'{"type":"receipt","msg_id":"'
_RECEIPT_DELIVERED = b'","status":"delivered"}'
_RECEIPT_FIXED = len(_RECEIPT_HEAD) + len(_RECEIPT_DELIVERED)
_BACKSLASH = 92


def _confusable(name: str, look_alike: str) -> ProtocolError:
    return ProtocolError("name_confusable", f"the name {name!r} looks like {look_alike!r}, already pinned on this "
                         "node: choose a clearly different name", fatal=True)


def _pins_full(max_pins: int) -> ProtocolError:
    return ProtocolError("limit_reached", f"this node has pinned {max_pins} names, the most it holds (its "
                         "--max-pins), and takes no new ones; names already pinned here still log in: ask the "
                         "node's operator for room, or use another node", fatal=True)


# Hashing a 10,000-leaf book takes tens of ms; in stretches this short, a thread waiting for the
# interpreter lock (another connection's message) gets it within about a millisecond.
LEAVES_PER_PAUSE = 2000


def _let_others_run() -> None:
    time.sleep(0)  # releases the interpreter lock, so a waiting thread goes first


def _too_large(limit: int) -> ProtocolError:
    return ProtocolError("frame_too_large", f"only a send may be larger than {limit} bytes, and it must begin "
                         'with {"type":"send"')


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
        # frames over max_other_frame that are not sends are skipped unbuffered (wire.Oversized)
        self.decoder = wire.FrameDecoder(max_other=node.max_other_frame)
        self.phase = "connected"
        self.name: str | None = None
        self.eth_address = ""  # the account the name is pinned with, once proved
        self.hello: dict | None = None
        self.nonce = ""
        self.proved = False
        self.connected_at = self.last_frame_at = now
        self.frame_started_at: float | None = None
        self.errors = 0  # refusals this session
        # The times of the last max_errors refusals before a name is proved (after, the name's,
        # in node.budgets): that many within error_window closes the connection, whatever was
        # answered in between (a ping no longer wipes the slate).
        self._refusal_times: collections.deque[float] = collections.deque(maxlen=max(1, node.max_errors))
        self._now = now  # the time of the read being handled
        self.cpu_spent = 0.0  # CPU time of general-path frames not yet billed (dm.relay.budget)
        self._new = True  # no read yet: a new connection starts in its address's debt
        self._address = address_key(transport.address[0])  # what its CPU is billed to before a name
        self.relayed = 0  # messages this session sent that reached their recipient
        self._deliver_prefix = b""
        # A burst's deliveries, held until the burst ends or something else must be written
        # first: recipient session -> [frame parts]; the deliveries and receipts in send order.
        self._held: dict = {}
        self._held_deliveries: list[tuple] = []
        self._held_receipts: list[bytes] = []
        self._req: int | None = None  # the request id of the message being handled
        # The frame being handled is the first valid claim of a delivery: the code that pays the
        # node. Not billed to the CPU budgets: an honest recipient of a busy sender returns
        # hundreds of codes a second, and each is one paid message (a re-claim is billed).
        self._paying_claim = False
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
        self._now = now
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
        ledger = node.ledger
        rule, reserve, seal, max_unclaimed = node.send_rule, ledger.reserve, node.layer.seal, ledger.max_unclaimed
        max_visible = node.layer.max_visible
        sent_waiting, received_waiting = ledger.sent_waiting.get, ledger.received_waiting.get
        # how many more deliveries this sender may have waiting: the ledger's count, less this burst's
        sent_left = max_unclaimed - sent_waiting(self.name, 0)
        held, in_order, receipts = self._held, self._held_deliveries, self._held_receipts
        try:
            for payload in payloads:
                if transport.closed:
                    break
                try:
                    header = read_send(payload, plain) if self.phase == "ready" else None
                    if header is not None:
                        paid = header[2] + (self.eth_address,)  # the bounty and its payer (dm.relay.ledger.paying)
                        plan = plan_splice(self._deliver_prefix, payload, max_visible, header[1])
                        plain_id = True
                    else:
                        send = self._handle(payload)
                        if send is None:  # an auth, a claim, ...: the sender's count may have changed
                            sent_left = max_unclaimed - sent_waiting(self.name, 0) - len(in_order)
                            continue
                        (header, plan), plain_id = send, False
                        paid = header[2] + (self.eth_address,)
                    # One relay step for a send, whichever reader read it: the rule set, the
                    # ledger's reservation, then the deliver (sealed only now that it goes out)
                    # and the receipt, held until the burst ends.
                    recipient = rule(header, self.name, self.eth_address, plan[4], chain_now)
                    msg_id = header[1]
                    if recipient is None:
                        self._write_held(outbox)
                        if node.cluster is not None and header[0] not in node.online:
                            # Not connected here: another node of the network may have them;
                            # the receipt follows that node's answer (dm.cluster.routing), which
                            # checks the recipient's --max-unclaimed; the sender's is checked here.
                            delivery = (msg_id, self.name, header[0], paid, now)
                            if sent_left <= 0:
                                raise unclaimed_limit(ledger, delivery)
                            body = seal_deliver(plan, seal, self.name, msg_id, paid)
                            reserve(delivery)
                            ledger.count_sent(self.name, 1)  # waiting from now, until that node answers
                            sent_left -= 1
                            node.cluster.route(transport, delivery, body)
                        else:
                            transport.send_bytes(receipt(msg_id, "offline"))
                            node.presence.subscribe(self.name, [header[0]], strict=False)  # told when they come
                    else:
                        delivery = (msg_id, self.name, header[0], paid, now)
                        frames = held.get(recipient)
                        # at most max_unclaimed deliveries wait for their code, per sender and per
                        # recipient: the ledger's counts plus this burst's (sent_left, frames)
                        if sent_left <= 0 or \
                                received_waiting(header[0], 0) + (len(frames) >> 1 if frames else 0) >= max_unclaimed:
                            raise unclaimed_limit(ledger, delivery)
                        body = seal_deliver(plan, seal, self.name, msg_id, paid)
                        reserve(delivery)
                        sent_left -= 1
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
                except AlreadyDelivered:  # a client's resend after a reconnect: the original outcome again
                    self._write_held(outbox)
                    transport.send_bytes(receipt(msg_id, "delivered"))
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
        close = exc.fatal
        if exc.code == "unclaimed_limit":  # back-pressure on an honest burst, not a client's mistake
            pass
        elif self.name is not None:  # counted per name: a new connection starts where the last one ended
            close = self.node.budgets.refused(self.name, self._now) or close
        else:
            refusals = self._refusal_times
            refusals.append(self._now)
            close = close or (len(refusals) == refusals.maxlen and self._now - refusals[0] <= self.node.error_window)
        refusal = exc.to_message()
        if exc.req is not None:
            refusal["req"] = exc.req
        try:
            self.transport.send(refusal)
        except (ProtocolError, ValueError):  # an unencodable ref: answer without it
            self.transport.send(wire.error(exc.code, exc.message))
        if close:
            self.transport.close()

    # --- the general path: parse, check, dispatch ------------------------------------

    def pause_needed(self, now: float) -> float:
        """Seconds this connection must wait before its next read (and before its first): the
        CPU its last read cost off the fast path is billed to its address and name
        (dm.relay.budget), which outlive the connection, and a name closed for its refusals
        waits until its window has room. 0 when it billed nothing (a read of plain sends is
        never paused, even when a neighbour on the same address is in debt) or all is within
        bounds. When it is not 0, an unfinished frame's clock waits too."""
        spent = self.cpu_spent + self.decoder.cpu
        if not spent and not self._new:
            return 0.0
        self.cpu_spent = self.decoder.cpu = 0.0
        self._new = False
        budgets = self.node.budgets
        pause = budgets.refusal_wait(self.name, now) if self.name is not None else 0.0
        if self.node.cpu_share:
            pause = max(pause, budgets.charge(budgets.keys_for(self._address, self.name), spent, now))
        if pause and self.decoder.mid_frame:  # the node's pause never counts against the client's frame timeout
            self.frame_started_at, self._frame_clock_waits = None, True
        return pause

    def _handle(self, payload: bytes) -> tuple | None:
        """A frame the fast reader did not take. Returns (header, deliver plan) for a send,
        for the burst loop to relay; answers anything else itself. Its CPU time counts
        against the connection's budget (pause_needed)."""
        started = time.thread_time()
        try:
            if type(payload) is wire.Oversized:  # its body was never buffered (dm.wire.frames)
                raise _too_large(self.node.max_other_frame)
            return self._handle_general(payload)
        finally:
            if self._paying_claim:  # see on_claim
                self._paying_claim = False
            else:
                self.cpu_spent += time.thread_time() - started

    def _handle_general(self, payload: bytes) -> tuple | None:
        if len(payload) > self.node.max_other_frame and not payload.startswith(wire.SEND_TYPE_PREFIX):
            raise _too_large(self.node.max_other_frame)
        message = wire.parse(payload)
        self._req = req = wire.request_id(message)
        try:
            wire.check_client_message(message, self.phase)
            kind = message["type"]
            if kind == "send":
                header = send_header(message)
                try:
                    return header, plan_encode(self.name, message, self.node.layer.max_visible)
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
                ledger.delivered(in_order, {recipient.name: len(frames) >> 1 for recipient, frames in held.items()})
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
        pinned = node.pins.get(name)
        if pinned is None:
            self._check_new_name(name)
        elif pinned["eth_address"] != hello["eth_address"] and \
                pinned["public_key"].strip() == hello["public_key"].strip():
            # a move to another account: a line in pins.jsonl and, on a dev chain, a grant
            self._take_new_name(name, f"or log in with the account {name} is pinned with, {pinned['eth_address']}")
        if node.cluster is not None:  # pinned network-wide (create-only) before here
            node.cluster.claim_name(name, hello["public_key"], hello["eth_address"])
        outcome = node.pins.pin(name, hello["public_key"], hello["eth_address"], capped=True)
        if outcome == "full":  # the last room went to another new name since _check_new_name
            raise _pins_full(node.pins.max_pins)
        if outcome == "conflict":  # another key won the name between our hello and auth
            raise ProtocolError("name_taken", f"the name {name!r} is pinned to another key on this node", fatal=True)
        if outcome == "confusable":  # a look-alike name was pinned between our hello and auth
            raise _confusable(name, node.pins.confusable_with(name) or "?")
        if outcome == "new":
            log.info("pinned %s to key %s", name, crypto.fingerprint(public_key)[:27])
        if node.faucet is not None:
            funding_started = time.thread_time()  # the dev chain's gift is the node's choice: not billed
            if outcome == "same":  # a returning user: top up in the background, don't hold the handshake
                node.faucet.top_up_later(name, hello["eth_address"])
            else:  # a new account must be able to pay right after welcome
                node.faucet.fund_now(name, hello["eth_address"])
            self.cpu_spent -= time.thread_time() - funding_started
        self.name, self.eth_address = name, hello["eth_address"]
        self._deliver_prefix = deliver_prefix(name)
        self.phase = "ready"
        # The welcome goes out before any deliver can reach this session.
        self._reply({**node.welcome, "name": name})
        node.go_online(self)
        return None

    def _check_new_name(self, name: str) -> None:
        """Before a name is first pinned here, after its proof (a forged auth spends nothing):
        refused, closing the connection as every refused auth does, when the node holds
        --max-pins names or this address has pinned its --new-names-per-hour. Names already
        pinned never come here, so they always log in. With --cluster, a name pinned on another
        node and not yet cached here counts as new here too."""
        node = self.node
        if node.pins.full:
            log.warning("! refused the new name %s from %s: --max-pins names are pinned", name, self.label)
            raise _pins_full(node.pins.max_pins)
        self._take_new_name(name, "names already pinned here still log in")

    def _take_new_name(self, name: str, otherwise: str) -> None:
        """One new name, or one move of a pinned name to another account, out of this address's
        --new-names-per-hour; refused (closing) when they are used up."""
        node = self.node
        wait = node.budgets.take_new_name(self._address, self._now)
        if wait:
            minutes = max(1, math.ceil(round(wait) / 60))
            log.warning("! refused %s from %s: its address pinned --new-names-per-hour names or moves", name,
                        self.label)
            raise ProtocolError("limit_reached", f"{node.budgets.new_names_per_hour} new names or moves of a name "
                                "to another account an hour may be made from your address on this node (its "
                                f"--new-names-per-hour), and they are used up: try again in {minutes} "
                                f"minute{'s' if minutes > 1 else ''}; {otherwise}", fatal=True)

    # --- requests ---------------------------------------------------------------------

    def on_lookup(self, message: dict) -> dict:
        pinned = self.node.pins.get(message["name"])
        if not pinned and self.node.cluster is not None:  # pinned on another node of the network
            pinned = self.node.cluster.resolve(message["name"], message["name"][:64])
        if not pinned:
            raise ProtocolError("unknown_peer", f"no user {message['name'][:40]!r} is known to this node",
                                ref=message["name"][:64])
        try:  # a pin made before keys were checked: never hand it out to be encrypted to
            crypto.check_key_strength(pinned["public_key"])
        except (crypto.WeakKeyError, crypto.KeyFileError) as exc:
            raise ProtocolError("weak_key", f"{message['name']} has a key this node no longer accepts ({exc}); "
                                "they must make new keys with `python3 main.py Y NAME`",
                                ref=message["name"][:64]) from None
        self.node.presence.subscribe(self.name, [message["name"]], strict=False)
        return {"type": "lookup", "name": message["name"], **pinned}

    def on_peers(self, message: dict) -> dict:
        return {"type": "peers", "names": self.node.online_names()}

    def on_book(self, message: dict) -> dict:
        node, index = self.node, self.node.index
        if len(message["leaves"]) > node.max_book_leaves:  # before any hashing
            raise ProtocolError("limit_reached", f"a book may have at most {node.max_book_leaves} leaves on this "
                                "node (its --max-book-leaves): open smaller books")
        try:
            root = bytes.fromhex(message["root"].removeprefix("0x"))
        except ValueError:
            raise ProtocolError("bad_field", "book.root is not hex") from None
        book = index.book(self.eth_address, root) if len(root) == 32 else None
        if book is None or len(message["leaves"]) != book.size:
            raise ProtocolError("unpaid", f"your account {self.eth_address} has no open book with that root and size "
                                "bound to this node (books are keyed by the account that opened them): "
                                "announce your own books")
        if book.tree is None:
            if book.sender != self.eth_address:
                raise ProtocolError("unpaid", f"that book was opened by {book.sender}, not by your account "
                                    f"{self.eth_address}: announce your own books")
            if index.open_books_announced(self.eth_address, index.clock()) >= node.max_books:
                raise ProtocolError("limit_reached", f"you have {node.max_books} open books announced on this node "
                                    "(its --max-books): use them up, or wait until one expires")
        try:
            hexes, leaves = message["leaves"], []
            for start in range(0, len(hexes), LEAVES_PER_PAUSE):
                leaves += [bytes.fromhex(leaf.removeprefix("0x")) for leaf in hexes[start:start + LEAVES_PER_PAUSE]]
                _let_others_run()
            book = index.announce_book(self.eth_address, root, leaves, pause=_let_others_run)
        except (ValueError, TypeError, AttributeError):
            raise ProtocolError("bad_field", "book.leaves do not make book.root") from None
        if book is None:
            raise ProtocolError("unpaid", f"your account {self.eth_address} has no open book with that root and size "
                                "bound to this node (books are keyed by the account that opened them): "
                                "announce your own books")
        return {"type": "book", "root": message["root"], "size": book.size}

    def on_claim(self, message: dict) -> dict:
        """A valid code is journaled (fsynced before anything of this burst is written) and
        answered with the key of the node's layer over that message: `release`. A message its
        recipient already claimed is a re-claim (_reclaim): its release was lost."""
        node, msg_id = self.node, message["msg_id"]
        ledger = node.ledger
        delivery = ledger.awaiting(msg_id, self.name)
        if delivery is None:
            return self._reclaim(msg_id, message["code"])
        _, sender, _, paid_by, _ = delivery
        code = _code(message["code"])
        if paid_by[0] == "remote":  # relayed by another node: its code goes there (dm.cluster.claims)
            node.cluster.forward_claim(delivery, message["code"], self.transport)
            ledger.remember_claim(delivery, keccak(code), self._now)
            # The sending node's layer key travelled with the message (node to node).
            self._paying_claim = True
            return {"type": "release", "msg_id": msg_id, "key": paid_by[6]}
        payer = paid_by[-1]  # the account whose bounty carried it (bounties are keyed by it on chain)
        claim_fields = {"payer": payer, "recipient": self.name, "at": time.time()}
        if paid_by[0] == "single":
            code_hash = keccak(code)
            valid = len(code) == 32 and code_hash.hex() == paid_by[1]
            claim = Claim(msg_id, sender, code, **claim_fields)
        else:
            root = bytes.fromhex(paid_by[1])
            book = node.index.book(payer, root)
            valid = len(code) == 32 and book is not None and book.tree is not None and \
                book.tree.check_code(paid_by[2], code)
            claim = Claim(msg_id, sender, code, root, paid_by[2], **claim_fields)
            code_hash = keccak(code) if valid else b""
        if not valid:
            raise ProtocolError("bad_code", ref=msg_id)
        expiry = node.index.bounty_expiry(paid_by)
        if expiry is None or expiry <= node.index.clock() + node.claim_margin:
            # Too late to redeem before the bounty expires: the key would never be paid for.
            ledger.settle(delivery)  # it waits for no code any more
            raise ProtocolError("expired", "that message's bounty runs out before the node could redeem its code, "
                                "so the node does not open it: ask its sender to send it again", ref=msg_id)
        if not ledger.settle(delivery):
            raise ProtocolError("unknown_message", ref=msg_id)
        node.redeemer.submit(claim, sync=False)  # fsynced at the end of this burst, before the release goes out
        ledger.remember_claim(delivery, code_hash, self._now)  # after the journal line: see remember_claim
        self._paying_claim = True
        return {"type": "release", "msg_id": msg_id, "key": node.layer.key(sender, msg_id, paid_by).hex()}

    def _reclaim(self, msg_id: str, code_hex: str) -> dict:
        """A claim for a message this recipient claimed before, within the claim timeout: the
        same code gets the same key again, and nothing is journaled or redeemed again. Anyone
        else, or another code, gets no key."""
        record = self.node.ledger.claimed_by(msg_id, self.name)
        if record is None:
            timeout = self.node.ledger.claim_timeout
            raise ProtocolError("unknown_message", f"no message with that id waits for your code, and you did not "
                                f"claim it in the last {timeout:g}s (the node's --claim-timeout): if it was "
                                "delivered to you, ask its sender to send it again", ref=msg_id)
        delivery, code_hash, _ = record
        if keccak(_code(code_hex)) != code_hash:
            raise ProtocolError("bad_code", ref=msg_id)
        _, sender, _, paid_by, _ = delivery
        key = paid_by[6] if paid_by[0] == "remote" else self.node.layer.key(sender, msg_id, paid_by).hex()
        return {"type": "release", "msg_id": msg_id, "key": key}

    def on_join(self, message: dict) -> dict:
        channel, channels = message["channel"].lower(), self.node.channels  # names are case-insensitive
        outcome = channels.join(channel, self.name)  # this node's caps first
        if outcome == "too_many_channels":
            raise ProtocolError("limit_reached", f"you are in {channels.max_channels} channels, the most this node "
                                "allows (its --max-channels): leave one first", ref=channel)
        if outcome == "full":
            raise ProtocolError("limit_reached", f"{channel} has {channels.max_members} members, the most this node "
                                "allows (its --max-members): try another channel", ref=channel)
        if self.node.cluster is not None:  # network-wide membership (again, if an earlier try failed)
            try:
                self.node.cluster.change_membership(channel, self.name, True)
            except ProtocolError:  # not in the network's channel: not in this node's either
                if outcome == "joined":
                    channels.leave(channel, self.name)
                raise
        if outcome == "joined":
            log.debug("%s joined %s", self.name, channel)
            self.node.presence.publish_joined(channel, self.name, channels.members.get(channel, frozenset()))
        return self.node.channel_reply(self.name, channel)

    def on_leave(self, message: dict) -> dict:
        channel, channels = message["channel"].lower(), self.node.channels  # names are case-insensitive
        cluster = self.node.cluster
        left = cluster.change_membership(channel, self.name, False) if cluster is not None else False
        left = channels.leave(channel, self.name) or left  # (with --cluster: a stale entry here, too)
        if not left:
            raise ProtocolError("not_a_member", f"you are not in {channel}", ref=channel)
        log.debug("%s left %s", self.name, channel)
        self.node.presence.publish_left(channel, self.name, channels.members.get(channel, frozenset()))
        return self.node.channel_reply(self.name, channel)

    def on_watch(self, message: dict) -> dict:
        """Presence notices for these names from now on; the reply says who is online now."""
        cap = self.node.presence.max_watches
        if len(message["names"]) > cap:  # refused before each name is looked at
            raise ProtocolError("watch_limit", f"you may watch at most {cap} names: watch fewer")
        names = _names(message)
        self.node.presence.subscribe(self.name, names)
        online = [n for n in names if self.node.is_online(n)]
        return {"type": "watch", "online": online, "offline": [n for n in names if n not in online]}

    def on_unwatch(self, message: dict) -> dict:
        names = _names(message)
        self.node.presence.unsubscribe(self.name, names)
        return {"type": "unwatch", "names": names}

    def on_channels(self, message: dict) -> dict:
        after = message.get("after")
        if after is not None and not (isinstance(after, str) and wire.is_channel(after)):
            raise ProtocolError("bad_channel", "channels.after must be a channel name (the last one of the page before)")
        return self.node.channel_reply(self.name, after=after)

    def on_members(self, message: dict) -> dict:
        channel = message["channel"].lower()  # channel names are case-insensitive
        members = self.node.channels.members.get(channel, frozenset())
        if self.name not in members:
            raise ProtocolError("not_a_member", f"join {channel} first", ref=channel)
        online = sorted(m for m in members if self.node.is_online(m))
        return {"type": "members", "channel": channel, "online": online, "offline": sorted(members - set(online))}


def _code(code_hex: str) -> bytes:
    """A claim's code as bytes; b"" when it is not hex (then it matches no bounty)."""
    try:
        return bytes.fromhex(code_hex.removeprefix("0x"))
    except ValueError:
        return b""


def _names(message: dict) -> list[str]:
    """A watch's or unwatch's names: each a valid user name, in order, without repeats."""
    names = message["names"]
    for name in names:
        try:
            datadir.check_name(name)
        except datadir.DataError:
            raise ProtocolError("bad_field", f"{message['type']}.names must be a list of user names") from None
    return list(dict.fromkeys(names))
