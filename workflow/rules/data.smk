if DATASET["generate_demo"]:

    rule demo_data:
        output:
            directory(RAW),
        params:
            resolution=DATASET["resolution"],
            per_class=DATASET.get("demo_per_class", 300),
        log:
            f"{LOGS}/demo_data.log",
        threads: 1
        resources:
            mem_mb=RES["other"]["mem_mb"],
            runtime=RES["other"]["runtime"],
        conda:
            ENV
        shell:
            "pixelgen demo-data {output} --resolution {params.resolution} --per-class {params.per_class} "
            "> {log} 2>&1"


# The shard folder is keyed by resolution, format and shard size (common.smk): a changed setting makes a new
# folder, never a mix of old and new shards.
rule shard:
    input:
        RAW,
    output:
        f"{SHARDS}/manifest.json",
    params:
        out=lambda wc, output: os.path.dirname(output[0]),
        resolution=DATASET["resolution"],
        shard_size=DATASET["shard_size"],
        format=DATASET["format"],
    log:
        f"{LOGS}/shard.log",
    threads: RES["other"]["cpus"]
    resources:
        mem_mb=RES["other"]["mem_mb"],
        runtime=RES["other"]["runtime"],
    conda:
        ENV
    shell:
        "pixelgen shard {input} {params.out} --resolution {params.resolution} --shard-size {params.shard_size} "
        "--format {params.format} --workers {threads} > {log} 2>&1"


# Reference statistics of the training shards, unless the config names a reference (the ADM batch) to use
if not config.get("reference"):

    rule ref_stats:
        input:
            f"{SHARDS}/manifest.json",
        output:
            REF,
        params:
            shards=lambda wc, input: os.path.dirname(input[0]),
            limit=f"--max {config['ref_max']}" if config.get("ref_max") else "",
            random=random_flag(),
        log:
            f"{LOGS}/ref_stats.log",
        benchmark:
            f"{BENCH}/ref_stats.tsv"
        threads: RES["other"]["cpus"]
        resources:
            mem_mb=RES["other"]["mem_mb"],
            runtime=RES["other"]["runtime"],
            gpu=gpus(),
        conda:
            ENV
        shell:
            "pixelgen ref-stats {params.shards} --out {output} {params.limit} {params.random} > {log} 2>&1"
