"""The node's durable records (dm.relay.journal), in process: what a restart gets back."""
from __future__ import annotations

import threading
import time

from dm.relay.journal import Claim, DeliveryLog, Journal, restore
from dm.relay.ledger import SETTLED, DeliveryLedger

ROOT = "ab" * 32
ALICE = "0x" + "a1" * 20  # alice's account: the payer of her deliveries (dm.relay.ledger.paying)


def delivery(i: int, at: float, payer: tuple = (ALICE,)) -> tuple:
    return (f"m{i}", "alice", "bob", ("book", ROOT, i) + payer, at)


def write_through_the_writer_thread(path, deliveries_by_burst) -> DeliveryLog:
    """Feed bursts the way the ledger does, and let the writer thread write them."""
    ledger = DeliveryLedger(claim_timeout=60)
    log = DeliveryLog(path)
    log.feed = ledger.unjournaled
    stop = threading.Event()
    log.start(stop)
    for burst in deliveries_by_burst:
        ledger.delivered(burst)
    deadline = time.monotonic() + 5
    while log.written < sum(map(len, deliveries_by_burst)) and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    log.close()
    return log


def test_a_torn_last_record_loses_only_itself(tmp_path):
    path = tmp_path / "deliveries.log"
    now = time.monotonic()
    write_through_the_writer_thread(path, [[delivery(0, now), delivery(1, now)]])
    intact = path.stat().st_size
    write_through_the_writer_thread(path, [[delivery(2, now)]])
    with open(path, "r+b") as handle:  # a crash in the middle of the second record
        handle.truncate(intact + 10)
    loaded = DeliveryLog(path).load()
    assert [d[0] for d in loaded] == ["m0", "m1"]
    assert all(abs(d[4] - time.time()) < 5 for d in loaded)  # monotonic stamps came back as wall time


def test_restore_brings_back_pending_deliveries_and_used_bounties_but_not_claimed_or_dead_ones(tmp_path):
    node_dir = tmp_path / "node"
    now = time.monotonic()
    write_through_the_writer_thread(node_dir / "deliveries.log",
                                    [[delivery(0, now), delivery(1, now)], [delivery(2, now - 120), delivery(3, now)]])
    journal = Journal(node_dir / "journal.jsonl")
    journal.add(Claim("m1", "alice", b"\x01" * 32, bytes.fromhex(ROOT), 1, "0xA"))
    journal.done([Claim("m1", "alice", b"\x01" * 32, bytes.fromhex(ROOT), 1, "0xA").key])
    journal.close()

    for run in range(2):  # the same answer after a second restart (the files were compacted)
        ledger = DeliveryLedger(claim_timeout=60)  # m2 waited 120 s: past its claim timeout
        pending, used = restore(DeliveryLog(node_dir / "deliveries.log"), Journal(node_dir / "journal.jsonl"),
                                ledger, time.monotonic, lambda sender, paid_by: paid_by[2] != 3)
        assert (pending, used) == (1, 3), run  # m3's book "expired": forgotten altogether
        assert sorted(ledger.pending) == ["m0"]
        assert ledger.used[("book", ROOT, 0, ALICE)] is ledger.pending["m0"]
        # no longer pending, but a resend of the same message is answered as before the restart
        assert ledger.used[("book", ROOT, 1, ALICE)] == "m1" and ledger.used[("book", ROOT, 2, ALICE)] == "m2"
        assert ("book", ROOT, 3, ALICE) not in ledger.used
        assert list(ledger.expiring) == [ledger.pending["m0"]]


def test_a_log_written_before_deliveries_named_their_payer_is_restored_with_the_senders_account(tmp_path):
    """An older node recorded the bounty key alone; its sender's pinned account completes it, and
    a delivery whose sender is no longer pinned cannot pay anyone: it is dropped."""
    path = tmp_path / "node" / "deliveries.log"
    now = time.monotonic()
    old = [delivery(0, now, payer=()), ("m1", "gone", "bob", ("single", "cd" * 32), now)]
    write_through_the_writer_thread(path, [old])
    ledger = DeliveryLedger(claim_timeout=60)
    pending, used = restore(DeliveryLog(path), Journal(tmp_path / "node" / "journal.jsonl"), ledger,
                            time.monotonic, lambda sender, paid_by: True, {"alice": ALICE}.get)
    assert (pending, used) == (1, 1)
    assert ledger.pending["m0"][3] == ("book", ROOT, 0, ALICE)
    assert ledger.used[("book", ROOT, 0, ALICE)] is ledger.pending["m0"]
