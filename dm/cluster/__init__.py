"""Several relay nodes as one network over NATS (node.py --cluster).

    bridge     the one asyncio thread that owns the NATS connection     dm.cluster.bridge
    routing    a subject per connected user; deliveries between nodes   dm.cluster.routing
    presence   who is online on the other nodes (heartbeats)            dm.cluster.presence
    directory  pins and channel membership in JetStream KV              dm.cluster.directory
    claims     codes forwarded to the sender's node, exactly once       dm.cluster.claims
    natsd      a local nats-server cluster (tests, demo, bench)         dm.cluster.natsd
    local      node data directories and node.py processes for those   dm.cluster.local
    cluster    the hub the relay node talks to                          dm.cluster.cluster
"""
