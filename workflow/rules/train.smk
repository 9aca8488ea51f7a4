rule mlflow_parent:
    output:
        f"{WORK}/mlflow/{GRID}.parent",
    params:
        experiment=GRID,
        uri=f"--uri {config['mlflow_uri']}" if config.get("mlflow_uri") else "",
    log:
        f"{LOGS}/mlflow_parent.log",
    localrule: True
    conda:
        ENV
    shell:
        "pixelgen track-parent --experiment {params.experiment} --name workflow-{params.experiment} {params.uri} "
        "--out {output} > {log} 2>&1"


# Training state (config.yaml, checkpoints/last.pt, metrics) lives in the run dir, keyed by the resolved config
# (common.smk), and only the final checkpoints are declared outputs: a failed or preempted job loses nothing,
# and rerunning `all` (or Snakemake's own retries) resumes from last.pt. `config` (the digest of the resolved
# config: base.yaml, the pixelgen file, overrides, the variant's set) makes any change that reaches training
# rerun it; the config file itself is read through params, so editing only its sampling section retrains nothing.
rule train:
    input:
        shards=f"{SHARDS}/manifest.json",
        parent=f"{WORK}/mlflow/{GRID}.parent",
    output:
        final=f"{RUNS}/{{variant}}/{{runkey}}/checkpoints/final.pt",
        ema=f"{RUNS}/{{variant}}/{{runkey}}/checkpoints/final_ema.pt",
    wildcard_constraints:
        variant=run_folders(TRAINED),  # a variant's name, or `shared` (a run several variants share)
        runkey="[0-9a-f]{12}",
    params:
        config_file=config["pixelgen"],
        config=lambda wc: train_digest(run_variant(wc)),
        sets=lambda wc: train_sets(run_variant(wc)),
        run_dir=lambda wc: run_dir(run_variant(wc)),
        launcher=lambda wc, resources, threads: train_launcher(config["train_nodes"], config.get("train_gpus", 0),
                                                               resources, threads),
    log:
        f"{LOGS}/train/{{variant}}-{{runkey}}.log",
    benchmark:
        f"{BENCH}/train/{{variant}}-{{runkey}}.tsv"
    retries: 2
    threads: RES["train"]["cpus"]
    resources:
        mem_mb=RES["train"]["mem_mb"],
        runtime=RES["train"]["runtime"],
        **train_placement(config["train_nodes"], config.get("train_gpus", 0)),
    conda:
        ENV
    shell:
        "{params.launcher} train --config {params.config_file} {params.sets} "
        "--set tracking.parent_run_id=$(cat {input.parent}) --run-dir {params.run_dir} >> {log} 2>&1"


# An official release checkpoint stands in for training: converted once (EMA weights only), then sampled and
# scored like our own.
rule import_official:
    input:
        lambda wc: weights_file(IMPORTED[run_variant(wc)]),
    output:
        f"{RUNS}/{{variant}}/{{release}}/checkpoints/final_ema.pt",
    wildcard_constraints:
        variant=run_folders(IMPORTED),
        release=names_pattern(sorted(set(IMPORTED.values()))),
    log:
        f"{LOGS}/import/{{variant}}-{{release}}.log",
    threads: 1
    resources:
        mem_mb=RES["other"]["mem_mb"],
        runtime=RES["other"]["runtime"],
    conda:
        ENV
    shell:
        "pixelgen import-official {input} --out {output} > {log} 2>&1"
