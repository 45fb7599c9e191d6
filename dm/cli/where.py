"""Where a command finds the chain (standard library only: the client asks before it imports web3)."""
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
