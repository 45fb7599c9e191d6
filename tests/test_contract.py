"""BountyToken on eth-tester: the real compiled artifact on py-evm.

Fixture chain in the style of web3.py's own tests: w3 (in-process
eth-tester) -> one deployment per module. Every test runs between an
eth-tester snapshot and its revert, so tests share the deployment but not
its state; accounts and codes are fresh and random in every test.

Time: `now(w3)` is the timestamp of the pending block, i.e. exactly the
block.timestamp the next transaction (and web3's gas estimate, which is where
reverts surface) will see; `travel_to(w3, t)` moves it to t.
"""

import random
import secrets
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from eth_utils import event_abi_to_log_topic, is_hex_address, to_checksum_address
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any cwd

from dm.chain.faucet import give_eth  # noqa: E402
from dm.chain import ethereum  # noqa: E402
from dm.chain.books import BookSecrets, MerkleTree, leaf_hash, redemption_args  # noqa: E402
from web3_utils import TOKEN, code_hash  # noqa: E402

INITIAL_SUPPLY = 1_000_000 * TOKEN
ZERO_ADDRESS = "0x" + "00" * 20
GAS_ETH = 10 * 10**18
LONG = 10_000  # seconds: an expiry no test reaches by accident
SHORT = 500
GAS = 1_000_000  # for transactions sent without an estimate
SKIP_UNKNOWN, SKIP_REDEEMED, SKIP_REFUNDED, SKIP_EXPIRED = range(4)


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def w3():
    return ethereum.connect(ethereum.TESTER_URL)


@pytest.fixture(scope="module")
def tester(w3):
    return w3.provider.ethereum_tester


@pytest.fixture(scope="module")
def deployment(w3):
    """(token, deployer key, deploy receipt), deployed once per module by a fresh account."""
    address, key = ethereum.new_account()
    give_eth(w3, address, 1_000 * 10**18)
    token, receipt = ethereum.BountyToken.deploy(ethereum.Signer(w3, key), INITIAL_SUPPLY)
    return token, key, receipt


@pytest.fixture(autouse=True)
def isolated(tester, deployment):
    """Each test sees the chain as it was right after deployment."""
    snapshot = tester.take_snapshot()
    yield
    tester.enable_auto_mine_transactions()  # in case a test died with it off
    tester.revert_to_snapshot(snapshot)


@pytest.fixture
def token(deployment):
    return deployment[0]


@pytest.fixture
def deployer(w3, deployment):
    # A fresh Signer per test: Signer caches its nonce, and snapshots rewind it.
    return ethereum.Signer(w3, deployment[1])


@pytest.fixture
def new_key(w3, token, deployer):
    """new_key(btk=0, eth=True) -> (address, private key) of a fresh random
    account, given gas money and `btk` whole tokens by the deployer."""

    def make(btk: int = 0, eth: bool = True) -> tuple[str, str]:
        address, key = ethereum.new_account()
        if eth:
            give_eth(w3, address, GAS_ETH)
        if btk:
            token.transfer(deployer, address, btk * TOKEN)
        return address, key

    return make


@pytest.fixture
def new_account(w3, new_key):
    """new_account(btk=0, eth=True) -> a Signer for a fresh funded account."""
    return lambda btk=0, eth=True: ethereum.Signer(w3, new_key(btk, eth)[1])


# --- helpers --------------------------------------------------------------------------


def now(w3) -> int:
    """block.timestamp of the next transaction (auto-mining puts each in the pending block)."""
    return w3.eth.get_block("pending")["timestamp"]


def travel_to(w3, timestamp: int) -> None:
    w3.provider.ethereum_tester.time_travel(timestamp)
    assert now(w3) == timestamp


def new_code() -> bytes:
    return secrets.token_bytes(32)


def _normal(value):
    return to_checksum_address(value) if isinstance(value, str) and is_hex_address(value) else value


@contextmanager
def reverts(name: str, **args):
    """The block must revert with custom error `name` and exactly these arguments."""
    with pytest.raises(ethereum.ContractRevert) as info:
        yield info
    assert info.value.name == name, str(info.value)
    assert {k: _normal(v) for k, v in info.value.args_by_name.items()} == {k: _normal(v) for k, v in args.items()}


def mined_failure(token, signer, method, *args, gas=300_000):
    """Send a call that will revert, past the gas estimate, and return its receipt."""
    call = getattr(token.contract.functions, method)(*args)
    tx_hash = token.transact(signer, call, gas=gas, wait=False)
    return ethereum.wait_for(token.w3, tx_hash)


def event_names(token, receipt) -> list[str]:
    """The names of the receipt's events, in log order (only this contract's)."""
    topics = {event_abi_to_log_topic(e): e["name"] for e in token.contract.abi if e["type"] == "event"}
    return [topics[bytes(log["topics"][0])] for log in receipt["logs"] if log["address"] == token.address]


def ok(receipt):
    assert receipt["status"] == 1
    return receipt


def balances(token, *addresses) -> list[int]:
    return [token.balance_of(a) for a in addresses]


def register(token, w3, sender, relayer_address, ttl=LONG):
    """Register a fresh random code; returns (code, expiry, receipt)."""
    code = new_code()
    expiry = now(w3) + ttl
    return code, expiry, ok(token.register(sender, code_hash(code), relayer_address, expiry))


def open_book(token, w3, sender, relayer_address, size, ttl=LONG):
    """Open a fresh book; `book.opener` remembers whose it is (books are keyed by (sender, root))."""
    book = BookSecrets.generate(size)
    book.opener = sender.address
    expiry = now(w3) + ttl
    return book, expiry, ok(token.open_book(sender, book.root, size, relayer_address, expiry))


def redeem_leaves(token, signer, book, indices, **kw):
    args = redemption_args(book.tree, {i: book.codes[i] for i in indices})
    return ok(token.redeem_book(signer, book.opener, book.root, *args, **kw))


# --- metadata -----------------------------------------------------------------------


def test_metadata(token, deployer, deployment):
    f = token.contract.functions
    assert f.name().call() == "BountyToken"
    assert f.symbol().call() == "BTK"
    assert f.decimals().call() == 18
    assert f.BOUNTY_AMOUNT().call() == 10**18 == TOKEN
    assert token.total_supply() == INITIAL_SUPPLY == token.balance_of(deployer.address)
    assert deployment[2]["status"] == 1 and token.is_genuine()


# --- single bounties: registration ------------------------------------------------------


def test_register_escrows_one_token_and_records_the_bounty(w3, token, new_account):
    sender, relayer = new_account(btk=3), new_account(eth=False)
    code, expiry, receipt = register(token, w3, sender, relayer.address)
    h = code_hash(code)

    assert balances(token, sender.address, token.address, relayer.address) == [2 * TOKEN, TOKEN, 0]
    info = token.bounty(sender.address, h)
    assert (info.sender, info.relayer, info.expiry, info.state) == (sender.address, relayer.address, expiry, "open")
    assert token.events(receipt, "BountyRegistered") == [
        {"codeHash": h, "sender": sender.address, "relayer": relayer.address, "amount": TOKEN, "expiry": expiry}
    ]
    assert token.events(receipt, "Transfer") == [{"from": sender.address, "to": token.address, "value": TOKEN}]
    assert token.bounty(sender.address, code_hash(new_code())).state == "none"


def test_register_same_hash_twice_reverts_bounty_exists(w3, token, new_account):
    sender, other, relayer = new_account(btk=2), new_account(btk=2), new_account(eth=False)
    code, expiry, _ = register(token, w3, sender, relayer.address)
    with reverts("BountyExists", codeHash=code_hash(code)):  # the sender may not re-bind its own hash
        token.register(sender, code_hash(code), other.address, expiry + 1)
    assert token.bounty(sender.address, code_hash(code)).relayer == relayer.address
    assert balances(token, sender.address, other.address, token.address) == [TOKEN, 2 * TOKEN, TOKEN]


def test_the_same_hash_from_another_sender_is_that_sender_s_own_bounty(w3, token, new_account):
    """Bounties are keyed by (sender, hash): a copy of Alice's registration is Mallory's own
    bounty, escrowed from Mallory, and leaves Alice's untouched (issue 10, defect 5)."""
    alice, mallory, relayer = new_account(btk=1), new_account(btk=1), new_account()
    code = new_code()
    expiry = now(w3) + LONG
    ok(token.register(mallory, code_hash(code), mallory.address, expiry))  # the copy, with herself as relayer
    ok(token.register(alice, code_hash(code), relayer.address, expiry))  # no BountyExists
    assert token.bounty(alice.address, code_hash(code)).relayer == relayer.address
    assert token.bounty(mallory.address, code_hash(code)).relayer == mallory.address
    receipt = ok(token.redeem(relayer, alice.address, code))
    assert token.events(receipt, "BountyRedeemed") == [
        {"codeHash": code_hash(code), "sender": alice.address, "relayer": relayer.address, "amount": TOKEN}]
    assert token.bounty(mallory.address, code_hash(code)).state == "open"
    assert balances(token, relayer.address, token.address, alice.address, mallory.address) == [TOKEN, TOKEN, 0, 0]


def test_register_zero_relayer_reverts_invalid_relayer(w3, token, new_account):
    sender = new_account(btk=1)
    code = new_code()
    with reverts("InvalidRelayer"):
        token.register(sender, code_hash(code), ZERO_ADDRESS, now(w3) + LONG)
    assert token.bounty(sender.address, code_hash(code)).state == "none"


@pytest.mark.parametrize("offset", [-3600, -1, 0])
def test_register_expiry_not_in_the_future_reverts_invalid_expiry(w3, token, new_account, offset):
    sender, relayer = new_account(btk=1), new_account(eth=False)
    expiry = now(w3) + offset  # offset 0: expiry == block.timestamp, which is already too late
    with reverts("InvalidExpiry", expiry=expiry):
        token.register(sender, code_hash(new_code()), relayer.address, expiry)
    assert token.balance_of(sender.address) == TOKEN


def test_register_without_tokens_reverts_insufficient_balance(w3, token, new_account):
    sender, relayer = new_account(btk=0), new_account(eth=False)
    code = new_code()
    with reverts("ERC20InsufficientBalance", sender=sender.address, balance=0, needed=TOKEN):
        token.register(sender, code_hash(code), relayer.address, now(w3) + LONG)
    assert token.bounty(sender.address, code_hash(code)).state == "none"  # the whole call rolled back


# --- single bounties: redemption ----------------------------------------------------------


def test_redeem_pays_the_relayer_not_the_caller(w3, token, new_account):
    sender, relayer, caller = new_account(btk=1), new_account(eth=False), new_account()
    code, _, _ = register(token, w3, sender, relayer.address)
    receipt = ok(token.redeem(caller, sender.address, code))

    assert balances(token, relayer.address, caller.address, sender.address, token.address) == [TOKEN, 0, 0, 0]
    assert token.bounty(sender.address, code_hash(code)).state == "redeemed"
    assert token.events(receipt, "BountyRedeemed") == [
        {"codeHash": code_hash(code), "sender": sender.address, "relayer": relayer.address, "amount": TOKEN}
    ]
    assert token.events(receipt, "Transfer") == [{"from": token.address, "to": relayer.address, "value": TOKEN}]


def test_redeem_twice_reverts_already_redeemed(w3, token, new_account):
    sender, relayer = new_account(btk=1), new_account()
    code, _, _ = register(token, w3, sender, relayer.address)
    ok(token.redeem(relayer, sender.address, code))
    with reverts("AlreadyRedeemed", codeHash=code_hash(code)):
        token.redeem(relayer, sender.address, code)
    # Forced past the gas estimate, the transaction is mined, fails and pays nothing.
    receipt = mined_failure(token, relayer, "redeemBounty", sender.address, code)
    assert receipt["status"] == 0
    assert receipt["logs"] == []
    assert balances(token, relayer.address, token.address) == [TOKEN, 0]


def test_explain_failure_recovers_the_custom_error_of_a_mined_failure(w3, token, new_account):
    sender, relayer = new_account(btk=1), new_account()
    code, _, _ = register(token, w3, sender, relayer.address)
    ok(token.redeem(relayer, sender.address, code))
    receipt = mined_failure(token, relayer, "redeemBounty", sender.address, code)
    assert receipt["status"] == 0
    err = token.explain_failure(token.contract.functions.redeemBounty(sender.address, code), relayer.address, receipt)
    assert isinstance(err, ethereum.ContractRevert), repr(err)
    assert (err.name, err.args_by_name) == ("AlreadyRedeemed", {"codeHash": code_hash(code)})


def test_redeem_unknown_code_reverts_unknown_bounty(token, new_account):
    caller = new_account()
    code = new_code()
    with reverts("UnknownBounty", codeHash=code_hash(code)):
        token.redeem(caller, caller.address, code)


def test_redeem_with_the_hash_instead_of_the_code_is_unknown(w3, token, new_account):
    # The hash is public (it is in the registration event); only the code pays.
    sender, relayer = new_account(btk=1), new_account()
    code, _, _ = register(token, w3, sender, relayer.address)
    with reverts("UnknownBounty", codeHash=code_hash(code_hash(code))):
        token.redeem(relayer, sender.address, code_hash(code))


def test_redeem_after_expiry_reverts_bounty_expired(w3, token, new_account):
    sender, relayer = new_account(btk=1), new_account()
    code, expiry, _ = register(token, w3, sender, relayer.address, ttl=SHORT)
    travel_to(w3, expiry)
    ok(token.redeem(relayer, sender.address, code))  # the expiry second itself still redeems...
    sender2 = new_account(btk=1)
    code2, expiry2, _ = register(token, w3, sender2, relayer.address, ttl=SHORT)
    travel_to(w3, expiry2 + 1)
    with reverts("BountyExpired", codeHash=code_hash(code2), expiry=expiry2):  # ...the next one does not
        token.redeem(relayer, sender2.address, code2)
    assert token.balance_of(relayer.address) == TOKEN
    assert token.bounty(sender2.address, code_hash(code2)).state == "open"


def test_front_running_a_redeem_gains_the_attacker_nothing(w3, tester, token, new_account):
    sender, relayer, attacker = new_account(btk=1), new_account(), new_account()
    code, _, _ = register(token, w3, sender, relayer.address)
    call = token.contract.functions.redeemBounty(sender.address, code)
    data = call._encode_transaction_data()
    tx = {"to": token.address, "data": data, "gas": 200_000, "value": 0}
    attacker_eth = w3.eth.get_balance(attacker.address)

    tester.disable_auto_mine_transactions()
    try:
        held = relayer.sign_only(dict(tx))  # the relayer's redeem, seen in the mempool
        attack_hash = attacker.send(dict(tx))  # copied and sent first
        victim_hash = w3.eth.send_raw_transaction(held)
        tester.mine_blocks()
    finally:
        tester.enable_auto_mine_transactions()

    attack = w3.eth.get_transaction_receipt(attack_hash)
    victim = w3.eth.get_transaction_receipt(victim_hash)
    assert attack["blockNumber"] == victim["blockNumber"]
    assert attack["transactionIndex"] < victim["transactionIndex"]
    assert attack["status"] == 1 and victim["status"] == 0
    # The attacker's "win" paid the relayer; the attacker only burnt gas.
    assert token.events(attack, "BountyRedeemed")[0]["relayer"] == relayer.address
    assert token.balance_of(attacker.address) == 0
    assert w3.eth.get_balance(attacker.address) < attacker_eth
    assert balances(token, relayer.address, token.address) == [TOKEN, 0]


# --- single bounties: refunds -------------------------------------------------------------


def test_refund_before_expiry_reverts_not_expired(w3, token, new_account):
    sender, relayer = new_account(btk=1), new_account(eth=False)
    code, expiry, _ = register(token, w3, sender, relayer.address, ttl=SHORT)
    travel_to(w3, expiry)  # at the expiry second the relayer may still redeem, so no refund yet
    with reverts("NotExpired", key=code_hash(code), expiry=expiry):
        token.refund(sender, sender.address, code_hash(code))
    assert token.balance_of(sender.address) == 0


def test_refund_after_expiry_pays_the_sender_whoever_calls(w3, token, new_account):
    sender, relayer, stranger = new_account(btk=1), new_account(), new_account()
    code, expiry, _ = register(token, w3, sender, relayer.address, ttl=SHORT)
    travel_to(w3, expiry + 1)
    receipt = ok(token.refund(stranger, sender.address, code_hash(code)))
    assert balances(token, sender.address, stranger.address, token.address) == [TOKEN, 0, 0]
    assert token.events(receipt, "BountyRefunded") == [
        {"codeHash": code_hash(code), "sender": sender.address, "amount": TOKEN}
    ]
    assert token.bounty(sender.address, code_hash(code)).state == "refunded"

    with reverts("AlreadyRefunded", codeHash=code_hash(code)):
        token.refund(sender, sender.address, code_hash(code))
    with reverts("AlreadyRefunded", codeHash=code_hash(code)):
        token.redeem(relayer, sender.address, code)
    assert balances(token, sender.address, relayer.address) == [TOKEN, 0]


def test_refund_after_redeem_reverts_already_redeemed(w3, token, new_account):
    sender, relayer = new_account(btk=1), new_account()
    code, expiry, _ = register(token, w3, sender, relayer.address, ttl=SHORT)
    ok(token.redeem(relayer, sender.address, code))
    travel_to(w3, expiry + 1)
    with reverts("AlreadyRedeemed", codeHash=code_hash(code)):
        token.refund(sender, sender.address, code_hash(code))
    assert balances(token, sender.address, relayer.address) == [0, TOKEN]


def test_refund_unknown_reverts_unknown_bounty(token, new_account):
    h = code_hash(new_code())
    caller = new_account()
    with reverts("UnknownBounty", codeHash=h):
        token.refund(caller, caller.address, h)


# --- many bounties at once ----------------------------------------------------------------


def test_thirty_open_bounties_redeemed_in_shuffled_order(w3, token, new_account):
    rng = random.Random(secrets.randbits(64))
    senders = [new_account(btk=10) for _ in range(3)]
    relayers = [new_account(eth=False) for _ in range(2)]
    issued = []
    for sender in senders:
        for _ in range(10):
            relayer = rng.choice(relayers)
            code, _, _ = register(token, w3, sender, relayer.address)
            issued.append((code, relayer.address, sender.address))
    assert token.balance_of(token.address) == 30 * TOKEN
    assert [token.balance_of(s.address) for s in senders] == [0, 0, 0]

    rng.shuffle(issued)
    for code, _, owner in issued:
        ok(token.redeem(rng.choice(senders), owner, code))
    expected = Counter(relayer for _, relayer, _ in issued)
    assert {r.address: token.balance_of(r.address) for r in relayers} == {
        r.address: expected[r.address] * TOKEN for r in relayers
    }
    assert token.balance_of(token.address) == 0
    assert all(token.bounty(owner, code_hash(code)).state == "redeemed" for code, _, owner in issued)


# --- batches --------------------------------------------------------------------------------


def test_redeem_batch_pays_valid_codes_once_and_skips_the_rest(w3, token, new_account):
    sender, caller = new_account(btk=10), new_account()
    r1, r2 = new_account(eth=False), new_account(eth=False)
    valid1, _, _ = register(token, w3, sender, r1.address)
    valid2, _, _ = register(token, w3, sender, r1.address)
    valid3, _, _ = register(token, w3, sender, r2.address)
    spent, _, _ = register(token, w3, sender, r1.address)
    expired, _, _ = register(token, w3, sender, r2.address, ttl=SHORT)
    refunded, expiry, _ = register(token, w3, sender, r1.address, ttl=SHORT)
    unknown = new_code()
    ok(token.redeem(caller, sender.address, spent))
    travel_to(w3, expiry + 1)
    ok(token.refund(caller, sender.address, code_hash(refunded)))
    before = balances(token, r1.address, r2.address, token.address, sender.address)
    assert before == [TOKEN, 0, 4 * TOKEN, 5 * TOKEN]

    batch = [valid1, spent, unknown, valid2, expired, refunded, valid1, valid3, valid3]
    assert token.contract.functions.redeemBatch([sender.address] * len(batch), batch).call({"from": caller.address}) == 3
    receipt = ok(token.redeem_batch(caller, [sender.address] * len(batch), batch))

    assert [(e["codeHash"], e["relayer"]) for e in token.events(receipt, "BountyRedeemed")] == [
        (code_hash(valid1), r1.address), (code_hash(valid2), r1.address), (code_hash(valid3), r2.address)
    ]
    assert [(e["codeHash"], e["reason"]) for e in token.events(receipt, "BountySkipped")] == [
        (code_hash(spent), SKIP_REDEEMED),
        (code_hash(unknown), SKIP_UNKNOWN),
        (code_hash(expired), SKIP_EXPIRED),
        (code_hash(refunded), SKIP_REFUNDED),
        (code_hash(valid1), SKIP_REDEEMED),  # repeated within the batch
        (code_hash(valid3), SKIP_REDEEMED),
    ]
    assert balances(token, r1.address, r2.address, token.address, sender.address) == [
        3 * TOKEN, TOKEN, TOKEN, 5 * TOKEN  # only the expired bounty is still escrowed
    ]
    assert token.balance_of(caller.address) == 0
    assert token.bounty(sender.address, code_hash(expired)).state == "open"  # skipped, still refundable
    # The same batch again pays nothing.
    again = ok(token.redeem_batch(caller, [sender.address] * len(batch), batch))
    assert token.events(again, "BountyRedeemed") == [] and token.events(again, "Transfer") == []
    assert len(token.events(again, "BountySkipped")) == len(batch)


def test_redeem_batch_alternating_relayers_pays_each_its_own(w3, token, new_account):
    sender, caller = new_account(btk=7), new_account()
    r1, r2 = new_account(eth=False), new_account(eth=False)
    owners = [r1, r2, r1, r1, r2, r2, r1]
    codes = [register(token, w3, sender, r.address)[0] for r in owners]
    receipt = ok(token.redeem_batch(caller, [sender.address] * len(codes), codes))
    assert balances(token, r1.address, r2.address, token.address) == [4 * TOKEN, 3 * TOKEN, 0]
    # Consecutive codes of one relayer are paid in one transfer.
    transfers = [(t["to"], t["value"]) for t in token.events(receipt, "Transfer")]
    assert transfers == [(r1.address, TOKEN), (r2.address, TOKEN), (r1.address, 2 * TOKEN),
                         (r2.address, 2 * TOKEN), (r1.address, TOKEN)]


def test_redeem_batch_empty_does_nothing(token, new_account):
    receipt = ok(token.redeem_batch(new_account(), [], []))
    assert receipt["logs"] == []


# --- books ----------------------------------------------------------------------------------


def test_open_book_escrows_size_tokens(w3, token, new_account):
    sender, relayer = new_account(btk=10), new_account(eth=False)
    book, expiry, receipt = open_book(token, w3, sender, relayer.address, 7)
    assert balances(token, sender.address, token.address) == [3 * TOKEN, 7 * TOKEN]
    info = token.book(sender.address, book.root)
    assert (info.sender, info.relayer, info.expiry, info.size, info.spent, info.refunded) == (
        sender.address, relayer.address, expiry, 7, 0, False)
    assert token.events(receipt, "BookOpened") == [
        {"root": book.root, "sender": sender.address, "relayer": relayer.address, "size": 7, "expiry": expiry}
    ]


def test_open_book_errors(w3, token, new_account):
    sender, other, relayer = new_account(btk=5), new_account(btk=5), new_account(eth=False)
    book = BookSecrets.generate(3)
    later = now(w3) + LONG
    with reverts("EmptyBook"):
        token.open_book(sender, book.root, 0, relayer.address, later)
    with reverts("InvalidRelayer"):
        token.open_book(sender, book.root, 3, ZERO_ADDRESS, later)
    with reverts("InvalidExpiry", expiry=now(w3)):
        token.open_book(sender, book.root, 3, relayer.address, now(w3))
    with reverts("ERC20InsufficientBalance", sender=sender.address, balance=5 * TOKEN, needed=6 * TOKEN):
        token.open_book(sender, book.root, 6, relayer.address, later)
    ok(token.open_book(sender, book.root, 3, relayer.address, later))
    with reverts("BookExists", root=book.root):  # a sender's roots are fresh among its own books
        token.open_book(sender, book.root, 1, other.address, later)
    assert balances(token, sender.address, other.address, token.address) == [2 * TOKEN, 5 * TOKEN, 3 * TOKEN]


def test_a_front_run_open_book_no_longer_blocks_the_victim(w3, tester, token, new_account):
    """Issue 10, defect 5: Mallory copies Alice's pending openBook (same root) and gets it mined
    first. Books are keyed by (sender, root): Mallory escrowed her own tokens into her own book,
    Alice's transaction succeeds, and the relayer redeems Alice's leaves from Alice's book."""
    alice, mallory, relayer = new_account(btk=4), new_account(btk=4), new_account()
    book = BookSecrets.generate(4)
    book.opener = alice.address
    expiry = now(w3) + LONG
    call = token.contract.functions.openBook(book.root, 4, relayer.address, expiry)
    tx = {"to": token.address, "data": call._encode_transaction_data(), "gas": 300_000, "value": 0}
    tester.disable_auto_mine_transactions()
    try:
        held = alice.sign_only(dict(tx))  # Alice's openBook, seen in the mempool
        copy_hash = mallory.send(dict(tx))  # copied and sent first
        victim_hash = w3.eth.send_raw_transaction(held)
        tester.mine_blocks()
    finally:
        tester.enable_auto_mine_transactions()
    copy, victim = w3.eth.get_transaction_receipt(copy_hash), w3.eth.get_transaction_receipt(victim_hash)
    assert copy["transactionIndex"] < victim["transactionIndex"]
    assert copy["status"] == 1 and victim["status"] == 1  # before: the victim's reverted BookExists
    assert token.book(alice.address, book.root).size == token.book(mallory.address, book.root).size == 4
    assert balances(token, alice.address, mallory.address, token.address) == [0, 0, 8 * TOKEN]
    redeem_leaves(token, relayer, book, [0, 1])
    assert token.book(alice.address, book.root).spent == 2 and token.book(mallory.address, book.root).spent == 0
    assert token.balance_of(relayer.address) == 2 * TOKEN


def test_redeem_book_subset_pays_the_relayer_per_leaf(w3, token, new_account):
    sender, relayer, caller = new_account(btk=20), new_account(eth=False), new_account()
    book, _, _ = open_book(token, w3, sender, relayer.address, 20)
    subset = [17, 3, 8, 0, 19, 11]
    receipt = redeem_leaves(token, caller, book, subset)
    assert token.events(receipt, "BookRedeemed") == [
        {"root": book.root, "sender": sender.address, "relayer": relayer.address, "paid": 6, "skipped": 0}
    ]
    assert balances(token, relayer.address, caller.address, token.address) == [6 * TOKEN, 0, 14 * TOKEN]
    assert [i for i in range(20) if token.is_leaf_spent(sender.address, book.root, i)] == sorted(subset)
    assert token.book(sender.address, book.root).spent == 6


def test_redeem_book_single_leaf_and_whole_book(w3, token, new_account):
    sender, relayer = new_account(btk=9), new_account()
    one, _, _ = open_book(token, w3, sender, relayer.address, 1)  # root == the only leaf, empty proof
    nothing = redeem_leaves(token, relayer, one, [])  # OZ's empty multiproof: proof = [root]
    assert token.events(nothing, "BookRedeemed")[0]["paid"] == 0 and token.balance_of(relayer.address) == 0
    redeem_leaves(token, relayer, one, [0])
    full, _, _ = open_book(token, w3, sender, relayer.address, 8)
    receipt = redeem_leaves(token, relayer, full, range(8))
    assert token.events(receipt, "BookRedeemed")[0]["paid"] == 8
    assert balances(token, relayer.address, token.address) == [9 * TOKEN, 0]


def _tampered(book, indices, how):
    args = list(redemption_args(book.tree, {i: book.codes[i] for i in indices}))
    _, codes, proof, flags = args
    if how == "proof":
        proof[1] = bytes([proof[1][0] ^ 1]) + proof[1][1:]
    elif how == "code":
        codes[2] = new_code()
    elif how == "swapped codes":  # right codes, wrong leaves
        codes[0], codes[1] = codes[1], codes[0]
    elif how == "random proof":
        proof[:] = [new_code() for _ in proof]
    return args


@pytest.mark.parametrize("how", ["proof", "code", "swapped codes", "random proof"])
def test_redeem_book_with_bad_proof_reverts_invalid_book_proof(w3, token, new_account, how):
    sender, relayer = new_account(btk=16), new_account()
    book, _, _ = open_book(token, w3, sender, relayer.address, 16)
    indices, codes, proof, flags = _tampered(book, [1, 6, 9, 14], how)
    leaves = [leaf_hash(i, c) for i, c in zip(indices, codes)]
    assert not MerkleTree.verify_multiproof(book.root, leaves, proof, flags)  # Python agrees with the EVM
    with reverts("InvalidBookProof", root=book.root):
        token.redeem_book(relayer, sender.address, book.root, indices, codes, proof, flags)
    assert token.balance_of(relayer.address) == 0 and token.book(sender.address, book.root).spent == 0


def test_redeem_book_with_a_flipped_flag_reverts(w3, token, new_account):
    sender, relayer = new_account(btk=16), new_account()
    book, _, _ = open_book(token, w3, sender, relayer.address, 16)
    indices, codes, proof, flags = redemption_args(book.tree, {i: book.codes[i] for i in (1, 6, 9, 14)})
    k = flags.index(False)
    bad = flags[:k] + [True] + flags[k + 1:]  # one proof hash too many: OZ's own shape check fails
    with reverts("MerkleProofInvalidMultiproof"):
        token.redeem_book(relayer, sender.address, book.root, indices, codes, proof, bad)
    with reverts("MerkleProofInvalidMultiproof"):  # a leaf short of what the flags need
        token.redeem_book(relayer, sender.address, book.root, indices[1:], codes[1:], proof, flags)
    # True -> False asks for one proof hash more than there is: OZ indexes past
    # the calldata array and the EVM panics (Panic(0x32), not a custom error,
    # so the wrapper reports a plain ChainError).
    k = flags.index(True)
    with pytest.raises(ethereum.ChainError):
        token.redeem_book(relayer, sender.address, book.root, indices, codes, proof, flags[:k] + [False] + flags[k + 1:])
    assert token.balance_of(relayer.address) == 0


def test_redeem_book_index_out_of_range(w3, token, new_account):
    sender, relayer = new_account(btk=4), new_account()
    book, _, _ = open_book(token, w3, sender, relayer.address, 4)
    for index in (4, 2**255):
        with reverts("LeafOutOfRange", root=book.root, index=index):
            token.redeem_book(relayer, sender.address, book.root, [index], [new_code()], [], [])


def test_redeem_book_a_tree_bigger_than_its_size_cannot_pay_beyond_size(w3, token, new_account):
    # A sender may commit more leaves than it escrows; leaves past `size`
    # are refused even with a valid proof.
    sender, relayer = new_account(btk=3), new_account()
    secrets_ = BookSecrets.generate(5)
    ok(token.open_book(sender, secrets_.root, 3, relayer.address, now(w3) + LONG))
    secrets_.opener = sender.address
    indices, codes, proof, flags = redemption_args(secrets_.tree, {4: secrets_.codes[4]})
    with reverts("LeafOutOfRange", root=secrets_.root, index=4):
        token.redeem_book(relayer, sender.address, secrets_.root, indices, codes, proof, flags)
    redeem_leaves(token, relayer, secrets_, [0, 2])
    assert token.balance_of(relayer.address) == 2 * TOKEN


def test_redeem_book_unknown_root_and_length_mismatch(w3, token, new_account):
    sender, relayer = new_account(btk=3), new_account()
    ghost = BookSecrets.generate(3)
    args = redemption_args(ghost.tree, {0: ghost.codes[0]})
    with reverts("UnknownBook", root=ghost.root):
        token.redeem_book(relayer, sender.address, ghost.root, *args)
    book, _, _ = open_book(token, w3, sender, relayer.address, 3)
    indices, codes, proof, flags = redemption_args(book.tree, {0: book.codes[0], 1: book.codes[1]})
    with reverts("LengthMismatch"):
        token.redeem_book(relayer, sender.address, book.root, indices, codes[:1], proof, flags)


def test_redeem_book_same_index_twice_in_one_batch_pays_once(w3, token, new_account):
    sender, relayer = new_account(btk=6), new_account()
    # An honest tree holds each leaf once, so a repeated index cannot be proven at all.
    book, _, _ = open_book(token, w3, sender, relayer.address, 4)
    _, _, proof, flags = redemption_args(book.tree, {2: book.codes[2]})
    # (The shape fits -- 2 leaves + p hashes, p+1 flags -- but the root does not.)
    with reverts("InvalidBookProof", root=book.root):
        token.redeem_book(relayer, sender.address, book.root, [2, 2], [book.codes[2]] * 2, proof, flags + [True])
    assert token.balance_of(relayer.address) == 0

    # A sender can commit a tree that holds leaf 0 twice (positions 0 and 2);
    # a valid multiproof then names index 0 twice, and the bitmap pays it once.
    c0, c1 = new_code(), new_code()
    tree = MerkleTree([leaf_hash(0, c0), leaf_hash(1, c1), leaf_hash(0, c0)])
    tree.opener = sender.address
    ok(token.open_book(sender, tree.root, 2, relayer.address, now(w3) + LONG))
    positions, proof, flags = tree.multiproof([0, 2])
    assert positions == [0, 2]
    receipt = ok(token.redeem_book(relayer, sender.address, tree.root, [0, 0], [c0, c0], proof, flags))
    assert token.events(receipt, "BookRedeemed") == [
        {"root": tree.root, "sender": sender.address, "relayer": relayer.address, "paid": 1, "skipped": 1}
    ]
    assert token.balance_of(relayer.address) == TOKEN
    assert token.book(sender.address, tree.root).spent == 1


def test_redeem_book_across_batches_never_pays_a_leaf_twice(w3, token, new_account):
    sender, relayer = new_account(btk=10), new_account()
    book, _, _ = open_book(token, w3, sender, relayer.address, 10)
    redeem_leaves(token, relayer, book, [1, 2, 3])
    again = redeem_leaves(token, relayer, book, [1, 2, 3])
    assert token.events(again, "BookRedeemed") == [
        {"root": book.root, "sender": sender.address, "relayer": relayer.address, "paid": 0, "skipped": 3}
    ]
    assert token.events(again, "Transfer") == []
    overlap = redeem_leaves(token, relayer, book, [2, 3, 4, 9])
    assert token.events(overlap, "BookRedeemed")[0]["paid"] == 2
    assert token.events(overlap, "BookRedeemed")[0]["skipped"] == 2
    assert balances(token, relayer.address, token.address) == [5 * TOKEN, 5 * TOKEN]
    assert token.book(sender.address, book.root).spent == 5


def test_redeem_book_after_expiry_pays_nothing(w3, token, new_account):
    sender, relayer = new_account(btk=5), new_account()
    book, expiry, _ = open_book(token, w3, sender, relayer.address, 5, ttl=SHORT)
    travel_to(w3, expiry + 1)
    receipt = redeem_leaves(token, relayer, book, [0, 4])
    assert token.events(receipt, "BookRedeemed") == [
        {"root": book.root, "sender": sender.address, "relayer": relayer.address, "paid": 0, "skipped": 2}
    ]
    assert token.events(receipt, "Transfer") == []
    assert token.balance_of(relayer.address) == 0
    assert not token.is_leaf_spent(sender.address, book.root, 0) and token.book(sender.address, book.root).spent == 0


def test_refund_book_before_expiry_reverts_not_expired(w3, token, new_account):
    sender, relayer = new_account(btk=2), new_account(eth=False)
    book, expiry, _ = open_book(token, w3, sender, relayer.address, 2, ttl=SHORT)
    travel_to(w3, expiry)
    with reverts("NotExpired", key=book.root, expiry=expiry):
        token.refund_book(sender, sender.address, book.root)
    ghost = code_hash(new_code())
    with reverts("UnknownBook", root=ghost):
        token.refund_book(sender, sender.address, ghost)


def test_refund_book_after_partial_redemption_returns_exactly_the_unspent(w3, token, new_account):
    sender, relayer, stranger = new_account(btk=12), new_account(), new_account()
    book, expiry, _ = open_book(token, w3, sender, relayer.address, 12, ttl=SHORT)
    redeem_leaves(token, relayer, book, [0, 5, 11])
    redeem_leaves(token, relayer, book, [5, 6])
    travel_to(w3, expiry + 1)
    receipt = ok(token.refund_book(stranger, sender.address, book.root))
    assert token.events(receipt, "BookRefunded") == [
        {"root": book.root, "sender": sender.address, "amount": 8 * TOKEN}
    ]
    assert balances(token, sender.address, relayer.address, stranger.address, token.address) == [
        8 * TOKEN, 4 * TOKEN, 0, 0]
    assert token.book(sender.address, book.root).refunded
    with reverts("BookAlreadyRefunded", root=book.root):
        token.refund_book(sender, sender.address, book.root)
    late = redeem_leaves(token, relayer, book, [1, 2])  # refunded leaves can't be paid any more
    assert token.events(late, "BookRedeemed")[0]["paid"] == 0
    assert balances(token, sender.address, relayer.address) == [8 * TOKEN, 4 * TOKEN]


def test_refund_book_twice_reverts_book_already_refunded(w3, token, new_account):
    sender, relayer, stranger = new_account(btk=4), new_account(), new_account()
    book, expiry, _ = open_book(token, w3, sender, relayer.address, 4, ttl=SHORT)
    redeem_leaves(token, relayer, book, [1])
    travel_to(w3, expiry + 1)
    ok(token.refund_book(stranger, sender.address, book.root))
    assert balances(token, sender.address, token.address) == [3 * TOKEN, 0]

    # Its own error naming the root, not the single-bounty AlreadyRefunded(codeHash).
    for who in (sender, stranger):
        with reverts("BookAlreadyRefunded", root=book.root):
            token.refund_book(who, sender.address, book.root)
    # Forced past the gas estimate, the second refund is mined, fails, moves nothing,
    # and the wrapper recovers the same error from the receipt.
    receipt = mined_failure(token, stranger, "refundBook", sender.address, book.root)
    assert receipt["status"] == 0 and receipt["logs"] == []
    err = token.explain_failure(token.contract.functions.refundBook(sender.address, book.root), stranger.address, receipt)
    assert isinstance(err, ethereum.ContractRevert), repr(err)
    assert (err.name, err.args_by_name) == ("BookAlreadyRefunded", {"root": book.root})
    assert str(err) == f"BookAlreadyRefunded(root=0x{book.root.hex()})"
    assert balances(token, sender.address, relayer.address, stranger.address, token.address) == [
        3 * TOKEN, TOKEN, 0, 0]
    assert token.book(sender.address, book.root).refunded and token.book(sender.address, book.root).spent == 1


def test_refund_book_fully_spent_returns_nothing(w3, token, new_account):
    sender, relayer = new_account(btk=3), new_account()
    book, expiry, _ = open_book(token, w3, sender, relayer.address, 3, ttl=SHORT)
    redeem_leaves(token, relayer, book, [0, 1, 2])
    travel_to(w3, expiry + 1)
    receipt = ok(token.refund_book(sender, sender.address, book.root))
    assert token.events(receipt, "BookRefunded")[0]["amount"] == 0
    assert token.events(receipt, "Transfer") == []
    assert balances(token, sender.address, relayer.address) == [0, 3 * TOKEN]


# --- reentrancy -----------------------------------------------------------------------------


def _runtime_opcodes(deployed_hex: str) -> Counter:
    """Opcodes of the runtime code, skipping PUSH data and the CBOR metadata tail."""
    code = bytes.fromhex(deployed_hex.removeprefix("0x"))
    code = code[: -(int.from_bytes(code[-2:], "big") + 2)]
    ops, i = Counter(), 0
    while i < len(code):
        op = code[i]
        ops[op] += 1
        i += 1 + (op - 0x5F if 0x60 <= op <= 0x7F else 0)
    return ops


def test_runtime_code_makes_no_external_calls(w3, token):
    """Reentrancy needs a call out of the contract. BountyToken's runtime code
    contains no CALL, CALLCODE, DELEGATECALL, STATICCALL, CREATE, CREATE2 or
    SELFDESTRUCT opcode at all, so no redeem or refund can hand control to
    anyone. (Its token moves are internal _transfer bookkeeping.)"""
    deployed = "0x" + w3.eth.get_code(token.address).hex().removeprefix("0x")
    assert deployed == token.artifact["deployedBytecode"]
    ops = _runtime_opcodes(deployed)
    assert ops[0x55] > 0 and ops[0xA3] + ops[0xA4] > 0  # sanity: SSTORE and LOG3/LOG4 were found
    forbidden = {0xF0: "CREATE", 0xF1: "CALL", 0xF2: "CALLCODE", 0xF4: "DELEGATECALL",
                 0xF5: "CREATE2", 0xFA: "STATICCALL", 0xFF: "SELFDESTRUCT"}
    assert {name: ops[op] for op, name in forbidden.items() if ops[op]} == {}


def test_state_change_is_logged_before_any_token_moves(w3, token, new_account):
    """Checks-effects-interactions, as far as a receipt can show it: in every
    paying function the event that records the new state (BountyRedeemed,
    BookRedeemed, BountyRefunded, BookRefunded) is emitted before the Transfer
    that moves the tokens, and the source emits it right after the state write.
    This is an ordering check on the logs, not a reentrancy attack: with no
    external calls (previous test) there is nothing to reenter through."""
    sender, relayer = new_account(btk=10), new_account()
    single, _, _ = register(token, w3, sender, relayer.address)
    batch = [register(token, w3, sender, relayer.address)[0] for _ in range(2)]
    refundable, expiry, _ = register(token, w3, sender, relayer.address, ttl=SHORT)
    book, _, _ = open_book(token, w3, sender, relayer.address, 3, ttl=SHORT)

    assert event_names(token, ok(token.redeem(relayer, sender.address, single))) == ["BountyRedeemed", "Transfer"]
    assert event_names(token, ok(token.redeem_batch(relayer, [sender.address] * len(batch), batch))) == [
        "BountyRedeemed", "BountyRedeemed", "Transfer"]
    assert event_names(token, redeem_leaves(token, relayer, book, [0, 2])) == ["BookRedeemed", "Transfer"]
    travel_to(w3, expiry + 1)
    assert event_names(token, ok(token.refund(sender, sender.address, code_hash(refundable)))) == ["BountyRefunded", "Transfer"]
    assert event_names(token, ok(token.refund_book(sender, sender.address, book.root))) == ["BookRefunded", "Transfer"]
    assert token.bounty(sender.address, code_hash(single)).state == "redeemed"
    assert token.book(sender.address, book.root).spent == 2


# --- random operation sequences against a Python model ----------------------------------------

bytes32 = st.binary(min_size=32, max_size=32)


@dataclass
class ModelBounty:
    sender: str
    relayer: str
    expiry: int
    state: str = "open"


@dataclass
class ModelBook:
    secrets: BookSecrets
    sender: str
    relayer: str
    expiry: int
    spent: set = field(default_factory=set)
    refunded: bool = False


@dataclass
class MachineEnv:
    w3: object
    token: ethereum.BountyToken
    deployer_address: str
    sender_keys: list
    relayer_keys: list
    balances: dict  # address -> BTK balance at the start of every example


class BountyMachine(RuleBasedStateMachine):
    """Random single-bounty and book operations by 3 senders and 2 relayers, over every
    payment path (register, redeem, redeemBatch, refund, openBook, redeemBook, refundBook,
    expiry, and copies of another sender's hash or root), checked step by step against a
    Python model keyed like the contract: (sender, code) and (sender, root). Every example
    starts from one snapshot of the shared deployment and is rewound in teardown(), which
    first settles everything: past every expiry, each bounty and book still open is refunded,
    and then every bounty must have ended redeemed by its relayer or refunded to its sender,
    the escrow must be empty and the supply whole.

    Where the model expects a revert, the call goes through the wrapper's gas
    estimate, which raises the custom error; where it expects success, the
    transaction is sent with a fixed gas limit (no estimate: half the cost)
    and must be mined with status 1."""

    env: MachineEnv = None  # set by the test before running

    def __init__(self):
        super().__init__()
        env = self.env
        self.w3, self.token = env.w3, env.token
        self.tester = self.w3.provider.ethereum_tester
        self.snapshot = self.tester.take_snapshot()
        # Fresh Signers: their cached nonces must not outlive a snapshot.
        self.senders = [ethereum.Signer(self.w3, k) for k in env.sender_keys]
        self.relayers = [ethereum.Signer(self.w3, k) for k in env.relayer_keys]
        self.balances = dict(env.balances)
        self.bounties: dict[tuple[str, bytes], ModelBounty] = {}  # (sender, code) -> bounty
        self.books: dict[tuple[str, bytes], ModelBook] = {}  # (sender, root) -> book
        self.paid_codes = Counter()  # (sender, code hash) -> BountyRedeemed events seen
        self.paid_to: dict[tuple[str, bytes], str] = {}  # (sender, code hash) -> relayer the event named
        self.paid_leaves = Counter()  # (sender, root) -> leaves paid, from BookRedeemed events
        self.touched: set[str] = set()  # accounts a step may have changed, checked after it

    def teardown(self):
        try:
            self.settle()
            # Every account that ever held BTK, read once per example (each
            # balanceOf costs an EVM call; steps only re-read what they touched).
            chain = {a: self.token.balance_of(a) for a in self.balances}
            assert chain == self.balances
            assert sum(chain.values()) == self.token.total_supply() == INITIAL_SUPPLY
            assert chain[self.token.address] == 0  # nothing is left in escrow
        finally:
            self.tester.revert_to_snapshot(self.snapshot)

    def settle(self):
        """Past every expiry, refund whatever is still open; then every bounty has ended
        redeemed (paid to its own relayer, once) or refunded (to its own sender)."""
        latest = max([b.expiry for b in self.bounties.values()] + [m.expiry for m in self.books.values()]
                     + [self.now()])
        travel_to(self.w3, latest + 1)
        caller = self.relayers[0]
        for (sender, code), b in self.bounties.items():
            if b.state == "open":
                ok(self.token.refund(caller, sender, code_hash(code), gas=GAS))
                b.state = "refunded"
                self.move(self.token.address, sender, TOKEN)
        for (sender, root), m in self.books.items():
            if not m.refunded:
                ok(self.token.refund_book(caller, sender, root, gas=GAS))
                m.refunded = True
                self.move(self.token.address, sender, (m.secrets.size - len(m.spent)) * TOKEN)
        # The chain agrees: every balance matches the model (teardown) and the escrow is empty.
        for (sender, code), b in self.bounties.items():
            if b.state == "redeemed":
                assert self.paid_to[(sender, code_hash(code))] == b.relayer
            else:
                assert b.state == "refunded" and (sender, code_hash(code)) not in self.paid_to
        for key, m in self.books.items():
            assert m.refunded and len(m.spent) == self.paid_leaves[key]

    # helpers

    def now(self):
        return now(self.w3)

    def pick_caller(self, data):
        caller = data.draw(st.sampled_from(self.senders + self.relayers), label="caller")
        self.touched.add(caller.address)  # a buggy contract might pay the caller
        return caller

    def move(self, frm, to, amount):
        self.balances[frm] -= amount
        self.balances[to] += amount
        self.touched |= {frm, to}

    def known_or_fresh_key(self, data) -> tuple[str, bytes]:
        """Mostly a registered (sender, code) (any state); sometimes a registered code under
        another sender (unknown there), sometimes a code never registered."""
        choice = data.draw(st.integers(0, 4), label="known?")
        if self.bounties and choice <= 2:
            return data.draw(st.sampled_from(list(self.bounties)), label="key")
        if self.bounties and choice == 3:
            _, code = data.draw(st.sampled_from(list(self.bounties)), label="key")
            sender = data.draw(st.sampled_from(self.senders), label="other sender").address
            return sender, code
        return data.draw(st.sampled_from(self.senders), label="sender").address, data.draw(bytes32, label="code")

    @initialize(codes=st.lists(bytes32, min_size=2, max_size=2, unique=True),
                book_codes=st.lists(bytes32, min_size=2, max_size=3), leaf=st.integers(0, 1))
    def seed(self, codes, book_codes, leaf):
        """Start every example with a short- and a long-lived bounty (one per
        relayer), the first one copied by another sender, and a short-lived book with
        one leaf already paid, so that the other rules have something to redeem, expire
        and refund (in part) within a dozen steps."""
        self.register(0, 0, True, codes[0])
        self.register(1, 0, True, codes[0])  # the same hash from another sender: its own bounty
        self.register(1, 1, False, codes[1])
        self.open_book(2, 0, True, book_codes)
        (book,) = self.books.values()
        self.spend_leaves(book, [leaf], self.relayers[0])

    # single bounties

    @rule(s=st.integers(0, 2), r=st.integers(0, 1), short=st.booleans(), code=bytes32)
    def register(self, s, r, short, code):
        sender, relayer = self.senders[s], self.relayers[r]
        self.touched |= {sender.address, relayer.address}
        expiry = self.now() + (200 if short else 5000)
        h = code_hash(code)
        key = (sender.address, code)
        if key in self.bounties:
            with reverts("BountyExists", codeHash=h):
                self.token.register(sender, h, relayer.address, expiry)
        elif self.balances[sender.address] < TOKEN:
            with reverts("ERC20InsufficientBalance", sender=sender.address,
                         balance=self.balances[sender.address], needed=TOKEN):
                self.token.register(sender, h, relayer.address, expiry)
        else:
            ok(self.token.register(sender, h, relayer.address, expiry, gas=GAS))
            self.bounties[key] = ModelBounty(sender.address, relayer.address, expiry)
            self.move(sender.address, self.token.address, TOKEN)

    @precondition(lambda self: self.bounties)
    @rule(data=st.data(), s=st.integers(0, 2), r=st.integers(0, 1), short=st.booleans())
    def register_a_copy(self, data, s, r, short):
        """Someone registers a hash another sender already registered (a front-run copy)."""
        _, code = data.draw(st.sampled_from(list(self.bounties)), label="copied")
        self.register(s, r, short, code)

    @precondition(lambda self: self.bounties)
    @rule(data=st.data())
    def redeem(self, data):
        sender, code = self.known_or_fresh_key(data)
        caller = self.pick_caller(data)
        h, b = code_hash(code), self.bounties.get((sender, code))
        if b is None:
            with reverts("UnknownBounty", codeHash=h):
                self.token.redeem(caller, sender, code)
        elif b.state == "redeemed":
            with reverts("AlreadyRedeemed", codeHash=h):
                self.token.redeem(caller, sender, code)
        elif b.state == "refunded":
            with reverts("AlreadyRefunded", codeHash=h):
                self.token.redeem(caller, sender, code)
        elif self.now() > b.expiry:
            with reverts("BountyExpired", codeHash=h, expiry=b.expiry):
                self.token.redeem(caller, sender, code)
        else:
            receipt = ok(self.token.redeem(caller, sender, code, gas=GAS))
            self.record_paid(receipt)
            b.state = "redeemed"
            self.move(self.token.address, b.relayer, TOKEN)

    def record_paid(self, receipt):
        events = self.token.events(receipt, "BountyRedeemed")
        for e in events:
            self.paid_codes[(e["sender"], e["codeHash"])] += 1
            self.paid_to[(e["sender"], e["codeHash"])] = e["relayer"]
        return events

    @rule(data=st.data())
    def redeem_batch(self, data):
        n = data.draw(st.integers(0, 6), label="batch size")
        keys = [self.known_or_fresh_key(data) for _ in range(n)]
        caller = self.pick_caller(data)
        t = self.now()
        expect_paid, expect_skipped = [], []
        for sender, code in keys:  # the contract's rules, in order, on a scratch state
            h, b = code_hash(code), self.bounties.get((sender, code))
            if b is None:
                expect_skipped.append((h, sender, SKIP_UNKNOWN))
            elif b.state == "redeemed":
                expect_skipped.append((h, sender, SKIP_REDEEMED))
            elif b.state == "refunded":
                expect_skipped.append((h, sender, SKIP_REFUNDED))
            elif t > b.expiry:
                expect_skipped.append((h, sender, SKIP_EXPIRED))
            else:
                b.state = "redeemed"
                expect_paid.append((h, sender, b.relayer))
                self.move(self.token.address, b.relayer, TOKEN)
        receipt = ok(self.token.redeem_batch(caller, [k[0] for k in keys], [k[1] for k in keys], gas=GAS))
        paid = [(e["codeHash"], e["sender"], e["relayer"]) for e in self.record_paid(receipt)]
        assert paid == expect_paid
        assert [(e["codeHash"], e["sender"], e["reason"])
                for e in self.token.events(receipt, "BountySkipped")] == expect_skipped

    @precondition(lambda self: self.bounties)
    @rule(data=st.data())
    def refund(self, data):
        sender, code = self.known_or_fresh_key(data)
        caller = self.pick_caller(data)
        h, b = code_hash(code), self.bounties.get((sender, code))
        if b is None:
            with reverts("UnknownBounty", codeHash=h):
                self.token.refund(caller, sender, h)
        elif b.state == "redeemed":
            with reverts("AlreadyRedeemed", codeHash=h):
                self.token.refund(caller, sender, h)
        elif b.state == "refunded":
            with reverts("AlreadyRefunded", codeHash=h):
                self.token.refund(caller, sender, h)
        elif self.now() <= b.expiry:
            with reverts("NotExpired", key=h, expiry=b.expiry):
                self.token.refund(caller, sender, h)
        else:
            ok(self.token.refund(caller, sender, h, gas=GAS))
            b.state = "refunded"
            self.move(self.token.address, b.sender, TOKEN)

    # books

    @rule(s=st.integers(0, 2), r=st.integers(0, 1), short=st.booleans(),
          codes=st.lists(bytes32, min_size=1, max_size=4))
    def open_book(self, s, r, short, codes):
        sender, relayer = self.senders[s], self.relayers[r]
        self.touched |= {sender.address, relayer.address}
        book = BookSecrets(codes)  # drawn codes: equal draws give equal roots -> BookExists
        expiry = self.now() + (200 if short else 5000)
        need = book.size * TOKEN
        key = (sender.address, book.root)
        if key in self.books:
            with reverts("BookExists", root=book.root):
                self.token.open_book(sender, book.root, book.size, relayer.address, expiry)
        elif self.balances[sender.address] < need:
            with reverts("ERC20InsufficientBalance", sender=sender.address,
                         balance=self.balances[sender.address], needed=need):
                self.token.open_book(sender, book.root, book.size, relayer.address, expiry)
        else:
            ok(self.token.open_book(sender, book.root, book.size, relayer.address, expiry, gas=GAS))
            self.books[key] = ModelBook(book, sender.address, relayer.address, expiry)
            self.move(sender.address, self.token.address, need)

    @precondition(lambda self: self.books)
    @rule(data=st.data(), s=st.integers(0, 2), r=st.integers(0, 1), short=st.booleans())
    def open_a_copied_book(self, data, s, r, short):
        """Someone opens a book with another sender's root (a front-run copy of openBook)."""
        copied = self.books[data.draw(st.sampled_from(sorted(self.books)), label="copied")]
        self.open_book(s, r, short, copied.secrets.codes)

    @precondition(lambda self: self.books)
    @rule(data=st.data())
    def redeem_book(self, data):
        m = self.books[data.draw(st.sampled_from(sorted(self.books)), label="book")]
        size = m.secrets.size
        # Non-empty: the empty multiproof (proof = [root]) has its own unit test.
        subset = data.draw(st.lists(st.integers(0, size - 1), unique=True, min_size=1, max_size=size),
                           label="leaves")
        self.spend_leaves(m, subset, self.pick_caller(data))

    def spend_leaves(self, m: ModelBook, subset, caller):
        fresh = set(subset) - m.spent
        expect_paid = 0 if self.now() > m.expiry or m.refunded else len(fresh)
        args = redemption_args(m.secrets.tree, {i: m.secrets.codes[i] for i in subset})
        receipt = ok(self.token.redeem_book(caller, m.sender, m.secrets.root, *args, gas=GAS))
        (event,) = self.token.events(receipt, "BookRedeemed")
        assert (event["sender"], event["relayer"]) == (m.sender, m.relayer)
        assert (event["paid"], event["skipped"]) == (expect_paid, len(subset) - expect_paid)
        self.paid_leaves[(m.sender, m.secrets.root)] += event["paid"]
        if expect_paid:
            m.spent |= fresh
            self.move(self.token.address, m.relayer, expect_paid * TOKEN)

    @precondition(lambda self: self.books)
    @rule(data=st.data())
    def refund_book(self, data):
        sender, root = data.draw(st.sampled_from(sorted(self.books)), label="book")
        m = self.books[(sender, root)]
        caller = self.pick_caller(data)
        if m.refunded:
            with reverts("BookAlreadyRefunded", root=root):
                self.token.refund_book(caller, sender, root)
        elif self.now() <= m.expiry:
            with reverts("NotExpired", key=root, expiry=m.expiry):
                self.token.refund_book(caller, sender, root)
        else:
            receipt = ok(self.token.refund_book(caller, sender, root, gas=GAS))
            amount = (m.secrets.size - len(m.spent)) * TOKEN
            assert self.token.events(receipt, "BookRefunded")[0]["amount"] == amount
            m.refunded = True
            self.move(self.token.address, m.sender, amount)

    # time

    @rule(seconds=st.sampled_from([1000, 6000]))  # past short expiries (200 s), or past all (5000 s)
    def time_travel(self, seconds):
        travel_to(self.w3, self.now() + seconds)

    # invariants

    @invariant()
    def token_conservation(self):
        # The model conserves tokens, the chain agrees with the model on every
        # account the step touched (teardown re-reads them all and checks the
        # sum against totalSupply), and the contract holds exactly the escrow.
        assert sum(self.balances.values()) == INITIAL_SUPPLY
        for address in self.touched | {self.token.address}:
            assert self.token.balance_of(address) == self.balances[address], address
        self.touched.clear()
        escrowed = sum(b.state == "open" for b in self.bounties.values()) + sum(
            m.secrets.size - len(m.spent) for m in self.books.values() if not m.refunded)
        assert self.balances[self.token.address] == escrowed * TOKEN

    @invariant()
    def nothing_pays_twice(self):
        assert all(n == 1 for n in self.paid_codes.values())
        for key, n in self.paid_leaves.items():
            assert n == len(self.books[key].spent) <= self.books[key].secrets.size


def test_random_operations_keep_the_books_balanced(w3, token, deployer, new_key):
    senders = [new_key(btk=4) for _ in range(3)]
    relayers = [new_key() for _ in range(2)]
    tracked = [deployer.address, token.address, *(a for a, _ in senders + relayers)]
    BountyMachine.env = MachineEnv(
        w3=w3, token=token, deployer_address=deployer.address,
        sender_keys=[k for _, k in senders], relayer_keys=[k for _, k in relayers],
        balances={a: token.balance_of(a) for a in tracked},
    )
    try:
        run_state_machine_as_test(BountyMachine, settings=settings(
            max_examples=15, stateful_step_count=12, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    finally:
        BountyMachine.env = None
