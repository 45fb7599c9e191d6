"""The relay node: a sans-IO session per connection, the delivery ledger, channels, pins, the bounty index, redemption, and a thin threaded socket layer."""
