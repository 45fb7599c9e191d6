// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";

/// @title BountyToken (BTK)
/// @notice An ERC-20 whose holders pay relay nodes per delivered message.
/// A sender escrows one token against keccak256(code), bound to one relayer.
/// Bounties and books are keyed by (sender, code hash) and (sender, root): a
/// copy of someone's registration is a registration of the copier's own, so
/// nobody can block another sender by registering first.
/// The code travels encrypted to the recipient, who hands it back to the
/// relayer; revealing it releases the token to that relayer and nobody else.
/// Books escrow many tokens against a Merkle root of many codes at once.
contract BountyToken is ERC20 {
    /// @notice Tokens escrowed per bounty and per book leaf (1 BTK).
    uint256 public constant BOUNTY_AMOUNT = 1e18;

    /// @notice Where a single bounty stands (getBounty's `state`): None, never
    /// registered; Open, escrowed and payable; Redeemed, paid to its relayer;
    /// Refunded, returned to its sender.
    /// @dev None is the zero value, so an unknown code hash reads as None.
    /// registerBounty moves None to Open; redeemBounty, redeemBatch and refund
    /// move Open to Redeemed or Refunded, and nothing leaves those two.
    enum State {
        None,
        Open,
        Redeemed,
        Refunded
    }

    /// @dev One slot: (relayer, expiry, state). The sender is the mapping key.
    struct Bounty {
        address relayer;
        uint64 expiry;
        State state;
    }

    /// @dev Two slots, (relayer, expiry, size) and (spent, refunded), plus the
    /// spent-leaf bitmap. The sender is the mapping key; redeemBook reads only
    /// the first slot before it writes `spent`.
    struct Book {
        address relayer;
        uint64 expiry;
        uint32 size;
        uint32 spent;
        bool refunded;
    }

    /// @notice Why a code in a batch was not paid.
    enum SkipReason {
        Unknown,
        Redeemed,
        Refunded,
        Expired
    }

    mapping(address sender => mapping(bytes32 codeHash => Bounty)) private _bounties;
    mapping(address sender => mapping(bytes32 root => Book)) private _books;
    mapping(address sender => mapping(bytes32 root => mapping(uint256 word => uint256 bits))) private _spentLeaves;

    /// @notice A bounty of `amount` was escrowed by `sender` for `relayer` until `expiry`.
    event BountyRegistered(
        bytes32 indexed codeHash, address indexed sender, address indexed relayer, uint256 amount, uint64 expiry
    );
    /// @notice The bounty `sender` escrowed behind `codeHash` paid `amount` to `relayer`.
    event BountyRedeemed(bytes32 indexed codeHash, address indexed sender, address indexed relayer, uint256 amount);
    /// @notice The expired bounty behind `codeHash` returned `amount` to `sender`.
    event BountyRefunded(bytes32 indexed codeHash, address indexed sender, uint256 amount);
    /// @notice `sender`'s code in a batch was skipped for `reason`; the rest of the batch went on.
    event BountySkipped(bytes32 indexed codeHash, address indexed sender, SkipReason reason);
    /// @notice `sender` escrowed `size` tokens against the Merkle `root` for `relayer` until `expiry`.
    event BookOpened(bytes32 indexed root, address indexed sender, address indexed relayer, uint32 size, uint64 expiry);
    /// @notice A batch of `sender`'s book `root` paid `paid` leaves to `relayer` and skipped `skipped`
    /// (spent, duplicate or expired).
    event BookRedeemed(
        bytes32 indexed root, address indexed sender, address indexed relayer, uint256 paid, uint256 skipped
    );
    /// @notice The expired book `root` returned `amount` (its unspent leaves) to `sender`.
    event BookRefunded(bytes32 indexed root, address indexed sender, uint256 amount);

    /// @notice The caller already registered a bounty for `codeHash`; codes must be fresh.
    /// @param codeHash the hash that was registered before
    error BountyExists(bytes32 codeHash);
    /// @notice No bounty was ever registered for `codeHash`.
    /// @param codeHash the hash of the code submitted
    error UnknownBounty(bytes32 codeHash);
    /// @notice The bounty was already paid to its relayer.
    /// @param codeHash the hash of the code submitted
    error AlreadyRedeemed(bytes32 codeHash);
    /// @notice The bounty was already returned to its sender.
    /// @param codeHash the hash of the code submitted
    error AlreadyRefunded(bytes32 codeHash);
    /// @notice The book's unspent tokens were already returned to its sender.
    /// @param root the Merkle root
    error BookAlreadyRefunded(bytes32 root);
    /// @notice The bounty's expiry has passed; it can only be refunded.
    /// @param codeHash the hash of the code submitted
    /// @param expiry the bounty's expiry (unix seconds)
    error BountyExpired(bytes32 codeHash, uint64 expiry);
    /// @notice A refund was asked before the bounty or book expired.
    /// @param key the code hash or book root
    /// @param expiry when a refund becomes possible (after this unix second)
    error NotExpired(bytes32 key, uint64 expiry);
    /// @notice The relayer must be a real address.
    error InvalidRelayer();
    /// @notice The expiry must lie in the future.
    /// @param expiry the expiry given
    error InvalidExpiry(uint64 expiry);
    /// @notice A book needs at least one leaf.
    error EmptyBook();
    /// @notice The caller already opened a book with `root`.
    /// @param root the Merkle root
    error BookExists(bytes32 root);
    /// @notice No book was opened for `root`.
    /// @param root the Merkle root
    error UnknownBook(bytes32 root);
    /// @notice The multiproof does not prove these leaves under `root`.
    /// @param root the Merkle root
    error InvalidBookProof(bytes32 root);
    /// @notice A leaf index lies outside its book.
    /// @param root the Merkle root
    /// @param index the index given
    error LeafOutOfRange(bytes32 root, uint256 index);
    /// @notice The arrays of a call must have equal lengths.
    error LengthMismatch();

    /// @param initialSupply tokens (in wei units) minted to the deployer
    constructor(uint256 initialSupply) ERC20("BountyToken", "BTK") {
        _mint(msg.sender, initialSupply);
    }

    // ------------------------------------------------------------------
    // Single bounties
    // ------------------------------------------------------------------

    /// @notice Escrow BOUNTY_AMOUNT from the caller against (caller, `codeHash`), payable only to `relayer`.
    /// @param codeHash keccak256 of the secret 32-byte code
    /// @param relayer the node that alone can be paid with the code
    /// @param expiry unix second after which the sender may take the token back
    function registerBounty(bytes32 codeHash, address relayer, uint64 expiry) external {
        if (relayer == address(0)) revert InvalidRelayer();
        if (expiry <= block.timestamp) revert InvalidExpiry(expiry);
        Bounty storage bounty = _bounties[msg.sender][codeHash];
        if (bounty.state != State.None) revert BountyExists(codeHash);

        bounty.relayer = relayer;
        bounty.expiry = expiry;
        bounty.state = State.Open;
        emit BountyRegistered(codeHash, msg.sender, relayer, BOUNTY_AMOUNT, expiry);
        _transfer(msg.sender, address(this), BOUNTY_AMOUNT);
    }

    /// @notice Reveal `code` and pay its bounty to the relayer bound at registration.
    /// @dev Anyone may submit; the token only ever goes to the bound relayer,
    /// so copying the code from the mempool gains an attacker nothing.
    /// @param sender who registered the bounty
    /// @param code the secret whose keccak256 was registered
    function redeemBounty(address sender, bytes32 code) external {
        bytes32 codeHash = keccak256(abi.encodePacked(code));
        Bounty storage bounty = _bounties[sender][codeHash];
        _requireOpen(codeHash, bounty.state);
        if (block.timestamp > bounty.expiry) revert BountyExpired(codeHash, bounty.expiry);

        bounty.state = State.Redeemed;
        address relayer = bounty.relayer;
        emit BountyRedeemed(codeHash, sender, relayer, BOUNTY_AMOUNT);
        _transfer(address(this), relayer, BOUNTY_AMOUNT);
    }

    /// @notice Redeem many codes in one transaction. Codes that are unknown,
    /// spent, refunded or expired are skipped with a BountySkipped event
    /// instead of reverting the batch.
    /// @param senders who registered each code's bounty
    /// @param codes the secrets to reveal, codes[i] registered by senders[i]
    /// @return paid how many codes paid out
    function redeemBatch(address[] calldata senders, bytes32[] calldata codes) external returns (uint256 paid) {
        if (senders.length != codes.length) revert LengthMismatch();
        address pendingRelayer = address(0);
        uint256 pendingAmount = 0;
        for (uint256 i = 0; i < codes.length; ++i) {
            bytes32 codeHash = keccak256(abi.encodePacked(codes[i]));
            address sender = senders[i];
            Bounty storage bounty = _bounties[sender][codeHash];
            State state = bounty.state;
            if (state != State.Open) {
                emit BountySkipped(
                    codeHash,
                    sender,
                    state == State.None
                        ? SkipReason.Unknown
                        : (state == State.Redeemed ? SkipReason.Redeemed : SkipReason.Refunded)
                );
                continue;
            }
            if (block.timestamp > bounty.expiry) {
                emit BountySkipped(codeHash, sender, SkipReason.Expired);
                continue;
            }
            bounty.state = State.Redeemed;
            address relayer = bounty.relayer;
            emit BountyRedeemed(codeHash, sender, relayer, BOUNTY_AMOUNT);
            // Consecutive codes usually share a relayer: pay them in one transfer.
            if (relayer != pendingRelayer) {
                if (pendingAmount != 0) _transfer(address(this), pendingRelayer, pendingAmount);
                pendingRelayer = relayer;
                pendingAmount = 0;
            }
            pendingAmount += BOUNTY_AMOUNT;
            ++paid;
        }
        if (pendingAmount != 0) _transfer(address(this), pendingRelayer, pendingAmount);
    }

    /// @notice Return an expired, unredeemed bounty to its sender; anyone may call.
    /// @param sender who registered the bounty, and gets it back
    /// @param codeHash the registered hash
    function refund(address sender, bytes32 codeHash) external {
        Bounty storage bounty = _bounties[sender][codeHash];
        _requireOpen(codeHash, bounty.state);
        if (block.timestamp <= bounty.expiry) revert NotExpired(codeHash, bounty.expiry);

        bounty.state = State.Refunded;
        emit BountyRefunded(codeHash, sender, BOUNTY_AMOUNT);
        _transfer(address(this), sender, BOUNTY_AMOUNT);
    }

    /// @dev The state check redeemBounty and refund share: reverts, naming why,
    /// unless the bounty is Open. Takes the state already read, so the caller
    /// loads the bounty's first slot once for this and its expiry check.
    function _requireOpen(bytes32 codeHash, State state) private pure {
        if (state == State.Open) return;
        if (state == State.None) revert UnknownBounty(codeHash);
        if (state == State.Redeemed) revert AlreadyRedeemed(codeHash);
        revert AlreadyRefunded(codeHash);
    }

    /// @notice Read a bounty.
    /// @param sender who escrowed it
    /// @param codeHash the registered hash
    /// @return relayer who alone can be paid
    /// @return expiry unix second after which it is refundable
    /// @return state 0 none, 1 open, 2 redeemed, 3 refunded
    function getBounty(address sender, bytes32 codeHash)
        external
        view
        returns (address relayer, uint64 expiry, State state)
    {
        Bounty storage bounty = _bounties[sender][codeHash];
        return (bounty.relayer, bounty.expiry, bounty.state);
    }

    // ------------------------------------------------------------------
    // Bounty books: many prepaid codes behind one Merkle root
    // ------------------------------------------------------------------

    /// @notice Escrow `size` tokens against (caller, `root`), a Merkle root of `size` leaves,
    /// leaf i being keccak256(bytes.concat(keccak256(abi.encode(i, code_i)))),
    /// in the array layout of OpenZeppelin's merkle-tree core (sorted-pair hashing),
    /// leaves kept in index order rather than sorted.
    /// @param root the Merkle root; must be fresh among the caller's books
    /// @param size how many leaves (and tokens) the book holds
    /// @param relayer the node that alone can be paid with the book's codes
    /// @param expiry unix second after which the unspent tokens can be refunded
    function openBook(bytes32 root, uint32 size, address relayer, uint64 expiry) external {
        if (relayer == address(0)) revert InvalidRelayer();
        if (expiry <= block.timestamp) revert InvalidExpiry(expiry);
        if (size == 0) revert EmptyBook();
        Book storage book = _books[msg.sender][root];
        if (_bookExists(book)) revert BookExists(root);

        book.relayer = relayer;
        book.expiry = expiry;
        book.size = size;
        emit BookOpened(root, msg.sender, relayer, size, expiry);
        _transfer(msg.sender, address(this), uint256(size) * BOUNTY_AMOUNT);
    }

    /// @notice Redeem leaves of a book with one multiproof. Leaves already
    /// spent (in an earlier batch or earlier in this one) are skipped, and an
    /// expired book pays nothing; an invalid proof reverts the whole call.
    /// @param sender who opened the book
    /// @param root the book
    /// @param indices leaf indices, in the order the multiproof expects
    /// @param codes the codes of those leaves
    /// @param proof the multiproof's sibling hashes
    /// @param proofFlags the multiproof's flags (OpenZeppelin MerkleProof format)
    /// @return paid how many leaves paid out
    function redeemBook(
        address sender,
        bytes32 root,
        uint256[] calldata indices,
        bytes32[] calldata codes,
        bytes32[] calldata proof,
        bool[] calldata proofFlags
    ) external returns (uint256 paid) {
        if (indices.length != codes.length) revert LengthMismatch();
        Book storage book = _books[sender][root];
        address relayer = book.relayer; // relayer, expiry and size share one slot: one load
        uint64 expiry = book.expiry;
        if (relayer == address(0)) revert UnknownBook(root);
        bytes32[] memory leaves = _bookLeaves(root, book.size, indices, codes);
        if (!MerkleProof.multiProofVerifyCalldata(proof, proofFlags, root, leaves)) revert InvalidBookProof(root);

        if (block.timestamp > expiry) {
            emit BookRedeemed(root, sender, relayer, 0, indices.length);
            return 0;
        }
        paid = _spendLeaves(_spentLeaves[sender][root], indices);
        // Cannot overflow: _bookLeaves kept every index below size and the bitmap
        // pays each index once, so book.spent + paid <= size < 2**32.
        unchecked {
            book.spent += uint32(paid);
        }
        emit BookRedeemed(root, sender, relayer, paid, indices.length - paid);
        if (paid != 0) _transfer(address(this), relayer, paid * BOUNTY_AMOUNT);
    }

    /// @dev Leaf i is keccak256(bytes.concat(keccak256(abi.encode(i, code)))):
    /// hashing twice keeps a leaf from ever passing for an inner node.
    function _bookLeaves(bytes32 root, uint256 size, uint256[] calldata indices, bytes32[] calldata codes)
        private
        pure
        returns (bytes32[] memory leaves)
    {
        leaves = new bytes32[](indices.length);
        for (uint256 i = 0; i < indices.length; ++i) {
            if (indices[i] >= size) revert LeafOutOfRange(root, indices[i]);
            leaves[i] = keccak256(bytes.concat(keccak256(abi.encode(indices[i], codes[i]))));
        }
    }

    /// @dev Marks each unspent index spent and counts it; spent ones (and
    /// repeats within this call) are left out of the count. The same layout as
    /// OpenZeppelin's BitMaps (256 leaves a word), kept by hand: BitMaps' get
    /// then set loads each word twice, 139 gas more a leaf (bench/gas.py, book
    /// of 100: 4,587 instead of 4,448 gas a message).
    function _spendLeaves(mapping(uint256 => uint256) storage spentBits, uint256[] calldata indices)
        private
        returns (uint256 fresh)
    {
        for (uint256 i = 0; i < indices.length; ++i) {
            uint256 index = indices[i];
            uint256 mask = 1 << (index & 0xff);
            uint256 word = spentBits[index >> 8];
            if (word & mask != 0) continue;
            spentBits[index >> 8] = word | mask;
            ++fresh;
        }
    }

    /// @notice Return an expired book's unspent tokens to its sender; anyone may call.
    /// @param sender who opened the book, and gets the unspent part back
    /// @param root the book
    function refundBook(address sender, bytes32 root) external {
        Book storage book = _books[sender][root];
        if (!_bookExists(book)) revert UnknownBook(root);
        if (book.refunded) revert BookAlreadyRefunded(root);
        if (block.timestamp <= book.expiry) revert NotExpired(root, book.expiry);

        book.refunded = true;
        uint256 amount = uint256(book.size - book.spent) * BOUNTY_AMOUNT;
        emit BookRefunded(root, sender, amount);
        if (amount != 0) _transfer(address(this), sender, amount);
    }

    /// @dev The one test that a book exists: openBook records a relayer, never
    /// zero, so only a root that was never opened has a zero relayer.
    function _bookExists(Book storage book) private view returns (bool) {
        return book.relayer != address(0);
    }

    /// @notice Read a book.
    /// @param sender who escrowed it
    /// @param root the book
    /// @return relayer who alone can be paid
    /// @return expiry unix second after which the unspent part is refundable
    /// @return size how many leaves it holds
    /// @return spent how many leaves were paid
    /// @return refunded whether the unspent part went back to the sender
    function getBook(address sender, bytes32 root)
        external
        view
        returns (address relayer, uint64 expiry, uint32 size, uint32 spent, bool refunded)
    {
        Book storage book = _books[sender][root];
        return (book.relayer, book.expiry, book.size, book.spent, book.refunded);
    }

    /// @notice Whether leaf `index` of `sender`'s book `root` has been paid.
    /// @param sender who opened the book
    /// @param root the book
    /// @param index the leaf index
    /// @return spent true once paid
    function isLeafSpent(address sender, bytes32 root, uint256 index) external view returns (bool spent) {
        return _spentLeaves[sender][root][index >> 8] & (1 << (index & 0xff)) != 0;
    }
}
