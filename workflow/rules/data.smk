if DATASET["generate_demo"]:

    rule demo_data:
        output:
            directory(RAW),
        params:
            per_class=DATASET.get("demo_per_class", 300),
        log:
            f"{LOGS}/demo_data.log",
        threads: 1
        resources:
            mem_mb=RES["other"]["mem_mb"],
            runtime=RES["other"]["runtime"],
        shell:
            "pixelgen demo-data {output} --resolution {DATASET[resolution]} --per-class {params.per_class} "
            "--quiet > {log} 2>&1"


rule shard:
    input:
        RAW,
    output:
        f"{SHARDS}/manifest.json",
    log:
        f"{LOGS}/shard.log",
    threads: RES["other"]["cpus"]
    resources:
        mem_mb=RES["other"]["mem_mb"],
        runtime=RES["other"]["runtime"],
    shell:
        "pixelgen shard {input} {SHARDS} --resolution {DATASET[resolution]} --shard-size {DATASET[shard_size]} "
        "--format {DATASET[format]} --workers {threads} --quiet > {log} 2>&1"


# Reference statistics of the training shards, unless the config names a reference (the ADM batch) to use
if not config.get("reference"):

    rule ref_stats:
        input:
            f"{SHARDS}/manifest.json",
        output:
            REF,
        params:
            limit=f"--max {config['ref_max']}" if config.get("ref_max") else "",
            random=random_flag(),
        log:
            f"{LOGS}/ref_stats.log",
        threads: RES["other"]["cpus"]
        resources:
            mem_mb=RES["other"]["mem_mb"],
            runtime=RES["other"]["runtime"],
            gpu=1 if config.get("train_gpus", 0) > 0 else 0,
        shell:
            "pixelgen ref-stats {SHARDS} --out {output} {params.limit} {params.random} --quiet > {log} 2>&1"
