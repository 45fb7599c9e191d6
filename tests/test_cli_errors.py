"""What a new user reads when something is off: one line that says what is wrong and what to do,
never a traceback. Real main.py, node.py and client.py processes, run side by side to keep it quick."""
from __future__ import annotations

import contextlib
import io
import re
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, cli_env, free_port, make_users
from dm import crypto, datadir
from dm.cli import accounts

NO_CHAIN = "http://127.0.0.1:9"  # discard: nothing answers there (node.py stops before it starts a chain)


def run_all(env: dict, *commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Runs the commands side by side; each must end with status 1 and one line on stderr, no traceback."""
    def run(args):
        return subprocess.run([PYTHON, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=120)

    with ThreadPoolExecutor(len(commands)) as pool:
        results = list(pool.map(run, commands))
    for result in results:
        assert result.returncode == 1, (result.args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, (result.args, result.stderr)
    return results


def test_a_data_directory_that_cannot_be_one_is_named_in_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    results = run_all(cli_env(NO_CHAIN, tmp_path / "unused"),
                      ["main.py", "--data-dir", str(afile), "Y", "zed"],
                      ["client.py", "--data-dir", str(afile), "localhost", "1", "zed", "ann"],
                      ["node.py", "--data-dir", str(afile), "--port", str(free_port())])
    for result in results:
        assert f"cannot use {afile} as the data directory: it is a file, not a directory; pass --data-dir with a " \
               "writable directory" in result.stderr, result.stderr
    for where, reason in ((afile / "sub", f"{afile} is a file, not a directory"),
                          (Path("/sys/x"), "operation not permitted")):
        with pytest.raises(datadir.DataError, match=f"cannot use {where} as the data directory: {reason}; "):
            datadir.resolve(str(where))


def test_broken_ethereum_keys_an_unknown_user_and_a_bad_host_are_explained(tmp_path):
    make_users(tmp_path, "user_1")
    key_file = tmp_path / "keys" / "user_1_ETH.key"
    key_file.write_text("")
    results = run_all(cli_env(NO_CHAIN, tmp_path),
                      ["main.py", "info"],
                      ["main.py", "refund", "nobody"],
                      ["node.py", "--host", "nosuch.invalid", "--port", "0"])
    assert f"{key_file} is empty (it should hold 64 hex digits): restore it from a backup" in results[0].stderr
    key_file.write_text("not hex at all\n")
    with pytest.raises(datadir.DataError, match="is not an Ethereum private key"):
        datadir.read_eth_key(key_file)
    assert "there is no user 'nobody' here" in results[1].stderr and "`python3 main.py info`" in results[1].stderr
    assert "cannot listen on nosuch.invalid" in results[2].stderr and "give --host" in results[2].stderr
    assert "while attempting" not in results[2].stderr and "Errno" not in results[2].stderr


@pytest.fixture
def five_users(tmp_path):
    """k1..k5 made, as `main.py Y k1 ... k6` leaves them when Ctrl-C comes during k6."""
    make_users(tmp_path, "k1", "k2", "k3", "k4", "k5")
    return tmp_path


def test_keys_for_some_names_point_at_the_command_for_the_others(five_users):
    (result,) = run_all(cli_env(NO_CHAIN, five_users), ["main.py", "Y", "k1", "k2", "k3", "k4", "k5", "k6"])
    assert f"keys already exist for k1, k2, k3, k4, k5 in {five_users / 'keys'}" in result.stderr
    assert "create the others with `python3 main.py Y k6`" in result.stderr
    assert not list((five_users / "keys").glob("k6_*"))


def test_half_made_or_broken_key_files_are_named(five_users):
    keys = five_users / "keys"
    (keys / "k2_ETH.key").unlink()
    (keys / "k3_PRIVATE.pem").write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n")
    results = run_all(cli_env(NO_CHAIN, five_users), ["main.py", "Y", "k2"], ["main.py", "Y", "k3"])
    assert f"{keys / 'k2_ETH.key'} is missing" in results[0].stderr, results[0].stderr
    assert f"{keys / 'k3_PRIVATE.pem'} is not a readable key" in results[1].stderr, results[1].stderr
    for result in results:
        assert "restore it from a backup" in result.stderr and "move away" in result.stderr


def test_an_interrupted_key_creation_leaves_no_half_made_user(tmp_path, monkeypatch):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(crypto, "save_public_key", interrupted)
    with pytest.raises(KeyboardInterrupt), contextlib.redirect_stdout(io.StringIO()):
        accounts.create_users(tmp_path, ["k7"], bits=2048)
    assert not list(datadir.keys_dir(tmp_path).iterdir())


def test_main_py_takes_its_options_after_the_command_and_states_its_name_rule(five_users, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    env = cli_env(NO_CHAIN, elsewhere)
    with ThreadPoolExecutor(1) as pool:
        info = pool.submit(subprocess.run, [PYTHON, "main.py", "info", "--data-dir", str(five_users), "--rpc-url",
                                            NO_CHAIN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        existing, unicode, dot = run_all(env, ["main.py", "Y", "k1", "--data-dir", str(five_users)],
                                         ["main.py", "Y", "алиса"], ["main.py", "Y", "."])
        info = info.result()
    assert f"keys already exist for k1 in {five_users / 'keys'}" in existing.stderr
    assert info.returncode == 0 and f"data directory: {five_users}" in info.stdout, info.stderr
    for result in (unicode, dot):
        assert "ASCII letters" in result.stderr and "not starting with '.'" in result.stderr, result.stderr


def hang_up(listener: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while True:
            listener.accept()[0].close()


def test_hints_carry_the_port_and_chain_in_use(tmp_path):
    make_users(tmp_path, "user_1")
    node_port = free_port()
    with socket.create_server(("127.0.0.1", 0)) as not_a_chain:  # takes connections and hangs up: no chain
        threading.Thread(target=hang_up, args=(not_a_chain,), daemon=True).start()
        chain = f"http://127.0.0.1:{not_a_chain.getsockname()[1]}"
        results = run_all(cli_env(chain, tmp_path),
                          ["client.py", "127.0.0.1", str(node_port), "user_1", "user_2"],
                          ["main.py", "refund", "user_1"],
                          ["node.py", "--port", str(free_port())])
    assert f"(`python3 node.py --port {node_port}`)" in results[0].stderr, results[0].stderr
    for result in results[1:]:
        assert f"`python3 main.py chain --rpc-url {chain}`" in result.stderr, result.stderr


def test_output_to_a_reader_that_stopped_reading_ends_without_a_traceback(tmp_path):
    """`main.py info | head -1`: head exits, the next write fails with EPIPE; no traceback."""
    proc = subprocess.Popen([PYTHON, "main.py", "--data-dir", str(tmp_path), "--rpc-url", "http://127.0.0.1:1",
                             "info"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before main.py writes anything
    _, stderr = proc.communicate(timeout=60)
    assert b"Traceback" not in stderr and b"Exception ignored" not in stderr, stderr.decode()
    assert proc.returncode == 141


@pytest.mark.parametrize("script", ["client.py", "node.py", "main.py"])
def test_ctrl_c_in_the_first_moments_of_an_entry_point_prints_no_traceback(tmp_path, script):
    """Ctrl-C while the entry point is still importing its bootstrap (before bootstrap.run can
    catch it), and in the moments after."""
    import signal
    import time

    # Each command ends by itself soon after its imports (nothing listens, no such port), so an
    # interrupt that Python's own start-up swallows costs a moment, not a running node.
    args = {"client.py": ["127.0.0.1", "9", "ann", "bob"], "node.py": ["--port", "99999"], "main.py": ["info"]}[script]
    tracebacks = []
    for delay in (0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2):
        proc = subprocess.Popen([PYTHON, script, *args], cwd=ROOT, env=cli_env(NO_CHAIN, tmp_path),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            _, errors = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
        # An interrupt inside Python's own start-up is Python's to report: in site.py, or while it
        # reads and compiles the script ("line 0"), before the script's first line runs.
        if "Traceback" in errors and re.search(rf'{script}", line [1-9]', errors):
            tracebacks.append((delay, errors))
    assert not tracebacks, f"{len(tracebacks)} traceback(s); the first:\n{tracebacks[0][1]}"


def test_a_file_where_a_folder_of_the_data_directory_goes_is_named_in_one_line(tmp_path):
    (tmp_path / "keys").write_text("")
    (tmp_path / "node").write_text("")
    main_y, node = run_all(cli_env(NO_CHAIN, tmp_path),
                           ["main.py", "Y", "zed"],
                           ["node.py", "--host", "127.0.0.1", "--port", "0"])
    for result, folder in ((main_y, "keys"), (node, "node")):
        assert f"cannot make the folder {tmp_path / folder}" in result.stderr, result.stderr
        assert f"{tmp_path / folder} is a file, not a folder; move it out of the way, or pass --data-dir" \
            in result.stderr, result.stderr


def test_a_disk_problem_at_start_up_names_the_path_not_the_chain(tmp_path):
    """DATA/clients/NAME/books is a file where the client keeps its books: a disk problem, to be
    named with its path and what to do, not reported as the chain being away."""
    make_users(tmp_path, "user_1")
    books = tmp_path / "clients" / "user_1" / "books"
    books.parent.mkdir(parents=True)
    books.write_text("not a directory")
    with socket.create_server(("127.0.0.1", 0)) as listener:  # something listens where the node should be
        results = run_all(cli_env(NO_CHAIN, tmp_path),
                          ["client.py", "127.0.0.1", str(listener.getsockname()[1]), "user_1", "user_2"])
    said = results[0].stderr
    assert f"cannot use {books}: File exists" in said and "move away a file in their place" in said, said
    assert "chain" not in said, said
