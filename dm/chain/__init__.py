"""The chain: web3 access and signing, the contract build, the local dev chain and its faucet, Merkle books."""

DEFAULT_RPC_URL = "http://127.0.0.1:8545"  # here, not in ethereum.py, so a --help needs no web3
