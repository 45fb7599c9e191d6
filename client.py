"""The terminal client: end-to-end encrypted chat, each message paid to the node on delivery.

    python3 client.py HOST PORT ME PEER      e.g. python3 client.py localhost 12345 user_1 user_2

The code lives in dm/client (the client) and dm/cli/client.py (this command line).
"""
if __name__ == "__main__":
    try:
        from dm.cli.bootstrap import run
    except BaseException as exc:  # Ctrl-C before the bootstrap can catch it: as quiet as after
        if KeyboardInterrupt not in (type(exc), type(exc.__cause__)):  # Python may wrap it (RuntimeError)
            raise
        raise SystemExit(130) from None

    run("dm.cli.client")
