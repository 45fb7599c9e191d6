"""Unit tests for bounty_book: leaves, the OZ-core tree layout, single and
multi proofs, the sender's secrets file and the relayer's KnownBook.

Pure Python; that the contract's verifier accepts these proofs is checked in
test_contract.py against the compiled BountyToken.
"""

import json
import secrets
import sys
import time
from pathlib import Path

import pytest
from eth_abi import encode as abi_encode
from eth_utils import keccak as eth_keccak
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any cwd

from dm.chain import books as bb  # noqa: E402
from dm.chain.books import BookSecrets, KnownBook, MerkleTree, hash_pair, leaf_hash, redemption_args  # noqa: E402

bytes32 = st.binary(min_size=32, max_size=32)


def random_book(size):
    return BookSecrets.generate(size)


def leaves_for(book, indices, codes=None):
    codes = codes if codes is not None else [book.codes[i] for i in indices]
    return [leaf_hash(i, c) for i, c in zip(indices, codes)]


# --- hashing ------------------------------------------------------------------


@given(index=st.integers(0, 2**256 - 1), code=bytes32)
def test_leaf_hash_is_double_keccak_of_abi_encode(index, code):
    # The module builds abi.encode by hand for speed: it must agree with eth_abi.
    expected = eth_keccak(eth_keccak(abi_encode(["uint256", "bytes32"], [index, code])))
    assert leaf_hash(index, code) == expected


@given(a=bytes32, b=bytes32)
def test_hash_pair_is_sorted_and_commutative(a, b):
    lo, hi = sorted([a, b])
    assert hash_pair(a, b) == hash_pair(b, a) == eth_keccak(lo + hi)


@pytest.mark.parametrize("bad", [b"\x00" * 31, b"\x00" * 33, "00" * 32])
def test_leaf_hash_rejects_codes_that_are_not_32_bytes(bad):
    with pytest.raises(ValueError):
        leaf_hash(0, bad)


@pytest.mark.parametrize("index", [-1, 2**256])
def test_leaf_hash_rejects_indices_outside_uint256(index):
    with pytest.raises(ValueError):
        leaf_hash(index, b"\x01" * 32)


# --- tree layout ----------------------------------------------------------------


def test_tree_layout_matches_oz_core_without_sorting():
    leaves = [eth_keccak(bytes([i])) for i in range(3)]
    tree = MerkleTree(leaves)
    # 2n-1 nodes, leaf i at tree[len-1-i], node k = hash_pair(children 2k+1, 2k+2).
    assert len(tree.tree) == 5
    assert tree.tree[4] == leaves[0] and tree.tree[3] == leaves[1] and tree.tree[2] == leaves[2]
    assert tree.tree[1] == hash_pair(leaves[1], leaves[0])
    assert tree.root == tree.tree[0] == hash_pair(tree.tree[1], leaves[2])
    assert tree.leaves == leaves


def test_single_leaf_tree_root_is_the_leaf():
    leaf = eth_keccak(b"only")
    tree = MerkleTree([leaf])
    assert tree.root == leaf
    assert tree.proof(0) == []
    assert tree.multiproof([0]) == ([0], [], [])


def test_empty_tree_is_rejected():
    with pytest.raises(ValueError):
        MerkleTree([])
    with pytest.raises(ValueError):
        BookSecrets.generate(0)


def test_root_changes_when_any_code_changes():
    book = random_book(17)
    roots = {book.root}
    for i in range(book.size):
        codes = list(book.codes)
        codes[i] = secrets.token_bytes(32)
        roots.add(BookSecrets(codes).root)
    assert len(roots) == book.size + 1


def test_root_depends_on_leaf_order():
    # Leaf i commits to its index, so swapping two codes changes the root too.
    book = random_book(4)
    swapped = [book.codes[1], book.codes[0], *book.codes[2:]]
    assert BookSecrets(swapped).root != book.root


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 70))
def test_every_single_proof_verifies_and_only_for_its_own_leaf(size):
    book = random_book(size)
    for i in range(size):
        proof = book.tree.proof(i)
        assert MerkleTree.verify_proof(book.root, leaf_hash(i, book.codes[i]), proof)
        assert not MerkleTree.verify_proof(book.root, leaf_hash(i, secrets.token_bytes(32)), proof)
        if size > 1:
            other = (i + 1) % size  # right code, wrong index
            assert not MerkleTree.verify_proof(book.root, leaf_hash(other, book.codes[i]), proof)


# --- multiproofs -----------------------------------------------------------------


@st.composite
def book_and_subset(draw):
    size = draw(st.integers(1, 300))
    kind = draw(st.sampled_from(["random", "empty", "full"]))
    if kind == "empty":
        subset = []
    elif kind == "full":
        subset = list(range(size))
    else:
        subset = draw(st.lists(st.integers(0, size - 1), unique=True, max_size=size))
    return random_book(size), subset


@settings(max_examples=60, deadline=None)
@given(case=book_and_subset(), data=st.data())
def test_multiproof_of_any_subset_verifies_and_tampering_fails(case, data):
    book, subset = case
    indices, proof, flags = book.tree.multiproof(subset)
    assert indices == sorted(subset)
    # OZ's shape rule: leaves + proof == flags + 1.
    assert len(indices) + len(proof) == len(flags) + 1
    leaves = leaves_for(book, indices)
    assert MerkleTree.verify_multiproof(book.root, leaves, proof, flags)

    if proof:
        k = data.draw(st.integers(0, len(proof) - 1), label="tampered proof element")
        bad = list(proof)
        bad[k] = bytes([bad[k][0] ^ 1]) + bad[k][1:]
        assert not MerkleTree.verify_multiproof(book.root, leaves, bad, flags)
    if flags:
        k = data.draw(st.integers(0, len(flags) - 1), label="flipped flag")
        bad_flags = list(flags)
        bad_flags[k] = not bad_flags[k]
        assert not MerkleTree.verify_multiproof(book.root, leaves, proof, bad_flags)
    if indices:
        k = data.draw(st.integers(0, len(indices) - 1), label="wrong code")
        codes = [book.codes[i] for i in indices]
        codes[k] = secrets.token_bytes(32)
        assert not MerkleTree.verify_multiproof(book.root, leaves_for(book, indices, codes), proof, flags)
        # Dropping a leaf (the proof no longer fits) must fail too.
        assert not MerkleTree.verify_multiproof(book.root, leaves[1:], proof, flags)


def test_multiproof_leaves_must_come_in_ascending_index_order():
    # The verifier consumes leaves in descending tree order = ascending index.
    # (Two sibling leaves would verify either way: pairs are hashed sorted.)
    book = random_book(8)
    indices, proof, flags = book.tree.multiproof([5, 0])
    assert indices == [0, 5]
    leaves = leaves_for(book, indices)
    assert MerkleTree.verify_multiproof(book.root, leaves, proof, flags)
    assert not MerkleTree.verify_multiproof(book.root, leaves[::-1], proof, flags)


def test_empty_multiproof_is_the_root_alone():
    book = random_book(5)
    assert book.tree.multiproof([]) == ([], [book.root], [])
    assert MerkleTree.verify_multiproof(book.root, [], [book.root], [])
    assert not MerkleTree.verify_multiproof(book.root, [], [secrets.token_bytes(32)], [])


def test_full_multiproof_needs_no_proof_hashes():
    book = random_book(8)
    indices, proof, flags = book.tree.multiproof(range(8))
    assert indices == list(range(8)) and proof == [] and flags == [True] * 7


@pytest.mark.parametrize("indices", [[1, 1], [0, 3, 0]])
def test_multiproof_rejects_duplicates(indices):
    with pytest.raises(ValueError, match="duplicate"):
        random_book(4).tree.multiproof(indices)


@pytest.mark.parametrize("index", [-1, 4, 100, True])
def test_multiproof_and_proof_reject_out_of_range(index):
    tree = random_book(4).tree
    with pytest.raises(ValueError):
        tree.multiproof([0, index])
    with pytest.raises(ValueError):
        tree.proof(index)


def test_verify_multiproof_rejects_malformed_shapes_without_raising():
    book = random_book(6)
    indices, proof, flags = book.tree.multiproof([1, 4])
    leaves = leaves_for(book, indices)
    assert MerkleTree.verify_multiproof(book.root, leaves, proof, flags)
    assert not MerkleTree.verify_multiproof(book.root, leaves, proof + [book.root], flags)
    assert not MerkleTree.verify_multiproof(book.root, leaves, proof[:-1], flags)
    assert not MerkleTree.verify_multiproof(book.root, leaves, proof, flags + [True])
    assert not MerkleTree.verify_multiproof(book.root, [], [], [])


# --- redemption arguments -----------------------------------------------------------


def test_redemption_args_are_ascending_and_verify():
    book = random_book(40)
    claims = {i: book.codes[i] for i in (33, 2, 17, 9)}
    indices, codes, proof, flags = redemption_args(book.tree, claims)
    assert indices == [2, 9, 17, 33]
    assert codes == [book.codes[i] for i in indices]
    assert MerkleTree.verify_multiproof(book.root, leaves_for(book, indices, codes), proof, flags)


def test_redemption_args_refuse_a_wrong_code():
    book = random_book(10)
    with pytest.raises(ValueError, match="leaf 3"):
        redemption_args(book.tree, {1: book.codes[1], 3: book.codes[4]})


# --- the relayer's view ---------------------------------------------------------------


def test_known_book_checks_root_and_codes():
    book = random_book(12)
    known = KnownBook(book.root, book.leaf_hashes)
    assert known.size == 12
    assert all(known.check_code(i, c) for i, c in enumerate(book.codes))
    assert not known.check_code(0, book.codes[1])
    assert not known.check_code(12, book.codes[0])
    assert not known.check_code(-1, book.codes[0])
    assert not known.check_code(0, b"short")
    indices, codes, proof, flags = known.redemption_args({5: book.codes[5], 0: book.codes[0]})
    assert indices == [0, 5]
    assert MerkleTree.verify_multiproof(book.root, leaves_for(book, indices, codes), proof, flags)


def test_known_book_rejects_leaves_that_do_not_match_the_root():
    book = random_book(6)
    other = random_book(6)
    with pytest.raises(ValueError):
        KnownBook(other.root, book.leaf_hashes)
    with pytest.raises(ValueError):
        KnownBook(book.root, book.leaf_hashes[:-1])  # a leaf withheld


# --- the sender's secrets on disk -------------------------------------------------------


def test_book_secrets_generate_random_distinct_codes():
    book = random_book(50)
    assert book.size == len(book.codes) == 50
    assert len(set(book.codes)) == 50 and all(len(c) == 32 for c in book.codes)
    assert random_book(50).root != book.root


def test_book_secrets_json_round_trip():
    book = random_book(9)
    text = json.dumps(book.to_json())
    loaded = BookSecrets.from_json(json.loads(text))
    assert loaded.codes == book.codes and loaded.root == book.root and loaded.size == 9
    assert json.loads(text)["root"] == "0x" + book.root.hex()


def test_book_secrets_json_detects_corruption():
    d = random_book(3).to_json()
    d["codes"][1] = "0x" + secrets.token_bytes(32).hex()
    with pytest.raises(ValueError, match="corrupt"):
        BookSecrets.from_json(d)


# --- speed ------------------------------------------------------------------------------


def test_thousand_leaf_book_and_hundred_leaf_multiproof_are_fast():
    best = float("inf")
    for _ in range(3):  # best of three: the machine may be shared
        start = time.perf_counter()
        book = BookSecrets.generate(1000)
        redemption_args(book.tree, {i: book.codes[i] for i in range(0, 1000, 10)})
        best = min(best, time.perf_counter() - start)
    assert best < 0.05, f"{best * 1000:.1f} ms"


def test_fast_keccak_matches_eth_utils():
    for n in (0, 1, 32, 64, 1000):
        data = secrets.token_bytes(n)
        assert bb.keccak(data) == eth_keccak(data)
