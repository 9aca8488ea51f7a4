# Sampling is scattered over `sample.parts` jobs per variant (scattergather `sample_parts`; each part takes every
# parts-th shard of images) and gathered by one more call of the same command, which writes samples.json once
# every shard exists. The sample folder (a param) is keyed by everything that determines the images
# (common.smk), so any change makes a new folder and reruns the parts. Each part is its own
# Slurm job (grouping them into fewer jobs failed under the Slurm executor in CI: left for later).
# Before the parts, `sample_reset` prepares the folder for the checkpoint: Snakemake reruns it whenever the
# checkpoint is retrained (same key, new weights: new data behind the same shard folder, a non-deterministic GPU
# rerun), and it deletes samples of other weights, so the parts never meet a refusal or old samples.


rule sample_reset:
    input:
        lambda wc: checkpoint(wc.variant),
    output:
        f"{SAMPLES}/{{variant}}/{{skey}}/settings.json",
    params:
        out=lambda wc: sample_dir(wc.variant),
        args=lambda wc: sample_args(wc.variant),
    log:
        f"{LOGS}/sample/{{variant}}-{{skey}}-reset.log",
    threads: 1
    resources:
        mem_mb=RES["other"]["mem_mb"],
        runtime=RES["other"]["runtime"],
    conda:
        ENV
    shell:
        "pixelgen sample --ckpt {input} --out {params.out} {params.args} --reset > {log} 2>&1"


rule sample_part:
    input:
        ckpt=lambda wc: checkpoint(wc.variant),
        settings=f"{SAMPLES}/{{variant}}/{{skey}}/settings.json",
    output:
        touch(f"{SAMPLES}/{{variant}}/{{skey}}/parts/{{scatteritem}}.done"),
    params:
        out=lambda wc: sample_dir(wc.variant),
        args=lambda wc: sample_args(wc.variant),
        part=part_arg,
    log:
        f"{LOGS}/sample/{{variant}}-{{skey}}-{{scatteritem}}.log",
    benchmark:
        f"{BENCH}/sample/{{variant}}-{{skey}}-{{scatteritem}}.tsv"
    threads: RES["sample"]["cpus"]
    resources:
        mem_mb=RES["sample"]["mem_mb"],
        runtime=RES["sample"]["runtime"],
        gpu=gpus(),
    conda:
        ENV
    shell:
        "pixelgen sample --ckpt {input.ckpt} --out {params.out} {params.args} --part {params.part} > {log} 2>&1"


rule sample_gather:
    input:
        ckpt=lambda wc: checkpoint(wc.variant),
        parts=gather.sample_parts(f"{SAMPLES}/{{{{variant}}}}/{{{{skey}}}}/parts/{{scatteritem}}.done"),
    output:
        f"{SAMPLES}/{{variant}}/{{skey}}/samples.json",
    params:
        out=lambda wc: sample_dir(wc.variant),
        args=lambda wc: sample_args(wc.variant),
    log:
        f"{LOGS}/sample/{{variant}}-{{skey}}-gather.log",
    threads: 1
    resources:
        mem_mb=RES["other"]["mem_mb"],
        runtime=RES["other"]["runtime"],
    conda:
        ENV
    shell:
        "pixelgen sample --ckpt {input.ckpt} --out {params.out} {params.args} > {log} 2>&1"
