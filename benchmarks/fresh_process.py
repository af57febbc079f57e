"""One measurement in a fresh Python process: the benchmarks' way of giving each point its own peak RSS, its own
allocator state and its own first-call costs, as the harness gives each grid cell its own process."""

from __future__ import annotations

import json
import subprocess
import sys


def run_fresh(script: str, *arguments: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script`` again with ``arguments`` in a new Python process (``env``: its environment, default this
    one's) and return the JSON object on the last line it printed. When the process fails, its stderr is passed on
    and ``subprocess.CalledProcessError`` (with ``stderr``) raised."""
    done = subprocess.run([sys.executable, script, *arguments], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])
