"""Running the CLI in this process, for the many CLI tests (imported by the test modules)."""

from __future__ import annotations

import subprocess
import traceback


def run_main(*args, capsys) -> subprocess.CompletedProcess:
    """Run ``ofstitch.cli.main(ARGS)`` in this process, as the console script would.

    Quicker than a subprocess, for the many error paths; an exception that escapes
    becomes exit code 1 and a traceback on stderr, as it would in a real process.
    """
    from ofstitch.cli import main

    capsys.readouterr()
    code, tb = 0, ""
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:
        code, tb = 1, traceback.format_exc()
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err + tb)
