"""A user's session as the client library sees it, on a real node (in this process) and a real
EVM (eth-tester): what a clean exit leaves on disk, and what the user reads when the session
ends, when a key file is broken, and when a command names someone or something that is not there."""
from __future__ import annotations

import json

from conftest import make_users


def book_records(data_dir, name: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in (data_dir / "clients" / name / "books").glob("*.json")]


def test_a_clean_exit_saves_the_books_real_cursor_so_the_next_run_spends_the_next_leaf(tester_node):
    """The cursor is saved ahead of use (a crash must never reuse a code), but a clean exit writes
    back the real next unused leaf: one message per run spends one leaf, not one book every 3 runs."""
    make_users(tester_node.data_dir, "dave", "carol")
    tester_node.client("carol")
    indices = []
    for run in range(1, 4):
        dave = tester_node.client("dave", book_size=100)
        dave.send_text("carol", f"m{run}")
        assert dave.wait_acknowledged(timeout=10)
        indices.append(dave.last_bounty["index"])
        dave.close()
        records = book_records(tester_node.data_dir, "dave")
        assert len(records) == 1 and records[0]["cursor"] == run, records
    assert indices == [0, 1, 2]
