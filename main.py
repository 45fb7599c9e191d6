"""Keys, accounts, the chain, refunds and the demo.

    python3 main.py Y NAME...        RSA key pair + Ethereum account for each name (the original's form)
    python3 main.py info [--json]    the deployment, and each known user's address and BTK balance
    python3 main.py chain            run the local chain (anvil) with BountyToken deployed, until Ctrl-C
    python3 main.py refund NAME      take back NAME's expired, unspent bounty books
    python3 main.py demo             a node and two scripted clients on the local chain

The code lives in dm/cli/main.py.
"""
if __name__ == "__main__":
    try:
        from dm.cli.bootstrap import run
    except BaseException as exc:  # Ctrl-C before the bootstrap can catch it: as quiet as after
        if KeyboardInterrupt not in (type(exc), type(exc.__cause__)):  # Python may wrap it (RuntimeError)
            raise
        raise SystemExit(130) from None

    run("dm.cli.main")
