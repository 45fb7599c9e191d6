"""What the top-level entry points do before anything else: find the project's
packages (re-running under .venv/bin/python when this python lacks them), then
run a command line so that Ctrl-C at any moment ends it without a traceback.

Standard library only: it must work under a bare system python3.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
VENV = PROJECT_ROOT / ".venv"
REQUIRED = ("web3", "cryptography", "prompt_toolkit")  # one of each kind requirements.txt installs
_REEXEC_MARK = "DM_REEXECUTED"  # set for the child, so a broken venv cannot loop


def missing_packages() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def ensure_packages(argv: list[str]) -> None:
    """Returns when this python has the packages; otherwise re-executes the script
    under the project's virtualenv, or exits with one line saying what to run."""
    missing = missing_packages()
    if not missing:
        return
    venv_python = VENV / "bin" / "python"
    in_venv = Path(sys.prefix).resolve() == VENV.resolve()
    if venv_python.exists() and not in_venv and not os.environ.get(_REEXEC_MARK):
        os.environ[_REEXEC_MARK] = "1"
        os.execv(str(venv_python), [str(venv_python), *argv])
    script = Path(argv[0]).name if argv else "this command"
    print(f"{script}: Python packages missing ({', '.join(missing)}): run `make setup` in {PROJECT_ROOT} "
          f"(it creates .venv), then run this command again", file=sys.stderr)
    sys.exit(1)


def _interrupted() -> int:
    print(file=sys.stderr)  # leave the shell prompt on a line of its own
    return 130


def run(module: str) -> None:
    """Entry point body: `module`.main(), Ctrl-C ending it quietly with status 130, and a reader
    that stopped reading our output (`main.py info | head`) with no traceback."""
    try:
        ensure_packages(sys.argv)
        code = importlib.import_module(module).main()
    except KeyboardInterrupt:
        code = _interrupted()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        code = 141  # as a shell reports SIGPIPE
    except Exception as exc:  # a Ctrl-C during an import may come wrapped (a RuntimeError from __set_name__)
        if not isinstance(exc.__cause__, KeyboardInterrupt):
            raise
        code = _interrupted()
    sys.exit(code)
