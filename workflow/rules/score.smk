rule score:
    input:
        samples=f"{SAMPLES}/{{variant}}/samples.json",
        ref=REF,
    output:
        f"{RESULTS}/metrics/{{variant}}.json",
    params:
        random=random_flag(),
    log:
        f"{LOGS}/score/{{variant}}.log",
    threads: RES["other"]["cpus"]
    resources:
        mem_mb=RES["other"]["mem_mb"],
        runtime=RES["other"]["runtime"],
        gpu=1 if config.get("train_gpus", 0) > 0 else 0,
    shell:
        "pixelgen score {SAMPLES}/{wildcards.variant} --ref {input.ref} --out {output} {params.random} --quiet "
        "> {log} 2>&1"
