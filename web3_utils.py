"""The public face of dm.chain: connect to a chain, sign locally, and call BountyToken with reverts named.

    import web3_utils
    w3 = web3_utils.connect("http://127.0.0.1:8545")
    token = web3_utils.BountyToken(w3, address)
"""
from dm.chain.ethereum import *  # noqa: F401,F403
from dm.chain.ethereum import __all__  # noqa: F401
