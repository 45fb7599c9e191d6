"""Where a command finds the chain, and the commands that start the chain or a node, for hints
(standard library only: the client asks before it imports web3)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from dm.chain import DEFAULT_RPC_URL


def chain_url(flag: str | None, data_dir: Path | None) -> tuple[str, str]:
    """(URL, where it came from): --rpc-url, else $DM_RPC_URL, else the chain this data directory's
    deployment was recorded on (where the node that made it pays; not asked when data_dir is
    None), else the default."""
    if flag:
        return flag, "--rpc-url"
    if os.environ.get("DM_RPC_URL"):
        return os.environ["DM_RPC_URL"], "$DM_RPC_URL"
    if data_dir is None:
        return DEFAULT_RPC_URL, "the default (no --rpc-url or $DM_RPC_URL)"
    record_path = data_dir / "deployment.json"
    try:
        url = json.loads(record_path.read_text())["rpc_url"]
    except (OSError, ValueError, KeyError, TypeError):
        url = None
    if isinstance(url, str) and url:
        return url, f"the deployment record {record_path}"
    return DEFAULT_RPC_URL, "the default (no --rpc-url, $DM_RPC_URL or deployment record)"


NODE_PORT = 12345  # node.py's default


def start_node(port: int) -> str:
    """The command that runs a node on `port`."""
    return "python3 node.py" + ("" if port == NODE_PORT else f" --port {port}")


def start_chain(url: str) -> str:
    """The command that runs the local chain at `url`."""
    return "python3 main.py chain" + ("" if url == DEFAULT_RPC_URL else f" --rpc-url {url}")


def chain_hint(url: str) -> str:
    """What to do when no chain answers at `url` (imports web3: for error paths after it is loaded)."""
    from dm.chain.devchain import is_loopback

    if not is_loopback(url):
        return "check that the Ethereum node there is running, or point --rpc-url at a running chain"
    return f"start it with `{start_chain(url)}`, or point --rpc-url at a running chain"
