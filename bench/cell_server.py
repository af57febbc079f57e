"""Imported first by the forkserver that starts ddbench's cells (``bench.runner._child_context``), before torch.

A terminal's Ctrl-C reaches the whole process group, the forkserver included. Once it serves, the forkserver
ignores SIGINT, but in its first seconds — Python's start-up, then the imports of torch and the harness — a Ctrl-C
printed a KeyboardInterrupt traceback under ddbench's one line. ddbench starts it with SIGINT blocked
(``bench.runner._start_forkserver``), so a Ctrl-C until here waits; here a Ctrl-C, the waiting one included,
ends it at once and quietly (ddbench itself reports the interruption). The cells it forks start with this handler
and install Python's default one first thing (``bench.runner._cell_child``).
"""

import os
import signal

EXIT_INTERRUPTED = 130  # as a shell reports a process ended by Ctrl-C


def _end_quietly(signum: int, frame: object) -> None:
    os._exit(EXIT_INTERRUPTED)


signal.signal(signal.SIGINT, _end_quietly)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
