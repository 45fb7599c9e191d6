"""DistributedMessaging: end-to-end encrypted chat through relay nodes paid per delivered message.

One subpackage per concern:
    wire    frames, message shapes, order rules, error codes (sans-IO)
    crypto  RSA keys and key files, fingerprints, envelopes
    chain   web3 access, the contract build, the local dev chain, Merkle books
    relay   the node: sessions, the delivery ledger, channels, pins, redemption, sockets
    client  the client: connection, sending, receiving, peers' keys, paying, the terminal
    cli     the command lines behind main.py, node.py and client.py
"""
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # contract.sol, artifacts/, node_modules/
