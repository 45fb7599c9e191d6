"""The compile pipeline, the anvil launcher and main.py, driven as a user would."""
from __future__ import annotations

import json
import shutil
import stat
import subprocess

from conftest import PYTHON, ROOT, cli_env, free_port, make_users
from dm.chain import build as contract_build
from dm.chain import devchain, ethereum
from dm.chain.faucet import USER_GRANT_BTK, faucet_signer, fund_user


def run_cli(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_committed_artifact_matches_a_fresh_compile():
    fresh = contract_build.compile_artifact()
    committed = ethereum.load_artifact()
    assert committed["sourceHash"] == fresh["sourceHash"], "contract.sol changed: run python3 -m dm.chain.build"
    assert committed["bytecode"] == fresh["bytecode"]
    assert committed["abi"] == fresh["abi"]


def test_a_one_character_change_makes_the_artifact_stale(tmp_path, monkeypatch):
    edited = tmp_path / "contract.sol"
    edited.write_text(contract_build.SOURCE.read_text().replace("1e18", "2e18", 1))
    sources = contract_build.collect_sources(edited)
    assert contract_build.source_hash(sources) != ethereum.load_artifact()["sourceHash"]


def test_keys_are_created_private_and_never_overwritten(tmp_path):
    env = cli_env("http://127.0.0.1:1", tmp_path)
    created = run_cli("main.py", "Y", "user_1", "user_2", env=env)
    assert created.returncode == 0, created.stderr
    for name in ("user_1", "user_2"):
        private = tmp_path / "keys" / f"{name}_PRIVATE.pem"
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "keys" / f"{name}_ETH.key").stat().st_mode) == 0o600
        assert (tmp_path / "keys" / f"{name}_PUBLIC.pem").read_text().startswith("-----BEGIN PUBLIC KEY")
        assert "PRIVATE" not in created.stdout and private.read_text() not in created.stdout
    before = (tmp_path / "keys" / "user_1_PRIVATE.pem").read_bytes()
    again = run_cli("main.py", "Y", "user_1", env=env)
    assert again.returncode != 0
    assert "refusing to overwrite" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "keys" / "user_1_PRIVATE.pem").read_bytes() == before
    bad = run_cli("main.py", "Y", "../evil", env=env)
    assert bad.returncode != 0 and "invalid name" in bad.stderr and "Traceback" not in bad.stderr


def test_chain_starts_by_itself_keeps_state_and_info_matches_it(tmp_path):
    """main.py chain brings up anvil and deploys; a restart keeps balances;
    main.py info reports what the chain says."""
    url = f"http://127.0.0.1:{free_port()}"
    env = cli_env(url, tmp_path)
    assert run_cli("main.py", "Y", "alice", env=env).returncode == 0
    w3, anvil = devchain.ensure_chain(url, tmp_path)
    assert anvil is not None and w3.eth.chain_id == 31337
    try:
        token, record = devchain.ensure_deployment(w3, url, tmp_path)
        assert token.is_genuine()
        alice = ethereum.address_of((tmp_path / "keys" / "alice_ETH.key").read_text())
        faucet = faucet_signer(w3, tmp_path)
        assert fund_user(token, faucet, alice)
        token.transfer(faucet, alice, 7 * ethereum.TOKEN)
        expected = token.balance_of(alice)
        assert expected == USER_GRANT_BTK + 7 * ethereum.TOKEN
    finally:
        anvil.stop()
    assert (tmp_path / "chain" / "anvil-state.json").exists()

    w3, anvil = devchain.ensure_chain(url, tmp_path)
    try:
        token_again, record_again = devchain.ensure_deployment(w3, url, tmp_path)
        assert record_again == record, "the deployment must survive a restart, not be redeployed"
        assert token_again.balance_of(alice) == expected
        info = run_cli("main.py", "info", "--json", env=env)
        assert info.returncode == 0, info.stderr
        data = json.loads(info.stdout)
        assert data["deployment"]["address"] == token.address
        assert data["deployment"]["chain_id"] == 31337
        (user,) = data["users"]
        assert user["eth_address"] == alice and user["btk_wei"] == expected and user["btk"] == expected / ethereum.TOKEN
        text = run_cli("main.py", "info", env=env).stdout
        assert token.address in text and f"{expected / ethereum.TOKEN:g} BTK" in text
    finally:
        anvil.stop()


def test_info_without_a_chain_is_a_clear_message_not_a_traceback(tmp_path):
    result = run_cli("main.py", "info", env=cli_env("http://127.0.0.1:1", tmp_path))
    assert result.returncode == 0 and "no users yet" in result.stdout and "Traceback" not in result.stderr


def test_node_without_anvil_installed_or_chain_says_so(tmp_path):
    # A non-loopback URL that nobody serves: no anvil is started, and the error is readable.
    result = run_cli("node.py", "--port", "0", "--rpc-url", "http://192.0.2.1:8545", env=cli_env("", tmp_path))
    assert result.returncode == 1 and "no Ethereum node answers" in result.stderr
    assert "Traceback" not in result.stderr


def test_solcjs_shim_speaks_like_solc():
    if shutil.which("solc"):
        return  # a native solc is used instead; nothing to check here
    version = subprocess.run([str(contract_build.SOLC_JS_SHIM), "--version"], capture_output=True, text=True)
    assert "0.8." in version.stdout
    assert contract_build.find_compiler() == contract_build.SOLC_JS_SHIM


def test_solcjs_shim_resolves_files_by_url_and_returns_output_past_64_kib():
    """Slither (tools/slither.sh) hands the shim contract.sol by URL and asks
    for ASTs: the shim must find the file and its OpenZeppelin imports, and
    pass on all of solc-js's output, which node cuts at 64 KiB on a pipe."""
    if not (contract_build.NODE_MODULES / "solc" / "solc.js").exists():
        return  # no solc-js: contract_build uses a native solc
    request = {"language": "Solidity", "sources": {"contract.sol": {"urls": ["contract.sol"]}},
               "settings": {"outputSelection": {"*": {"": ["ast"]}}}}
    result = subprocess.run([str(contract_build.SOLC_JS_SHIM), "--standard-json", "--allow-paths", str(ROOT)],
                            input=json.dumps(request), capture_output=True, text=True, cwd="/", timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) > 65_536
    output = json.loads(result.stdout)
    assert [e for e in output.get("errors", []) if e["severity"] == "error"] == []
    assert set(output["sources"]) == set(contract_build.collect_sources())


def test_info_and_refund_use_the_chain_recorded_in_the_data_directory(anvil_chain):
    """Without --rpc-url or $DM_RPC_URL, main.py looks where client.py looks: the chain that
    deployment.json was recorded on (here not the default port)."""
    data, url = anvil_chain["data_dir"], anvil_chain["url"]
    make_users(data, "user_1")
    env = {key: value for key, value in cli_env("", data).items() if key != "DM_RPC_URL"}
    info = run_cli("main.py", "info", env=env)
    assert info.returncode == 0 and "Traceback" not in info.stderr, info.stderr
    assert "not reachable" not in info.stdout and f"RPC URL:        {url}" in info.stdout
    assert any(line.startswith("user_1") and line.endswith(" 0 BTK") for line in info.stdout.splitlines()), info.stdout
    refund = run_cli("main.py", "refund", "user_1", env=env)
    assert refund.returncode == 0 and refund.stdout.strip() == "refunded 0 BTK", refund.stderr
