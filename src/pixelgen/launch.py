"""One `torchrun` per Slurm task: the multi-node training launcher (workflow `train_nodes: N`).

The train rule runs `srun --ntasks N python -m pixelgen.launch --nnodes N --nproc-per-node G -- train ...` inside
an N-node allocation; each task (one per node) becomes
`torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint <first node>:<port> -m pixelgen.cli ...`.

Why these choices:
- The rendezvous store lives on the step's first node, at a port derived from the job id: every task computes
  the same endpoint with no coordination, and a requeued job (same id) meets at the same place again.
- The first task on that node hosts the store (is_host=1), every other task only connects (is_host=0): torchrun's
  own guess (does the endpoint name this machine?) is true for every task when two tasks share a node (the
  one-node test cluster).
- Which process gets which global rank does not matter for results: c10d numbers the agents by their address and
  pid (torchrun ignores --node-rank with c10d), so ranks may land on other processes after a requeue, but the
  Trainer saves each global rank's data-stream position and RNG and restores them by global rank, and the data
  split follows the global rank (pixelgen.data), so a resumed run is bit-identical whatever the placement.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from .errors import PixelgenError

# Rendezvous ports: PORT_BASE + job id mod PORT_SPAN, below Linux's ephemeral range (32768+) so no outgoing
# connection holds the port by chance.
PORT_BASE, PORT_SPAN = 20000, 10000


def rendezvous_port(job_id: str) -> int:
    return PORT_BASE + int(job_id) % PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (`node[01-04]` -> node01), as Slurm itself expands it."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as err:
        raise PixelgenError(f"cannot expand the Slurm node list {nodelist!r} with scontrol ({err}): run inside a "
                            f"Slurm allocation with scontrol on PATH")
    return out[0]


TASK_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURMD_NODENAME", "SLURM_LOCALID")


def slurm_task(env: dict) -> tuple[str, str, str, int]:
    """(job id, the step's node list, this node's name, task id on this node) of this Slurm task; a one-line error
    outside `srun` in an allocation."""
    missing = [k for k in TASK_VARIABLES if k not in env]
    if missing:
        raise PixelgenError(f"pixelgen.launch runs one torchrun per Slurm task and {', '.join(missing)} is unset: "
                            f"start it with srun inside an allocation (the workflow's train_nodes > 1 needs "
                            f"--profile slurm)")
    return env["SLURM_JOB_ID"], env["SLURM_STEP_NODELIST"], env["SLURMD_NODENAME"], int(env["SLURM_LOCALID"])


def torchrun_argv(nnodes: int, nproc_per_node: int, job_id: str, host: str, hosts_store: bool,
                  args: list[str]) -> list[str]:
    """The torchrun command of one task: c10d rendezvous on `host`, run id = the job id."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--nproc-per-node", str(nproc_per_node), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{host}:{rendezvous_port(job_id)}", "--rdzv-id", f"pixelgen-{job_id}",
            "--rdzv-conf", f"is_host={int(hosts_store)}", "-m", "pixelgen.cli", *args]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pixelgen.launch", description=__doc__.splitlines()[0])
    p.add_argument("--nnodes", type=int, required=True, help="Slurm tasks (one per node) in the rendezvous")
    p.add_argument("--nproc-per-node", type=int, default=1, help="training processes per task (GPUs per node)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the pixelgen command, e.g. -- train --config ...")
    ns = p.parse_args(argv)
    ns.args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    if ns.nnodes < 1 or ns.nproc_per_node < 1 or not ns.args:
        p.error("--nnodes and --nproc-per-node must be >= 1, followed by -- and a pixelgen command")
    return ns


def main(argv: list[str] | None = None) -> None:
    ns = parse(sys.argv[1:] if argv is None else argv)
    try:
        job_id, nodelist, node, local_task = slurm_task(dict(os.environ))
        host = first_host(nodelist)
        argv = torchrun_argv(ns.nnodes, ns.nproc_per_node, job_id, host, node == host and local_task == 0, ns.args)
    except PixelgenError as err:
        sys.exit(f"error: {err}")
    # exec, not a child: Slurm's signals (--signal=TERM@...) and exit status reach torchrun directly
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
