"""The relay node: a sans-IO session per connection, the delivery ledger, channels, pins, the bounty index, redemption, and a thin threaded socket layer."""

LOOKUPS_PER_SECOND = 20  # direct chain lookups of unknown bounties, for the whole node (node.py --lookups)
# A redemption is final this many blocks deep, counting its own (node.py --confirmations):
DEV_CONFIRMATIONS = 2  # anvil: a block it may lose when restarted from its state file (saved once a second)
TESTER_CONFIRMATIONS = 1  # eth-tester, in-process: nothing rolls it back unless a test does
REAL_CONFIRMATIONS = 12  # any other chain: well past the depth of ordinary reorgs on Ethereum mainnet
# Per-user bounds (node.py flags of the same names); here so that node.py --help imports no web3.
MAX_BOOKS_PER_USER = 64  # open books one user may have announced at once (node.py --max-books)
ERROR_WINDOW = 10.0  # seconds: max_errors refusals within this window close a connection
CPU_SHARE = 0.02  # seconds of CPU per second (node.py --cpu-share)
