"""The relay node: a sans-IO session per connection, the delivery ledger, channels, pins, the bounty index, redemption, and a thin threaded socket layer."""

LOOKUPS_PER_SECOND = 20  # direct chain lookups of unknown bounties, for the whole node (node.py --lookups)
