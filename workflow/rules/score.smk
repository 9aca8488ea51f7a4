rule score:
    input:
        samples=lambda wc: f"{sample_dir(wc.variant)}/samples.json",
        ref=REF,
    output:
        f"{RESULTS}/metrics/{{variant}}.json",
    params:
        samples=lambda wc: sample_dir(wc.variant),
        random=random_flag(),
    log:
        f"{LOGS}/score/{{variant}}.log",
    benchmark:
        f"{BENCH}/score/{{variant}}.tsv"
    threads: RES["other"]["cpus"]
    resources:
        mem_mb=RES["other"]["mem_mb"],
        runtime=RES["other"]["runtime"],
        gpu=gpus(),
    conda:
        ENV
    shell:
        "pixelgen score {params.samples} --ref {input.ref} --out {output} {params.random} > {log} 2>&1"
