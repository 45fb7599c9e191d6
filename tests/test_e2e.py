"""End to end: node.py and client.py as processes, on anvil, through their CLIs."""
from __future__ import annotations

import json
import signal
import time

import pytest

from conftest import cli_env, free_port, make_users, wait_until
from dm import datadir
from dm.chain import ethereum

pytestmark = pytest.mark.e2e


def start_node(processes, env, port, *extra):
    node = processes(["node.py", "--host", "127.0.0.1", "--port", str(port), *extra], env)
    node.wait_for_line(lambda l: l.startswith("node ready"), timeout=60)
    return node


def start_client(processes, env, port, me, peer, *extra):
    client = processes(["client.py", "127.0.0.1", str(port), me, peer, *extra], env)
    client.wait_for_line(lambda l: l.startswith("connected to"), stream="errors")
    return client


def token_and_accounts(url, data_dir):
    w3 = ethereum.connect(url)
    record = json.loads((data_dir / "deployment.json").read_text())
    token = ethereum.BountyToken(w3, record["address"])
    node_address = ethereum.address_of((data_dir / "node" / "node_ETH.key").read_text())
    user = lambda name: ethereum.address_of((data_dir / "keys" / f"{name}_ETH.key").read_text())
    return token, node_address, user


def test_the_original_four_commands_give_a_paid_encrypted_conversation(tmp_path, processes):
    """main.py Y, node.py (which starts anvil itself), and two client.py: each
    message costs its sender exactly 1 BTK and pays the node exactly 1 BTK."""
    url = f"http://127.0.0.1:{free_port()}"
    env = cli_env(url, tmp_path)
    make_users(tmp_path, "user_1", "user_2")
    port = free_port()
    node = start_node(processes, env, port, "--batch-wait", "0.2")
    user_2 = start_client(processes, env, port, "user_2", "user_1", "--pay", "single")
    user_1 = start_client(processes, env, port, "user_1", "user_2", "--pay", "single")
    token, node_address, user = token_and_accounts(url, tmp_path)
    wait_until(lambda: token.balance_of(user("user_1")) > 0 and token.balance_of(user("user_2")) > 0,
               message="both users to be funded by the node")
    before = {who: token.balance_of(user(who)) for who in ("user_1", "user_2")}
    node_before = token.balance_of(node_address)

    user_1.write("hello user_2\n")
    user_2.wait_for_line(lambda l: l == "[user_1] hello user_2")
    user_2.write("hi user_1, got it\n")
    user_1.wait_for_line(lambda l: l == "[user_2] hi user_1, got it")
    user_1.write("one more\n")
    user_2.wait_for_line(lambda l: l == "[user_1] one more")

    wait_until(lambda: token.balance_of(node_address) - node_before == 3 * ethereum.TOKEN, timeout=30,
               message="the node to redeem all three codes")
    assert before["user_1"] - token.balance_of(user("user_1")) == 2 * ethereum.TOKEN
    assert before["user_2"] - token.balance_of(user("user_2")) == 1 * ethereum.TOKEN
    # The node's log shows what it did; and it never prints a key.
    user_1.close_stdin()
    user_2.close_stdin()
    assert user_1.proc.wait(30) == 0 and user_2.proc.wait(30) == 0
    assert node.stop() == 0
    log = "\n".join(node.lines + node.errors)
    assert "+ user_1 connected" in log and "redeemed" in log
    for secret in (tmp_path / "keys").glob("*_ETH.key"):
        assert secret.read_text() not in log


@pytest.fixture
def running(tmp_path, processes, anvil_chain):
    """anvil (started by the project's launcher), users, and a node process."""
    data_dir = anvil_chain["data_dir"]
    env = cli_env(anvil_chain["url"], data_dir)
    port = free_port()
    return {"env": env, "port": port, "data_dir": data_dir, "url": anvil_chain["url"],
            "token": anvil_chain["token"]}


def test_a_100kb_message_and_2000_piped_lines_all_arrive_in_order(running, processes):
    env, port = running["env"], running["port"]
    make_users(running["data_dir"], "alice", "bob")
    # Room for every line to wait for its code at once: this test is about order and size; a
    # recipient that falls behind by --max-unclaimed is the next test's.
    start_node(processes, env, port, "--max-unclaimed", "4000")
    bob = start_client(processes, env, port, "bob", "alice")
    alice = start_client(processes, env, port, "alice", "bob", "--book-size", "500")
    big = "".join(chr(0x41 + i % 26) for i in range(100_000))
    alice.write(big + "\n")
    bob.wait_for_line(lambda l: l.startswith("[alice] A"), timeout=60)
    assert bob.lines[0] == f"[alice] {big}"
    lines = [f"line {i:04d} of the burst" for i in range(2000)]
    alice.write("\n".join(lines) + "\n")
    alice.close_stdin()  # end of input: alice waits for every acknowledgement, then exits
    assert alice.proc.wait(240) == 0, alice.errors[-5:]
    wait_until(lambda: len(bob.lines) == 2001, timeout=120,
               message=f"2000 lines (have {len(bob.lines)}; bob's last errors: {bob.errors[-3:]})")
    assert bob.lines[1:] == [f"[alice] {line}" for line in lines]
    assert not [e for e in alice.errors if "not delivered" in e]


def test_lines_refused_for_unclaimed_codes_are_sent_again_not_lost(running, processes):
    """--max-unclaimed is back-pressure: with 20, a piped burst of 300 lines outruns bob's codes,
    the node refuses the excess with unclaimed_limit, and alice's client sends those again once
    codes have come back. Every line arrives (the order of the lines that were held back may
    change); none is reported not delivered. (Before, each refused line was dropped.)"""
    env, port = running["env"], running["port"]
    make_users(running["data_dir"], "alice", "bob")
    start_node(processes, env, port, "--max-unclaimed", "20")
    bob = start_client(processes, env, port, "bob", "alice")
    alice = start_client(processes, env, port, "alice", "bob", "--book-size", "400")
    lines = [f"held line {i:03d}" for i in range(300)]
    alice.write("\n".join(lines) + "\n")
    alice.close_stdin()
    assert alice.proc.wait(240) == 0, alice.errors[-5:]
    wait_until(lambda: len(bob.lines) == 300, timeout=120, message=f"300 lines (have {len(bob.lines)})")
    assert sorted(bob.lines) == [f"[alice] {line}" for line in lines]
    assert not [e for e in alice.errors if "not delivered" in e]
    assert any("holds sends back" in e for e in alice.errors)  # the cap was reached, and alice was told
    assert len([e for e in alice.errors if "holds sends back" in e]) < 300  # once a spell, not once a line


def test_claiming_a_name_without_its_key_is_refused(running, processes, tmp_path):
    env, port = running["env"], running["port"]
    make_users(running["data_dir"], "user_1", "user_2")
    start_node(processes, env, port)
    genuine = start_client(processes, env, port, "user_2", "user_1")
    # An impostor: its own keys for the name user_2, in its own data directory.
    impostor_dir = tmp_path / "impostor"
    make_users(impostor_dir, "user_2")
    impostor = processes(["client.py", "127.0.0.1", str(port), "user_2", "user_1", "--data-dir",
                          str(impostor_dir)], env)
    assert impostor.proc.wait(30) == 1
    wait_until(lambda: any("pinned to another key" in e for e in impostor.errors), message="the refusal")
    assert not any("Traceback" in e for e in impostor.errors)
    assert genuine.proc.poll() is None  # the real user_2 is still connected


def test_a_node_killed_with_codes_pending_redeems_each_exactly_once_after_restart(running, processes):
    env, port, token = running["env"], running["port"], running["token"]
    make_users(running["data_dir"], "alice", "bob")
    # Codes queue up: nothing is redeemed until 1000 are pending or 1000 s pass.
    node = start_node(processes, env, port, "--batch-size", "1000", "--batch-wait", "1000")
    bob = start_client(processes, env, port, "bob", "alice")
    alice = start_client(processes, env, port, "alice", "bob", "--book-size", "20")
    alice.write("".join(f"pending {i}\n" for i in range(12)))
    wait_until(lambda: len(bob.lines) == 12, message="12 deliveries")
    journal = running["data_dir"] / "node" / "journal.jsonl"
    wait_until(lambda: journal.exists() and journal.read_text().count('"claim"') == 12, message="12 journaled codes")
    _, node_address, _ = token_and_accounts(running["url"], running["data_dir"])
    before = token.balance_of(node_address)
    node.stop(signal.SIGKILL)
    assert token.balance_of(node_address) == before  # nothing was redeemed before the crash

    restarted = start_node(processes, env, port, "--batch-wait", "0.2")
    wait_until(lambda: token.balance_of(node_address) - before == 12 * ethereum.TOKEN, timeout=30,
               message="the 12 journaled codes to be redeemed")
    restarted.stop()  # a clean stop must not redeem anything twice
    restarted_again = start_node(processes, env, port, "--batch-wait", "0.2")
    restarted_again.stop()
    assert token.balance_of(node_address) - before == 12 * ethereum.TOKEN
    root = bytes.fromhex(json.loads(next((running["data_dir"] / "clients" / "alice" / "books").glob("*.json"))
                                    .read_text())["root"].removeprefix("0x"))
    alice_address = ethereum.address_of(datadir.read_secret(datadir.eth_key_path(running["data_dir"], "alice")))
    assert token.book(alice_address, root).spent == 12
    assert all(token.is_leaf_spent(alice_address, root, i) for i in range(12))
    assert not token.is_leaf_spent(alice_address, root, 12)


def test_piped_input_that_ends_while_the_node_is_away_exits_soon_saying_what_stays_queued(running, processes):
    """`(echo a; sleep 8; echo b) | client.py ...` with the node stopped in between: at the end
    of input the client says what it waits for, and when the node is not back within 5 s it
    exits, saying that the line stays queued on disk (it waited the whole --reconnect-for)."""
    env, port = running["env"], running["port"]
    make_users(running["data_dir"], "dave", "erin")
    node = start_node(processes, env, port)
    erin, dave = (processes(["client.py", "127.0.0.1", str(port), me, peer], env)
                  for me, peer in (("erin", "dave"), ("dave", "erin")))
    for client in (erin, dave):
        client.wait_for_line(lambda line: line.startswith("connected to"), stream="errors")
    dave.write("a\n")
    erin.wait_for_line(lambda line: line == "[dave] a", timeout=30)
    time.sleep(0.3)  # its receipt
    node.stop(signal.SIGINT)
    dave.wait_for_line(lambda line: "reconnecting" in line, timeout=30, stream="errors")
    dave.write("b\n")
    dave.close_stdin()
    ended = time.monotonic()
    assert dave.proc.wait(20) == 0, dave.errors
    assert time.monotonic() - ended < 9
    said = "\n".join(dave.errors)
    assert "end of input: the node is away; waiting up to 5s for it to come back" in said, said
    assert "1 message(s) stay queued on disk" in said and "did not come back within 5s" in said, said
