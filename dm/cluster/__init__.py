"""Several relay nodes as one network over NATS (node.py --cluster).

    bridge     the one asyncio thread that owns the NATS connection     dm.cluster.bridge
    routing    a subject per connected user; deliveries between nodes   dm.cluster.routing
    presence   who is online on the other nodes (heartbeats)            dm.cluster.presence
    directory  pins and channel membership in JetStream KV              dm.cluster.directory
    claims     codes forwarded to the sender's node, exactly once       dm.cluster.claims
    natsd      a local nats-server cluster (tests, demo, bench)         dm.cluster.natsd
    local      node data directories and node.py processes for those   dm.cluster.local
    cluster    the hub the relay node talks to                          dm.cluster.cluster

Without --cluster the node imports this package's constants below and nothing else: nats-py is
not loaded.
"""

# The stream of forwarded codes (dm.cluster.claims), node.py --cluster-claims-max-age and
# --cluster-claims-max. The reference client's bounties and books live a day (dm.client.core
# expiry_seconds): a code stored longer than that opens an expired bounty, which pays nothing.
CLAIMS_MAX_AGE = 86_400
# Codes waiting in the stream for one node (one that is down). JetStream stores a code in ~450
# bytes (measured): 1,000,000 is ~450 MB on each server; past it new codes wait in the journal of the node
# they were returned at until there is room.
CLAIMS_MAX_PER_NODE = 1_000_000
