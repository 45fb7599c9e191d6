"""The chain: web3 access and signing, the contract build, the local dev chain and its faucet, Merkle books."""
