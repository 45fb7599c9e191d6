"""The wire's size limits, shared by both directions."""

MAX_FRAME = 8 * 1024 * 1024  # the same cap for every frame, both directions
# Only a `send` may be larger than this, and it must say so up front (SEND_TYPE_PREFIX): any
# other frame above it is refused unparsed. Parsing 8 MB of JSON holds the GIL for 100+ ms,
# which every other connection would wait out; a 10,000-leaf `book` is 670 KB.
MAX_OTHER_FRAME = 1024 * 1024
SEND_TYPE_PREFIX = b'{"type":"send"'
MAX_MSG_ID = 64
# json.loads recurses per nesting level, and web3's imports raise the recursion
# limit to 100000, so deep nesting would overflow a thread's C stack. Real
# frames have a handful of containers; refuse absurd counts before parsing.
MAX_CONTAINERS = 1000
# What a recipient can read of a deliver before it returns the code: every byte but the
# node-sealed ciphertext. Enough for RSA-4096 keys and a batch proof of 32 hashes (~3.5 KB);
# it bounds what a colluding pair can pass by the node unpaid (docs/PROTOCOL.md §10); node.py --max-visible.
MAX_VISIBLE = 4096
# Leaves in one `book` frame: 10,000 leaves are a 670 KB frame and about 12 ms of hashing;
# the reference client makes books of at most this size (client.py --book-size).
MAX_BOOK_LEAVES = 10_000
