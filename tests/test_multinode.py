"""Training on several nodes (workflow `train_nodes: N`): one torchrun per Slurm task, c10d rendezvous on the first
node. On the one-node local cluster two tasks stand in for two nodes (gloo on CPU)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pixelgen import launch
from pixelgen.errors import PixelgenError
from test_train import states_equal
from test_workflow import ENV, project_copy, slurm_available, snakemake

needs_slurm = pytest.mark.skipif(not slurm_available(), reason="no Slurm cluster (start one with "
                                 "/work/shared/slurm/setup-local-slurm.sh, or .ci/run)")


def workflow_config(root: Path, name: str, **values) -> str:
    config = yaml.safe_load((root / "config/test.yaml").read_text())
    config.update(values)
    (root / f"config/{name}.yaml").write_text(yaml.safe_dump(config))
    return f"config/{name}.yaml"


def train_jobs(dry_run: str) -> list[tuple[str, str]]:
    """(resources line, shell command) of each train job in `snakemake -n -p` output."""
    blocks = dry_run.split("rule train:")[1:]
    return [(re.search(r"resources: (.*)", b).group(1), re.search(r"Shell command: (.*)", b).group(1))
            for b in blocks]


def test_train_rule_launches_one_torchrun_per_node_for_train_nodes_above_one(tmp_path):
    root = project_copy(tmp_path / "p")
    commands = {}
    for nodes, gpus in [(1, 0), (1, 8), (2, 0), (3, 4)]:
        config = workflow_config(root, f"n{nodes}g{gpus}", train_nodes=nodes, train_gpus=gpus)
        result = snakemake(root, "-n", "-p", "--cores", "1", "all", "--configfile", config)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        jobs = train_jobs(result.stdout)
        assert len(jobs) == 2
        commands[nodes, gpus] = jobs[0]
    resources, shell = commands[1, 0]
    assert shell.startswith("pixelgen train ") and "nodes=" not in resources and "mpi" not in resources
    resources, shell = commands[1, 8]
    assert shell.startswith("torchrun --standalone --nproc-per-node 8 -m pixelgen.cli train ") and "gpu=8" in resources
    resources, shell = commands[2, 0]
    # inside an allocation only, then one srun step of 2 tasks
    assert shell.startswith(': "${SLURM_JOB_ID:?train_nodes: 2 runs under Slurm only')
    assert ("&& srun --nodes 2 --ntasks 2 --cpus-per-task 1 --kill-on-bad-exit=1 python -m pixelgen.launch "
            "--nnodes 2 --nproc-per-node 1 -- train ") in shell
    assert {"nodes=2", "tasks=2", "mpi=srun"} <= set(resources.split(", ")) and "gpu" not in resources
    resources, shell = commands[3, 4]
    assert "--nnodes 3 --nproc-per-node 4 -- train " in shell
    # 4 GPUs on each node (gres is per node; --gpus would be 4 for the whole job)
    assert {"nodes=3", "tasks=3", "gres=gpu:4", "tasks_per_gpu=0"} <= set(resources.split(", "))


def test_train_nodes_above_one_without_slurm_stops_with_one_line(tmp_path):
    root = project_copy(tmp_path / "p")
    config = workflow_config(root, "two", train_nodes=2)
    env = {k: v for k, v in ENV.items() if not k.startswith("SLURM_")}
    result = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "--cores", "1", "all", "--until",
                             "train", "--configfile", config], cwd=root, capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode != 0 and "train_nodes: 2 runs under Slurm only: use --profile slurm" in result.stderr
    assert not list(root.glob("work/runs/ci/*/*/checkpoints/last.pt"))


def test_train_nodes_below_one_is_refused_by_the_schema(tmp_path):
    root = project_copy(tmp_path / "p")
    result = snakemake(root, "-n", "--cores", "1", "all", "--configfile", workflow_config(root, "zero", train_nodes=0))
    assert result.returncode != 0 and "train_nodes" in result.stdout + result.stderr


def launched(monkeypatch, node: str, local_id: int) -> list[str]:
    """The command pixelgen.launch execs in a task of job 123457 on gpu[07-08], run on `node`."""
    env = {"SLURM_JOB_ID": "123457", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURMD_NODENAME": node,
           "SLURM_LOCALID": str(local_id)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(launch, "first_host", lambda nodelist: {"gpu[07-08]": "gpu07"}[nodelist])
    ran = []
    monkeypatch.setattr(os, "execv", lambda path, argv: ran.extend(argv))
    launch.main(["--nnodes", "2", "--nproc-per-node", "8", "--", "train", "--config", "c.yaml"])
    return ran


def test_each_task_starts_torchrun_at_the_first_node_whose_first_task_hosts_the_store(monkeypatch):
    text = " ".join(launched(monkeypatch, "gpu08", 0))
    assert "-m torch.distributed.run --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d" in text
    assert f"--rdzv-endpoint gpu07:{launch.PORT_BASE + 123457 % launch.PORT_SPAN}" in text
    assert "--rdzv-conf is_host=0" in text and text.endswith("-m pixelgen.cli train --config c.yaml")
    assert "is_host=1" in " ".join(launched(monkeypatch, "gpu07", 0))
    # a second task on the first node (two tasks standing in for two nodes) only connects
    assert "is_host=0" in " ".join(launched(monkeypatch, "gpu07", 1))


def test_launch_outside_a_slurm_task_is_a_one_line_error():
    with pytest.raises(PixelgenError, match="SLURM_LOCALID.*srun"):
        launch.slurm_task({"SLURM_JOB_ID": "5", "SLURM_STEP_NODELIST": "vm", "SLURMD_NODENAME": "vm"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run([sys.executable, "-m", "pixelgen.launch", "--nnodes", "2", "--", "train"],
                            capture_output=True, text=True, env=env)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "--profile slurm" in result.stderr


def srun_train(root: Path, config: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """Two Slurm tasks standing in for two nodes, one torchrun (one gloo process) each."""
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["srun", "--ntasks", "2", "--cpus-per-task", "1", "--mem", "3000", "--time", "10",
                           "--kill-on-bad-exit=1", sys.executable, "-m", "pixelgen.launch", "--nnodes", "2", "--",
                           "train", "--config", str(config), "--run-dir", str(run_dir), "--quiet", *extra],
                          capture_output=True, text=True, timeout=900, env=env, cwd=root)


@pytest.mark.slow
@pytest.mark.slurm
@needs_slurm
def test_two_node_training_runs_under_the_slurm_profile_and_resumes_bit_identically(tmp_path):
    """The workflow's train job of one variant with train_nodes: 2 (one Slurm job, one srun step of two tasks), then
    the same config run by hand as two tasks, stopped at step 2 and resumed: its final state equals the job's."""
    root = project_copy(tmp_path / "p")
    grid = yaml.safe_load((root / "config/grids/demo.yaml").read_text())
    grid["variants"] = {"pixelgen": grid["variants"]["pixelgen"]}
    (root / "config/grids/one.yaml").write_text(yaml.safe_dump(grid))
    config = workflow_config(root, "two-nodes", train_nodes=2, variants="config/grids/one.yaml")
    # the profile as shipped, with the two "nodes" squeezed onto this one-node cluster (the tasks stay two)
    profile = (root / "workflow/profiles/slurm/config.yaml").read_text()
    (root / "one-node").mkdir()
    (root / "one-node/config.yaml").write_text(profile.replace("  train:\n", "  train:\n    nodes: 1\n"))
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    result = snakemake(root, "--profile", "one-node", "all", "--until", "train", "--configfile", config,
                       timeout=2400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sacct = subprocess.run(["sacct", "-n", "-P", "-S", started, "-o", "JobID,Comment,State,NTasks,WorkDir"],
                           capture_output=True, text=True, check=True).stdout.strip().splitlines()
    rows = [line.split("|") for line in sacct]
    (job,) = [job for job, comment, state, _, workdir in rows
              if comment.startswith("rule_train") and state == "COMPLETED" and workdir == str(root)]
    # the job's one srun step ran the two tasks (one torchrun each)
    steps = {step: ntasks for step, _, _, ntasks, _ in rows if step.startswith(f"{job}.") and step[-1].isdigit()}
    assert list(steps.values()) == ["2"], rows
    (final,) = root.glob("work/runs/ci/*/*/checkpoints/final.pt")
    a = torch.load(final, weights_only=False)
    assert a["data"]["world_size"] == 2 and len(a["rng"]) == 2 and a["step"] == 4

    run_config = final.parent.parent / "config.yaml"  # the resolved config the job trained with
    stopped = srun_train(root, run_config, tmp_path / "nodes", "--stop-at-step", "2")
    assert stopped.returncode != 0 and (tmp_path / "nodes/checkpoints/last.pt").exists(), stopped.stderr[-3000:]
    assert not (tmp_path / "nodes/checkpoints/final.pt").exists()
    resumed = srun_train(root, run_config, tmp_path / "nodes")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    b = torch.load(tmp_path / "nodes/checkpoints/final.pt", weights_only=False)
    assert b["step"] == 4 and b["data"]["world_size"] == 2
    for key in ("model", "optimizer", "data_per_rank"):
        assert states_equal({key: a[key]}, {key: b[key]}), key
    assert states_equal(a["ema"]["shadow"], b["ema"]["shadow"])
