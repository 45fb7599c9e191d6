"""The processes every benchmark starts, each written once.

    chain.DevChain      anvil on a free loopback port, a throwaway data directory, BountyToken deployed
    node.NodeProcess    node.py as a subprocess (own process group, optional CPU pinning and cProfile)
    wire.Wire           a bare client connection for the load generators (dm.wire handshake and frames)
    workers.Workers     spawned worker processes: started, watched, always reaped

Import `benchlib` first: it puts the project root on sys.path.
"""
