rule mlflow_parent:
    output:
        f"{WORK}/mlflow/{GRID}.parent",
    params:
        uri=f"--uri {config['mlflow_uri']}" if config.get("mlflow_uri") else "",
    log:
        f"{LOGS}/mlflow_parent.log",
    localrule: True
    shell:
        "pixelgen track-parent --experiment {GRID} --name workflow-{GRID} {params.uri} --out {output} > {log} 2>&1"


# Training state (config.yaml, checkpoints/last.pt, metrics) lives in the run dir, and only final.pt is a
# declared output: a failed or preempted job loses nothing, and rerunning `all` resumes from last.pt.
rule train:
    input:
        shards=f"{SHARDS}/manifest.json",
        parent=f"{WORK}/mlflow/{GRID}.parent",
    output:
        f"{RUNS}/{{variant}}/checkpoints/final.pt",
    wildcard_constraints:
        variant=names_pattern(TRAINED),
    params:
        sets=lambda wc: sets(wc.variant),
        launcher=("pixelgen" if config.get("train_gpus", 0) <= 1 else
                  f"torchrun --standalone --nproc-per-node {config['train_gpus']} -m pixelgen.cli"),
    log:
        f"{LOGS}/train/{{variant}}.log",
    threads: RES["train"]["cpus"]
    resources:
        mem_mb=RES["train"]["mem_mb"],
        runtime=RES["train"]["runtime"],
        gpu=config.get("train_gpus", 0),
    shell:
        "{params.launcher} train --config {config[pixelgen]} {params.sets} "
        "--set tracking.parent_run_id=$(cat {input.parent}) --run-dir {RUNS}/{wildcards.variant} --quiet "
        ">> {log} 2>&1"


# An official release checkpoint stands in for training: converted once, then sampled and scored like our own.
rule import_official:
    input:
        lambda wc: weights_file(IMPORTED[wc.variant]),
    output:
        f"{RUNS}/{{variant}}/checkpoints/final.pt",
    wildcard_constraints:
        variant=names_pattern(IMPORTED),
    log:
        f"{LOGS}/import/{{variant}}.log",
    threads: 1
    resources:
        mem_mb=RES["other"]["mem_mb"],
        runtime=RES["other"]["runtime"],
    shell:
        "pixelgen import-official {input} --out {output} > {log} 2>&1"
