# A variant's metrics go to its training run in MLflow, or to an evaluation run of its own where it samples a run
# it shares or an imported release (common.smk, score_options). The param keeps its old name, `random`: renaming it
# would change every variant's shell command, and Snakemake would rescore every finished variant.
rule score:
    input:
        samples=lambda wc: f"{sample_dir(wc.variant)}/samples.json",
        ref=REF,
        parent=lambda wc: [PARENT_FILE] if uses_eval_run(wc.variant) else [],
    output:
        f"{RESULTS}/metrics/{{variant}}.json",
    params:
        samples=lambda wc: sample_dir(wc.variant),
        random=lambda wc: score_options(wc.variant),
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
