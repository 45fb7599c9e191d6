"""The relay node: accept, authenticate, route, check bounties, collect codes.

    python3 node.py [--host localhost] [--port 12345] [--rpc-url URL] [--data-dir DIR]

One thread per connection. Every client message goes through `dispatch`, the
one place that enforces message order; every refusal leaves through
ProtocolError -> an `error` frame. The node never decrypts: it routes on the
`to` field and passes the envelope on untouched.
"""
from __future__ import annotations

import base64
import collections
import logging
import queue
import re
import secrets
import socket
import threading
import time
from pathlib import Path

from eth_utils import keccak
from web3 import Web3

from dm import datadir
from dm.chain import devchain
from dm import crypto
from dm import wire
from dm.chain import ethereum
from dm.relay.bounties import EXPIRY_MARGIN, BountyIndex
from dm.relay.redeemer import Claim, Journal, Redeemed, Redeemer
from dm.relay.connection import Connection, burst, timeval
from dm.relay.pins import PinStore
from dm.wire import ProtocolError

log = logging.getLogger("node")
RELAY_REPORT_SECONDS = 10  # how often the log sums up relaying
# 256 KB per read: a larger recv() allocates (and the kernel zeroes) fresh pages
# every time, which made reads three times slower here.
RECV_SIZE = 262144
threading.stack_size(512 * 1024)  # thousands of connection threads; the default 8 MB stack is waste


# A delivery whose code has not come back yet:
#     (msg_id, sender, recipient, paid_by, delivered_at)
# paid_by being ("single", code hash hex) or ("book", root hex, leaf index).
# A plain tuple on purpose: millions can be pending, and CPython's collector
# stops tracking tuples of plain values but rescans every class instance on
# each full collection, which doubled the relay's cost per message.
Pending = tuple


# A `send` whose keys come in this order is routed without parsing its envelope;
# its `deliver` is the same bytes with the first key swapped for the sender's name.
_SEND_PREFIX_LENGTH = len(b'{"type":"send",')
# Possessive quantifiers (`{1,32}+`): no backtracking state, which halves the match time.
_FAST_SEND = re.compile(
    rb'\{"type":"send","to":"([A-Za-z0-9_.-]{1,32}+)","msg_id":"([\x20\x21\x23-\x5b\x5d-\x7e]{1,64}+)",'
    rb'"bounty":\{(?:"book":"((?:0x)?[0-9a-fA-F]{64})","index":(0|[1-9][0-9]{0,8}+)'
    rb'|"code_hash":"((?:0x)?[0-9a-fA-F]{64})")\}(?:,"channel":"(#[A-Za-z0-9_.-]{1,31}+)")?,"envelope":\{')


_PLAIN_ID = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]{1,64}")
_SETTLED = ("settled",)  # in _used: the bounty carried a message that is no longer pending
_FRAME_LENGTH = wire.HEADER.pack
_RECEIPT_HEAD = b'{"type":"receipt","msg_id":"'
_RECEIPT_DELIVERED = b'","status":"delivered"}'
_RECEIPT_FIXED = len(_RECEIPT_HEAD) + len(_RECEIPT_DELIVERED)


def _receipt(msg_id: str, status: str) -> bytes:
    if _PLAIN_ID.fullmatch(msg_id):  # nothing to escape: skip json.dumps on the hot path
        body = b'{"type":"receipt","msg_id":"' + msg_id.encode() + b'","status":"' + status.encode() + b'"}'
        return len(body).to_bytes(4, "big") + body
    return wire.encode({"type": "receipt", "msg_id": msg_id, "status": status})


class Node:
    def __init__(self, *, token: ethereum.BountyToken, signer: ethereum.Signer, data_dir: Path, index: BountyIndex,
                 redeemer_options: dict | None = None, faucet: ethereum.Signer | None = None,
                 host: str = "localhost", port: int = 12345, max_connections: int = 10_000,
                 handshake_timeout: float = 10, frame_timeout: float = 10, idle_timeout: float = 600,
                 max_errors: int = 20, claim_timeout: float = 3600, clock=time.monotonic):
        self.token = token
        self.signer = signer
        self.index = index
        self.faucet = faucet
        self.clock = clock
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.max_errors = max_errors
        self.claim_timeout = claim_timeout
        node_dir = data_dir / "node"
        self.node_id = datadir.ensure_secret(node_dir / "node_id", lambda: secrets.token_hex(16))
        self.pins = PinStore(node_dir / "pins.json")
        self._pinned = self.pins.names  # a live view: membership without a method call per message
        self.channels_path = node_dir / "channels.json"
        self.channels: dict[str, set[str]] = {c: set(m) for c, m in datadir.read_json(self.channels_path, {}).items()}
        self.redeemer = Redeemer(token, signer, index, Journal(node_dir / "journal.jsonl"),
                                 on_redeemed=self._on_redeemed, **(redeemer_options or {}))
        self.welcome = {"type": "welcome", "node_eth_address": signer.address,
                        "chain_id": token.w3.eth.chain_id, "contract": token.address}
        self._online: dict[str, Connection] = {}
        self._connections: set[Connection] = set()
        # The hot path takes no lock: a message reserves its bounty and its msg_id
        # with dict.setdefault, which is atomic under the GIL.
        self._pending: dict[str, Pending] = {}  # msg_id -> delivery awaiting its code
        self._used: dict[tuple, Pending] = {}  # bounty -> the message that carried it
        self._expiring: collections.deque[Pending] = collections.deque()  # deliveries, oldest first
        self._relayed_by_closed = 0  # relays counted by connections that are gone
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._topups: queue.Queue = queue.Queue()
        self.listener = socket.create_server((host, port), backlog=1024, reuse_port=False)
        self.port = self.listener.getsockname()[1]

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self.index.sync()
        self.index.start_following(self._stop)
        self.redeemer.start()
        threading.Thread(target=self._watchdog, name="watchdog", daemon=True).start()
        if self.faucet is not None:
            threading.Thread(target=self._topup_worker, name="topups", daemon=True).start()
        threading.Thread(target=self._accept_loop, name="accept", daemon=True).start()
        log.info("node %s listening on port %d; paid to %s on chain %s, contract %s", self.node_id[:8],
                 self.port, self.signer.address, self.welcome["chain_id"], self.token.address)

    def stop(self) -> None:
        """Stop accepting, close every connection, and redeem what is queued."""
        self._stop.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()
        self.redeemer.stop(flush=True)
        self.redeemer.journal.close()
        self.pins.close()
        log.info("stopped; earned %d BTK this run", self.redeemer.earned)

    def _forget_settled(self, now: float) -> None:
        """Drop deliveries whose code came back, and those that waited longer than the
        claim timeout (their bounty stays used). Oldest first, so the queue stays short
        while recipients answer."""
        expiring, pending, used = self._expiring, self._pending, self._used
        while expiring:
            msg_id, _, _, paid_by, delivered_at = entry = expiring[0]
            if pending.get(msg_id) is entry:
                if now - delivered_at <= self.claim_timeout:
                    break
                pending.pop(msg_id, None)
            if used.get(paid_by) is entry:
                used[paid_by] = _SETTLED  # keep the bounty used, free the rest of the entry
            expiring.popleft()

    @property
    def relayed(self) -> int:
        """Messages relayed this run (each connection counts its own: no shared counter to race on)."""
        with self._lock:
            return self._relayed_by_closed + sum(conn.relayed for conn in self._connections)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, address = self.listener.accept()
            except OSError as exc:
                if self._stop.is_set():
                    return
                # Out of file descriptors (or a connection reset before accept): wait, then go on.
                log.warning("accept failed: %s", exc)
                time.sleep(0.1)
                continue
            with self._lock:
                full = len(self._connections) >= self.max_connections
            if full:
                try:
                    sock.sendall(wire.encode(wire.error("busy")))
                except OSError:
                    pass
                finally:
                    sock.close()
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # A reader that stops reading must not block us forever: give up on it.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(10))
            except OSError:
                sock.close()
                continue
            conn = Connection(sock, address, self.clock)
            with self._lock:
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="conn", daemon=True).start()

    def _watchdog(self) -> None:
        """Closes connections that stall: slow handshakes, half-sent frames, silence.
        Also forgets deliveries whose code never came back."""
        reported, next_report = self.relayed, self.clock() + RELAY_REPORT_SECONDS
        while not self._stop.wait(0.25):
            now = self.clock()
            self._forget_settled(now)
            if now >= next_report:
                relayed = self.relayed
                if relayed != reported:
                    log.info("relayed %d message(s) in the last %gs, %d this run",
                             relayed - reported, RELAY_REPORT_SECONDS, relayed)
                reported, next_report = relayed, now + RELAY_REPORT_SECONDS
            with self._lock:
                connections = list(self._connections)
            for conn in connections:
                reason = None
                if conn.phase != "ready" and not conn.proved and now - conn.connected_at > self.handshake_timeout:
                    reason = f"no authentication within {self.handshake_timeout:g}s"
                elif conn.frame_started_at is not None and now - conn.frame_started_at > self.frame_timeout:
                    reason = f"a frame took longer than {self.frame_timeout:g}s to arrive"
                elif now - conn.last_frame_at > self.idle_timeout:
                    reason = f"idle for {self.idle_timeout:g}s"
                if reason:
                    conn.abort(wire.error("timeout", reason))

    def _serve(self, conn: Connection) -> None:
        try:
            while not conn.closed:
                try:
                    data = conn.sock.recv(RECV_SIZE)
                except OSError:
                    break
                if not data:
                    break
                try:
                    payloads = conn.decoder.feed(data)
                except ProtocolError as exc:
                    conn.send(exc.to_message())
                    break
                now = self.clock()
                if payloads:
                    conn.last_frame_at = now
                if not conn.decoder.mid_frame:
                    conn.frame_started_at = None
                elif payloads or conn.frame_started_at is None:  # a new frame started in this read
                    conn.frame_started_at = now
                if payloads:
                    self._handle_burst(conn, payloads)
        finally:
            self._disconnect(conn)

    def _handle_burst(self, conn: Connection, payloads: list[bytes]) -> None:
        burst.outbox = outbox = set()
        try:
            position, count = 0, len(payloads)
            while position < count and not conn.closed:
                if conn.phase == "ready":
                    position = self._relay_run(conn, payloads, position, outbox)
                    if position == count:
                        break
                self._handle_payload(conn, payloads[position])
                position += 1
        except Exception:  # a bug must cost one connection, never the node
            log.exception("internal error relaying a burst from %s", conn.label)
            conn.send(wire.error("internal"))
            conn.close()
        finally:
            burst.outbox = None
            self.redeemer.journal.sync()  # one fsync for every claim of the burst, before anything else
            for target in outbox:
                target.flush()

    def _handle_payload(self, conn: Connection, payload: bytes) -> None:
        conn.req = None
        try:
            message = wire.parse(payload)
            conn.req = wire.request_id(message)
            self.dispatch(conn, wire.check_client_message(message, conn.phase))
            conn.errors = 0  # max_errors counts errors in a row
        except ProtocolError as exc:
            conn.errors += 1
            refusal = exc.to_message()
            if conn.req is not None:
                refusal["req"] = conn.req
            try:
                conn.send(refusal)
            except (ProtocolError, ValueError):  # an unencodable ref: answer without it
                conn.send(wire.error(exc.code, exc.message))
            if exc.fatal or conn.errors >= self.max_errors:
                conn.close()
        except Exception:  # a bug must cost one connection, never the node
            log.exception("internal error handling a message from %s", conn.label)
            conn.send(wire.error("internal"))
            conn.close()

    def _disconnect(self, conn: Connection) -> None:
        conn.close()
        try:
            conn.sock.close()
        except OSError:
            pass
        with self._lock:
            if conn in self._connections:
                self._connections.discard(conn)
                self._relayed_by_closed += conn.relayed
            if conn.name and self._online.get(conn.name) is conn:
                del self._online[conn.name]
                log.info("- %s disconnected", conn.name)

    # --- the one dispatch point ------------------------------------------------------

    def dispatch(self, conn: Connection, message: dict) -> None:
        getattr(self, "on_" + message["type"])(conn, message)

    def _reply(self, conn: Connection, reply: dict) -> None:
        """Answer the request being handled, echoing its `req` id."""
        if conn.req is not None:
            reply["req"] = conn.req
        conn.send(reply)

    def on_ping(self, conn: Connection, message: dict) -> None:
        self._reply(conn, {"type": "pong"})

    def on_hello(self, conn: Connection, message: dict) -> None:
        name = message["name"]
        try:
            datadir.check_name(name)
        except datadir.DataError:
            raise ProtocolError("invalid_name", fatal=True) from None
        try:
            crypto.public_key_from_pem(message["public_key"])
        except Exception:
            raise ProtocolError("bad_field", "hello.public_key is not an RSA public key in PEM form",
                                fatal=True) from None
        if not Web3.is_checksum_address(message["eth_address"]):
            raise ProtocolError("bad_field", "hello.eth_address must be a checksummed Ethereum address", fatal=True)
        pinned = self.pins.get(name)
        if pinned and pinned["public_key"].strip() != message["public_key"].strip():
            log.warning("! refused %s from %s: a different key than the pinned one", name, conn.label)
            raise ProtocolError("name_taken", f"the name {name!r} is pinned to another key on this node",
                                fatal=True)
        conn.hello = message
        conn.nonce = base64.b64encode(secrets.token_bytes(32)).decode()
        conn.phase = "challenged"
        self._reply(conn, {"type": "challenge", "nonce": conn.nonce, "node_id": self.node_id})

    def on_auth(self, conn: Connection, message: dict) -> None:
        hello = conn.hello
        data = wire.auth_payload(conn.nonce, self.node_id, hello["name"], hello["public_key"],
                                     hello["eth_address"])
        try:
            signature = base64.b64decode(message["signature"], validate=True)
        except ValueError:
            signature = b""
        public_key = crypto.public_key_from_pem(hello["public_key"])
        if not crypto.verify(public_key, signature, data):
            log.warning("! failed proof for %s from %s", hello["name"], conn.label)
            raise ProtocolError("auth_failed", fatal=True)
        conn.proved = True  # the handshake clock stops: funding a new user may take a while
        name = hello["name"]
        outcome = self.pins.pin(name, hello["public_key"], hello["eth_address"])
        if outcome == "conflict":  # another key won the name between our hello and auth
            raise ProtocolError("name_taken", f"the name {name!r} is pinned to another key on this node", fatal=True)
        if outcome == "new":
            log.info("pinned %s to key %s", name, crypto.fingerprint(public_key)[:27])
        if self.faucet is not None:
            if outcome == "same":  # a returning user: top up in the background, don't hold the handshake
                self._topups.put((name, hello["eth_address"]))
            else:  # a new account must be able to pay right after welcome
                self._fund(name, hello["eth_address"])
        conn.name = name
        conn.name_bytes = name.encode()
        conn.phase = "ready"
        self._reply(conn, {**self.welcome, "name": name})  # before any deliver can reach this connection
        with self._lock:
            previous = self._online.get(name)
            self._online[name] = conn
        if previous is not None and previous is not conn:
            previous.send(wire.error("name_in_use", f"{name} connected again from elsewhere"))
            previous.close()
        log.info("+ %s connected from %s", name, conn.address[0])

    def _fund(self, name: str, address: str) -> None:
        try:
            if devchain.fund_user(self.token, self.faucet, address):
                log.info("funded %s on the dev chain", name)
        except (ethereum.ChainError, ValueError, OSError) as exc:
            log.warning("could not fund %s: %s", name, exc)

    def _topup_worker(self) -> None:
        while not self._stop.is_set():
            try:
                name, address = self._topups.get(timeout=0.5)
            except queue.Empty:
                continue
            self._fund(name, address)

    def on_lookup(self, conn: Connection, message: dict) -> None:
        pinned = self.pins.get(message["name"])
        if not pinned:
            raise ProtocolError("unknown_peer", f"no user {message['name'][:40]!r} is known to this node",
                                ref=message["name"][:64])
        self._reply(conn, {"type": "lookup", "name": message["name"], **pinned})

    def on_peers(self, conn: Connection, message: dict) -> None:
        with self._lock:
            names = sorted(self._online)
        self._reply(conn, {"type": "peers", "names": names})

    def on_book(self, conn: Connection, message: dict) -> None:
        try:
            root = bytes.fromhex(message["root"].removeprefix("0x"))
            leaves = [bytes.fromhex(leaf.removeprefix("0x")) for leaf in message["leaves"]]
            book = self.index.announce_book(root, leaves)
        except (ValueError, TypeError, AttributeError):
            raise ProtocolError("bad_field", "book.leaves do not make book.root") from None
        if book is None:
            raise ProtocolError("unpaid", "no open book with that root and size is bound to this node")
        self._reply(conn, {"type": "book", "root": message["root"], "size": book.size})

    def on_send(self, conn: Connection, message: dict) -> None:
        """The general path: a `send` the hot path (_relay_run) left alone, parsed whole."""
        msg_id, bounty = message["msg_id"], message["bounty"]
        if "code_hash" in bounty:
            paid_by = ("single", bounty["code_hash"].removeprefix("0x").lower())
        else:
            paid_by = ("book", bounty["book"].removeprefix("0x").lower(), bounty["index"])
        deliver = {"type": "deliver", "from": conn.name, "to": message["to"], "msg_id": msg_id, "bounty": bounty}
        if "channel" in message:
            deliver["channel"] = message["channel"]
        deliver["envelope"] = message["envelope"]
        try:
            frame = wire.encode(deliver)
        except ProtocolError as exc:
            raise ProtocolError(exc.code, exc.message, ref=msg_id) from None
        self._relay(conn, message["to"], msg_id, paid_by, message.get("channel"), frame)

    def _relay(self, conn: Connection, to: str, msg_id: str, paid_by: tuple, channel: str | None,
               frame: bytes) -> None:
        if to not in self._pinned:
            raise ProtocolError("unknown_peer", f"no user {to[:40]!r} is known to this node", ref=msg_id)
        if channel is not None:
            members = self.channels.get(channel, ())
            if conn.name not in members or to not in members:
                raise ProtocolError("not_a_member", f"both sender and recipient must be in {channel}", ref=msg_id)
        try:
            payable = self.index.is_payable(paid_by)
        except (ethereum.ChainError, OSError) as exc:
            raise ProtocolError("unpaid", f"could not check the bounty: {exc}", ref=msg_id) from None
        if not payable:
            raise ProtocolError("unpaid", "no open bounty bound to this node backs this message "
                                "(unknown, spent, expired, or for another node)", ref=msg_id)
        recipient = self._online.get(to)
        entry = (msg_id, conn.name, to, paid_by, self.clock())
        if recipient is not None:
            self._reserve(entry)
        delivered = recipient is not None and recipient.send_bytes(frame)
        if recipient is not None:
            if delivered:
                self._expiring.append(entry)
                conn.relayed += 1
            else:
                self._release(entry)
        conn.send_bytes(_receipt(msg_id, "delivered" if delivered else "offline"))

    def _reserve(self, entry: Pending) -> None:
        msg_id, paid_by = entry[0], entry[3]
        if self._used.setdefault(paid_by, entry) is not entry:
            raise ProtocolError("unpaid", "that bounty already paid for another message", ref=msg_id)
        if self._pending.setdefault(msg_id, entry) is not entry:
            self._used.pop(paid_by, None)
            raise ProtocolError("bad_field", "msg_id is already in use", ref=msg_id)

    def _release(self, entry: Pending) -> None:
        msg_id, paid_by = entry[0], entry[3]
        if self._used.get(paid_by) is entry:
            self._used.pop(paid_by, None)
        if self._pending.get(msg_id) is entry:
            self._pending.pop(msg_id, None)

    def _relay_run(self, conn: Connection, payloads: list[bytes], start: int, outbox: set) -> int:
        """The hot path: relays the plain book-paid sends in payloads[start:] until one
        needs the general path, and returns that one's position (len(payloads) when
        none does). Anything unusual - another key order, a single bounty, an unknown
        or offline recipient, an unpayable or reused bounty - stops the run, and the
        general path then handles (and, if need be, refuses) that message.
        One clock read per run; no lock (see _reserve)."""
        match = _FAST_SEND.match
        online, pending, used, expiring = self._online, self._pending, self._used, self._expiring
        books, channels = self.index.books_by_hex, self.channels
        sender = conn.name
        prefix = b'{"type":"deliver","from":"' + conn.name_bytes + b'",'
        longest = wire.MAX_FRAME - len(prefix) + _SEND_PREFIX_LENGTH  # a send whose deliver still fits
        now = self.clock()
        horizon = self.index.clock() + EXPIRY_MARGIN
        queued: dict[Connection, tuple[list[bytes], list[bytes]]] = {}  # recipient -> (frames, msg ids)
        raw_root = root_hex = book = None
        position = start
        for position in range(start, len(payloads)):
            payload = payloads[position]
            header = match(payload)
            if header is None or not payload.endswith(b"}}"):
                break
            to, msg_id, root, leaf, _, channel = header.groups()
            if root is None:  # a single bounty: its check may need the chain
                break
            if root != raw_root:
                raw_root, root_hex = root, root.decode().removeprefix("0x").lower()
                book = books.get(root_hex)
            leaf = int(leaf)
            if book is None or leaf >= book.size or book.expiry <= horizon:
                break
            to = to.decode()
            recipient = online.get(to)
            if recipient is None or recipient.closed:
                break
            if channel is not None:
                members = channels.get(channel.decode())
                if members is None or sender not in members or to not in members:
                    break
            if len(payload) > longest:
                break
            body = prefix + payload[_SEND_PREFIX_LENGTH:]
            msg_id_text = msg_id.decode()
            paid_by = ("book", root_hex, leaf)
            entry = (msg_id_text, sender, to, paid_by, now)
            if used.setdefault(paid_by, entry) is not entry:
                break
            if pending.setdefault(msg_id_text, entry) is not entry:
                del used[paid_by]
                break
            expiring.append(entry)
            out = queued.get(recipient)
            if out is None:
                queued[recipient] = out = ([], [])
            out[0].append(_FRAME_LENGTH(len(body)))
            out[0].append(body)
            out[1].append(msg_id)
        else:
            position = len(payloads)
        if queued:
            receipts: list[bytes] = []
            for recipient, (frames, msg_ids) in queued.items():
                if recipient.queue(frames, outbox):
                    conn.relayed += len(msg_ids)
                    for msg_id in msg_ids:  # msg ids matched the plain pattern: nothing to escape
                        receipts += (_FRAME_LENGTH(_RECEIPT_FIXED + len(msg_id)), _RECEIPT_HEAD, msg_id,
                                     _RECEIPT_DELIVERED)
                else:  # it hung up since we looked: nothing was delivered to it
                    for msg_id in msg_ids:
                        entry = pending.get(msg_id.decode())
                        if entry is not None:
                            self._release(entry)
                        receipts.append(_receipt(msg_id.decode(), "offline"))
            conn.queue(receipts, outbox)
            conn.errors = 0
        return position

    def on_claim(self, conn: Connection, message: dict) -> None:
        msg_id = message["msg_id"]
        with self._lock:
            pending = self._pending.get(msg_id)
            if pending is None or pending[2] != conn.name:
                raise ProtocolError("unknown_message", ref=msg_id)
        _, sender, _, paid_by, _ = pending
        try:
            code = bytes.fromhex(message["code"].removeprefix("0x"))
        except ValueError:
            code = b""
        if paid_by[0] == "single":
            valid = len(code) == 32 and keccak(code).hex() == paid_by[1]
            claim = Claim(msg_id, sender, code)
        else:
            root = bytes.fromhex(paid_by[1])
            book = self.index.book(root)
            valid = len(code) == 32 and book is not None and book.tree is not None and \
                book.tree.check_code(paid_by[2], code)
            claim = Claim(msg_id, sender, code, root, paid_by[2])
        if not valid:
            raise ProtocolError("bad_code", ref=msg_id)
        with self._lock:
            if self._pending.pop(msg_id, None) is None:
                raise ProtocolError("unknown_message", ref=msg_id)
        self.redeemer.submit(claim, sync=False)  # fsynced at the end of this burst

    def _on_redeemed(self, result: Redeemed) -> None:
        log.info("redeemed %d code(s) in tx %s (gas %d): +%d BTK, %d BTK this run", result.paid,
                 result.tx_hash, result.gas_used, result.paid, self.redeemer.earned)
        by_sender: dict[str, list[str]] = {}
        for claim in result.paid_claims:
            by_sender.setdefault(claim.sender, []).append(claim.msg_id)
        for sender, msg_ids in by_sender.items():
            with self._lock:
                conn = self._online.get(sender)
            if conn is not None:
                conn.send({"type": "paid", "msg_ids": msg_ids, "tx": result.tx_hash})

    # --- channels -----------------------------------------------------------------------
    # A channel is a set of names, kept on disk so that offline members stay members.
    # The node never fans out: the sender encrypts and pays one copy per member, and
    # each copy is an ordinary `send` with a `channel` label the node checks.

    def _channel_reply(self, name: str, channel: str | None = None) -> dict:
        with self._lock:
            joined = sorted(c for c, members in self.channels.items() if name in members)
            every = {c: len(members) for c, members in sorted(self.channels.items()) if members}
        reply = {"type": "channels", "joined": joined, "all": every}
        if channel:
            reply["channel"] = channel  # the one just joined or left
        return reply

    def on_join(self, conn: Connection, message: dict) -> None:
        with self._lock:
            self.channels.setdefault(message["channel"], set()).add(conn.name)
            self._save_channels()
        log.info("%s joined %s", conn.name, message["channel"])
        self._reply(conn, self._channel_reply(conn.name, message["channel"]))

    def on_leave(self, conn: Connection, message: dict) -> None:
        with self._lock:
            members = self.channels.get(message["channel"], set())
            if conn.name not in members:
                raise ProtocolError("not_a_member", f"you are not in {message['channel']}", ref=message["channel"])
            members.discard(conn.name)
            if not members:
                del self.channels[message["channel"]]
            self._save_channels()
        log.info("%s left %s", conn.name, message["channel"])
        self._reply(conn, self._channel_reply(conn.name, message["channel"]))

    def on_channels(self, conn: Connection, message: dict) -> None:
        self._reply(conn, self._channel_reply(conn.name))

    def on_members(self, conn: Connection, message: dict) -> None:
        channel = message["channel"]
        with self._lock:
            members = self.channels.get(channel, set())
            if conn.name not in members:
                raise ProtocolError("not_a_member", f"join {channel} first", ref=channel)
            online = sorted(m for m in members if m in self._online)
            offline = sorted(members - set(online))
        self._reply(conn, {"type": "members", "channel": channel, "online": online, "offline": offline})

    def _save_channels(self) -> None:  # called with self._lock held
        datadir.write_json(self.channels_path, {c: sorted(m) for c, m in self.channels.items()})
