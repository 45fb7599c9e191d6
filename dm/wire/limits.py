"""The wire's size limits, shared by both directions."""

MAX_FRAME = 8 * 1024 * 1024  # the same cap for every frame, both directions
MAX_MSG_ID = 64
# json.loads recurses per nesting level, and web3's imports raise the recursion
# limit to 100000, so deep nesting would overflow a thread's C stack. Real
# frames have a handful of containers; refuse absurd counts before parsing.
MAX_CONTAINERS = 1000
# What a recipient can read of a deliver before it returns the code: every byte but the
# node-sealed ciphertext. Enough for RSA-4096 keys and a batch proof of 32 hashes (~3.5 KB);
# it bounds what a colluding pair can pass by the node unpaid (docs/PROTOCOL.md §10).
MAX_VISIBLE = 4096
