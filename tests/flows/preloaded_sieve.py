"""A preloaded ``sieve`` for crash trials: one process imports what ``sieve`` needs once, then
forks a child per request that runs ``flows.cli.main(args)``. Each child is a real run in its
own process (SIGKILL ends it like any other) without the interpreter start and imports
(~5 s of CPU each on this project).

Protocol, one JSON object per stdin line: ``{"args": [...], "log": PATH, "exit": PATH}``; the
reply is the child's pid on a stdout line. The child's stdout and stderr go to ``log``; when it
finishes it writes its exit code to ``exit`` (atomically), so a killed child writes none.
Run it as ``python -m tests.flows.preloaded_sieve`` with the environment the runs need
(PREFECT_API_URL to share one Prefect API).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path


def serve() -> None:
    import flows.cli
    import flows.environment
    import flows.evaluate
    import flows.pipeline
    import presentation.report  # noqa: F401
    import tasks.train  # noqa: F401  (everything ``main`` imports lazily)
    from storage.atomic import write_text_atomic

    signal.signal(signal.SIGCHLD, _reap)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request, flows.cli.main, write_text_atomic)
        print(pid, flush=True)


def _reap(signum: int, frame: object) -> None:
    """Reap every finished child (so its CPU time counts in this process's children's)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _child(request: dict, main, write_text_atomic) -> None:
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the run may wait on its own children
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        code = main(request["args"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        write_text_atomic(str(code), Path(request["exit"]))
        os._exit(code)


if __name__ == "__main__":
    serve()
