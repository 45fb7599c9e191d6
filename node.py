"""The relay node: accepts clients, proves their names, relays ciphertext, redeems the codes they return.

    python3 node.py [--host localhost] [--port 12345] [--rpc-url URL] [--data-dir DIR]

The code lives in dm/relay (the node) and dm/cli/node.py (this command line).
"""
import sys

from dm.cli.node import main

if __name__ == "__main__":
    sys.exit(main())
