"""A process that imports pixelgen's heavy libraries once, then forks a fresh child for each `pixelgen` command.

Why: on CI's 2 cores every `python -m pixelgen.cli ...` spends 5-15 s importing torch, torchvision, timm, lpips,
torch-fidelity and mlflow before it does anything, and the suite runs a few hundred such commands. A child forked
from this process is still its own process (own exit code, stdout/stderr, environment, working directory, signals,
atexit handlers) but starts with those imports done. Only imports happen here: no tensor is made, no thread is
started, no file is opened, so the children start as clean as a new interpreter.

Protocol (one request at a time, JSON lines): the test process writes
{"args": [...], "env": {...}, "cwd": "...", "stdout": PATH, "stderr": PATH}; this process answers {"pid": N} once
the child runs, then {"returncode": RC} (negative for a signal, like subprocess). EOF on stdin ends it.
"""

import atexit
import importlib
import json
import os
import sys
import threading
import traceback

PRELOAD = (
    "torch", "torchvision", "timm", "lpips", "torch_fidelity", "mlflow", "mlflow.pytorch",
    "mlflow.store.tracking.sqlalchemy_store", "webdataset", "yaml", "pixelgen.cli", "pixelgen.train",
    "pixelgen.sample_job", "pixelgen.score", "pixelgen.official", "pixelgen.report", "pixelgen.shards",
    "pixelgen.tracking",
)


def run_child(request: dict) -> None:
    """In the forked child: become the requested command line, run it, exit as an interpreter would."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, key in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(request[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.stdin = open(0, encoding="utf-8", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False, errors="backslashreplace")
        import torch

        # libgomp read OMP_NUM_THREADS when this process imported torch; the command's own value wins
        if "OMP_NUM_THREADS" in os.environ:
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        from pixelgen import cli

        sys.argv = [cli.__file__, *request["args"]]
        code = cli.main(request["args"])
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter prints for an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        try:
            threading._shutdown()  # an interpreter waits for non-daemon threads, then runs atexit
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def serve() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    reply = sys.stdout
    print(json.dumps({"ready": os.getpid()}), file=reply, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request)
        print(json.dumps({"pid": pid}), file=reply, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=reply, flush=True)


if __name__ == "__main__":
    serve()
