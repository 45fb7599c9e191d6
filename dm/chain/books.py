"""Bounty books, off-chain: many secret codes committed under one Merkle root.

A sender escrows N tokens at once with BountyToken.openBook(root, N, ...),
then hands out one code per message. The relayer collects codes and redeems
many at a time with one multiproof (BountyToken.redeemBook).

Leaf i is keccak256(keccak256(abi.encode(uint256 i, bytes32 code_i))), exactly
as contract.sol's `_bookLeaves` computes it. Binding the index into the leaf
lets the contract keep one spent bit per index.

The tree layout and multiproof format are those of OpenZeppelin's
@openzeppelin/merkle-tree "core" module, so OZ's MerkleProof.multiProofVerify
accepts them: a complete binary tree stored as an array of 2n-1 nodes, node k
having children 2k+1 and 2k+2, pairs hashed sorted. Unlike OZ's
StandardMerkleTree we do NOT sort the leaves by hash: leaf i sits at
tree[len(tree) - 1 - i]. Any leaf order gives a valid tree for the verifier,
and this one keeps "leaf index" and "tree position" trivially related.

Pure code: no chain access.
"""
from __future__ import annotations

import secrets
from collections import deque
from typing import Callable, Iterable, Sequence

# A 1,000-leaf book takes ~3,000 hashes. safe-pysha3 (pulled in by
# eth-tester[py-evm] on CPython) does one in ~1 us; eth_utils.keccak takes ~9 us.
try:
    from sha3 import keccak_256 as _keccak_256

    def keccak(data: bytes) -> bytes:
        return _keccak_256(data).digest()
except ImportError:  # pragma: no cover - any other eth-hash backend
    from eth_utils import keccak

__all__ = ["leaf_hash", "hash_pair", "MerkleTree", "BookSecrets", "KnownBook", "redemption_args"]

CODE_SIZE = 32
HASHES_PER_PAUSE = 256  # a tree's builder calls `pause` this often: well under a millisecond of hashing


def _check_bytes32(value: bytes, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
        raise ValueError(f"{what} must be 32 bytes")
    return bytes(value)


def leaf_hash(index: int, code: bytes) -> bytes:
    """Leaf `index` of a book: keccak256(bytes.concat(keccak256(abi.encode(index, code))))."""
    if not isinstance(index, int) or not 0 <= index < 2**256:
        raise ValueError(f"leaf index {index!r} is not a uint256")
    # abi.encode(uint256, bytes32) is just two 32-byte words; building them by
    # hand is 10x faster than eth_abi.encode (the tests check they agree).
    encoded = index.to_bytes(32, "big") + _check_bytes32(code, "code")
    # Hashing twice keeps a 64-byte leaf preimage from ever passing for an inner node.
    return keccak(keccak(encoded))


def hash_pair(a: bytes, b: bytes) -> bytes:
    """OZ's commutativeKeccak256: the pair is sorted, so proofs need no left/right bits."""
    return keccak(a + b) if a < b else keccak(b + a)


def _sibling(j: int) -> int:
    # Node k's children are 2k+1 (odd, left) and 2k+2 (even, right).
    return j + 1 if j % 2 == 1 else j - 1


def _parent(j: int) -> int:
    return (j - 1) // 2


class MerkleTree:
    """An OZ-core Merkle tree over leaf hashes given in leaf-index order."""

    def __init__(self, leaves: Sequence[bytes], pause: Callable[[], None] | None = None):
        """`pause`, when given, is called every HASHES_PER_PAUSE hashes: a node lets other
        threads run there, so a 10,000-leaf book never holds the interpreter lock for long."""
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        n = len(leaves)
        tree: list[bytes] = [b""] * (2 * n - 1)
        last = len(tree) - 1
        for i, leaf in enumerate(leaves):
            tree[last - i] = _check_bytes32(leaf, f"leaf {i}")
        for k in range(n - 2, -1, -1):  # inner nodes, bottom-up
            tree[k] = hash_pair(tree[2 * k + 1], tree[2 * k + 2])
            if pause is not None and not k % HASHES_PER_PAUSE:
                pause()
        self.tree = tree
        self.size = n
        self.root: bytes = tree[0]

    def __len__(self) -> int:
        return self.size

    def leaf(self, index: int) -> bytes:
        return self.tree[self._tree_index(index)]

    @property
    def leaves(self) -> list[bytes]:
        return [self.tree[-1 - i] for i in range(self.size)]

    def _tree_index(self, index: int) -> int:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self.size:
            raise ValueError(f"leaf index {index!r} out of range for a tree of {self.size}")
        return len(self.tree) - 1 - index

    def proof(self, index: int) -> list[bytes]:
        """Sibling hashes from leaf `index` up to the root (OZ MerkleProof.verify format)."""
        j = self._tree_index(index)
        proof = []
        while j > 0:
            proof.append(self.tree[_sibling(j)])
            j = _parent(j)
        return proof

    @staticmethod
    def verify_proof(root: bytes, leaf: bytes, proof: Iterable[bytes]) -> bool:
        """Port of OZ MerkleProof.verify."""
        node = leaf
        for sibling in proof:
            node = hash_pair(node, sibling)
        return node == root

    def multiproof(self, indices: Iterable[int]) -> tuple[list[int], list[bytes], list[bool]]:
        """OZ getMultiProof for these leaves.

        Returns (indices ascending, proof, flags). Ascending leaf index is
        descending tree position, the order the verifier consumes leaves in,
        so the contract's `indices`/`codes` must be passed in that order.
        """
        indices = list(indices)
        if len(set(indices)) != len(indices):
            raise ValueError("duplicate leaf indices in a multiproof")
        tree_indices = sorted((self._tree_index(i) for i in indices), reverse=True)

        # A queue of nodes whose hash the verifier will know; parents join at
        # the back, so it stays in descending tree order level by level.
        stack = deque(tree_indices)
        proof: list[bytes] = []
        flags: list[bool] = []
        while stack and stack[0] > 0:
            j = stack.popleft()
            s = _sibling(j)
            if stack and stack[0] == s:
                flags.append(True)  # the sibling is known too: merge two queue entries
                stack.popleft()
            else:
                flags.append(False)  # the sibling comes from the proof
                proof.append(self.tree[s])
            stack.append(_parent(j))
        if not tree_indices:
            proof.append(self.tree[0])  # OZ's empty multiproof: the root itself
        leaf_indices = [len(self.tree) - 1 - j for j in tree_indices]
        return leaf_indices, proof, flags

    @classmethod
    def verify_multiproof(cls, root: bytes, leaf_hashes_in_order: Sequence[bytes],
                          proof: Sequence[bytes], flags: Sequence[bool]) -> bool:
        """Port of OZ MerkleProof.multiProofVerify; malformed proofs give False
        where OZ reverts with MerkleProofInvalidMultiproof."""
        leaves = list(leaf_hashes_in_order)
        n_leaves, n_flags = len(leaves), len(flags)
        if n_leaves + len(proof) != n_flags + 1:
            return False
        if n_flags == 0:
            return (leaves[0] if n_leaves else proof[0]) == root
        hashes: list[bytes] = []
        leaf_pos = hash_pos = proof_pos = 0

        def next_queued() -> bytes | None:
            nonlocal leaf_pos, hash_pos
            if leaf_pos < n_leaves:
                leaf_pos += 1
                return leaves[leaf_pos - 1]
            if hash_pos >= len(hashes):
                return None  # OZ would read an unset (zero) slot; no honest proof does
            hash_pos += 1
            return hashes[hash_pos - 1]

        for flag in flags:
            a = next_queued()
            if flag:
                b = next_queued()
            elif proof_pos < len(proof):
                b = proof[proof_pos]
                proof_pos += 1
            else:
                return False
            if a is None or b is None:
                return False
            hashes.append(hash_pair(a, b))
        if proof_pos != len(proof):
            return False
        return hashes[-1] == root


def redemption_args(tree: MerkleTree, claims: dict[int, bytes]
                    ) -> tuple[list[int], list[bytes], list[bytes], list[bool]]:
    """(indices, codes, proof, flags) for BountyToken.redeem_book.

    `claims` maps leaf index -> code. Each code is checked against its leaf
    first: a wrong one would make the whole on-chain call revert (and burn gas).
    """
    for index, code in claims.items():
        if leaf_hash(index, code) != tree.leaf(index):
            raise ValueError(f"code for leaf {index} does not match the book")
    indices, proof, flags = tree.multiproof(claims.keys())
    return indices, [bytes(claims[i]) for i in indices], proof, flags


class BookSecrets:
    """The sender's side of a book: the codes themselves."""

    def __init__(self, codes: Sequence[bytes]):
        self.codes: list[bytes] = [_check_bytes32(c, "code") for c in codes]
        self.tree = MerkleTree([leaf_hash(i, c) for i, c in enumerate(self.codes)])
        self.root: bytes = self.tree.root
        self.size: int = len(self.codes)

    @classmethod
    def generate(cls, size: int) -> "BookSecrets":
        if size < 1:
            raise ValueError("a book needs at least one code")
        return cls([secrets.token_bytes(CODE_SIZE) for _ in range(size)])

    @property
    def leaf_hashes(self) -> list[bytes]:
        """What the sender announces to the relayer (never the codes)."""
        return self.tree.leaves

    def to_json(self) -> dict:
        return {"root": "0x" + self.root.hex(), "size": self.size,
                "codes": ["0x" + c.hex() for c in self.codes]}

    @classmethod
    def from_json(cls, d: dict) -> "BookSecrets":
        book = cls([bytes.fromhex(c.removeprefix("0x")) for c in d["codes"]])
        # The saved root guards against a truncated or edited file.
        if "root" in d and bytes.fromhex(d["root"].removeprefix("0x")) != book.root:
            raise ValueError("book file is corrupt: its codes do not hash to its root")
        return book


class KnownBook:
    """The relayer's side: a book as announced by its sender (root and leaf hashes)."""

    def __init__(self, root: bytes, leaf_hashes: Sequence[bytes], pause: Callable[[], None] | None = None):
        self.tree = MerkleTree(leaf_hashes, pause)
        if self.tree.root != root:
            raise ValueError("announced leaves do not hash to the announced root")
        self.root = root
        self.size = self.tree.size

    def check_code(self, index: int, code: bytes) -> bool:
        """Whether `code` is the secret of leaf `index` (before accepting it as payment)."""
        if not isinstance(index, int) or not 0 <= index < self.size:
            return False
        if not isinstance(code, (bytes, bytearray)) or len(code) != 32:
            return False
        return leaf_hash(index, code) == self.tree.leaf(index)

    def redemption_args(self, claims: dict[int, bytes]) -> tuple[list[int], list[bytes], list[bytes], list[bool]]:
        return redemption_args(self.tree, claims)
