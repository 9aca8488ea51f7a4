"""`run_pixelgen(...)`: a `pixelgen` command line for tests, as a child of a preloaded process (see cli_zygote.py).

It returns what `subprocess.run(..., capture_output=True, text=True)` returns, so a test reads it the same way.
Tests about process lifetimes (SIGTERM, kills, concurrent jobs, torchrun, Slurm) start real processes themselves.
PIXELGEN_TEST_FORK=0 makes every call a new interpreter again (to rule the zygote out when a test misbehaves).
"""

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ZYGOTE = Path(__file__).with_name("cli_zygote.py")
_zygote: subprocess.Popen | None = None


def _started() -> subprocess.Popen:
    global _zygote
    if _zygote is None or _zygote.poll() is not None:
        _zygote = subprocess.Popen([sys.executable, str(ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, bufsize=1)
        hello = _zygote.stdout.readline()
        assert hello.startswith('{"ready"'), f"the CLI zygote did not start: {hello!r}"
        atexit.register(_zygote.kill)
    return _zygote


def _via_fork(args, env, cwd, timeout) -> tuple[int, str, str]:
    zygote = _started()
    with tempfile.TemporaryDirectory(prefix="pixelgen-cli-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        request = {"args": args, "env": env, "cwd": str(cwd or os.getcwd()), "stdout": str(out), "stderr": str(err)}
        zygote.stdin.write(json.dumps(request) + "\n")
        zygote.stdin.flush()
        pid = json.loads(zygote.stdout.readline())["pid"]
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, os.kill, (pid, signal.SIGKILL))
            timer.start()
        returncode = json.loads(zygote.stdout.readline())["returncode"]
        if timer is not None:
            timer.cancel()
            if returncode == -signal.SIGKILL:
                raise subprocess.TimeoutExpired(["pixelgen", *args], timeout)
        return returncode, out.read_text(errors="replace"), err.read_text(errors="replace")


def run_pixelgen(*args, env: dict | None = None, cwd=None, timeout: float | None = None):
    """Run `pixelgen ARGS` (env: the whole environment, as subprocess takes it) and return a CompletedProcess."""
    args = [str(a) for a in args]
    env = dict(os.environ if env is None else env)
    if os.environ.get("PIXELGEN_TEST_FORK", "1") == "0":
        return subprocess.run([sys.executable, "-m", "pixelgen.cli", *args], capture_output=True, text=True,
                              env=env, cwd=cwd, timeout=timeout)
    returncode, stdout, stderr = _via_fork(args, env, cwd, timeout)
    return subprocess.CompletedProcess([sys.executable, "-m", "pixelgen.cli", *args], returncode, stdout, stderr)
