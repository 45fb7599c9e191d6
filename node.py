"""The relay node: accepts clients, proves their names, relays ciphertext, redeems the codes they return.

    python3 node.py [--host localhost] [--port 12345] [--rpc-url URL] [--data-dir DIR]

The code lives in dm/relay (the node) and dm/cli/node.py (this command line).
"""
if __name__ == "__main__":
    try:
        from dm.cli.bootstrap import run
    except BaseException as exc:  # Ctrl-C before the bootstrap can catch it: as quiet as after
        if KeyboardInterrupt not in (type(exc), type(exc.__cause__)):  # Python may wrap it (RuntimeError)
            raise
        raise SystemExit(130) from None

    run("dm.cli.node")
