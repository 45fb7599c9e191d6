"""The public face of dm.crypto: RSA keys, key files, fingerprints and envelopes.

    import key_utils
    key = key_utils.generate_private_key()
    key_utils.save_private_key("alice_PRIVATE.pem", key)   # created 0600, never overwritten
"""
from dm.crypto import *  # noqa: F401,F403
from dm.crypto import __all__  # noqa: F401
