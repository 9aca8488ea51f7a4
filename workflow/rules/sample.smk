# Sampling is scattered over config.sample.parts jobs per variant (each takes every parts-th shard of images)
# and gathered by one more call of the same command, which writes samples.json once every shard exists.
PARTS = list(range(config["sample"]["parts"]))


def sample_args(wc):
    v = wc.variant
    return (f"--num {sample_setting(v, 'num')} --sampler {sample_setting(v, 'sampler')} "
            f"--steps {sample_setting(v, 'steps')} --cfg {sample_setting(v, 'cfg')} "
            f"--batch-size {sample_setting(v, 'batch_size')} "
            f"--shard-size {max(1, -(-sample_setting(v, 'num') // (4 * len(PARTS))))}")


rule sample_part:
    input:
        f"{RUNS}/{{variant}}/checkpoints/final.pt",
    output:
        touch(f"{SAMPLES}/{{variant}}/parts/{{part}}.done"),
    params:
        args=sample_args,
        n=len(PARTS),
    log:
        f"{LOGS}/sample/{{variant}}-{{part}}.log",
    threads: RES["sample"]["cpus"]
    resources:
        mem_mb=RES["sample"]["mem_mb"],
        runtime=RES["sample"]["runtime"],
        gpu=1 if config.get("train_gpus", 0) > 0 else 0,
    shell:
        "pixelgen sample --ckpt {input} --out {SAMPLES}/{wildcards.variant} {params.args} "
        "--part {wildcards.part}/{params.n} --quiet > {log} 2>&1"


rule sample_gather:
    input:
        ckpt=f"{RUNS}/{{variant}}/checkpoints/final.pt",
        parts=expand(f"{SAMPLES}/{{{{variant}}}}/parts/{{part}}.done", part=PARTS),
    output:
        f"{SAMPLES}/{{variant}}/samples.json",
    params:
        args=sample_args,
    log:
        f"{LOGS}/sample/{{variant}}-gather.log",
    threads: 1
    resources:
        mem_mb=RES["other"]["mem_mb"],
        runtime=RES["other"]["runtime"],
    shell:
        "pixelgen sample --ckpt {input.ckpt} --out {SAMPLES}/{wildcards.variant} {params.args} --quiet > {log} 2>&1"
