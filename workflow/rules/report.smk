rule report:
    input:
        grid=GRID_FILE,
        metrics=expand(f"{RESULTS}/metrics/{{variant}}.json", variant=list(VARIANTS)),
        parent=f"{WORK}/mlflow/{GRID}.parent",
    output:
        table=report(f"{RESULTS}/table.md", category="Results", caption="../report/table.rst"),
        csv=f"{RESULTS}/table.csv",
        losses=report(f"{RESULTS}/loss_curves.png", category="Training", caption="../report/loss_curves.rst"),
        fid_recall=report(f"{RESULTS}/fid_recall.png", category="Results", caption="../report/fid_recall.rst"),
        fid_nfe=report(f"{RESULTS}/fid_vs_nfe.png", category="Results", caption="../report/fid_vs_nfe.rst"),
        gates=report(f"{RESULTS}/gate_weights.png", category="Training", caption="../report/gate_weights.rst"),
        samples=report(directory(f"{RESULTS}/samples"), patterns=["{name}.png"], category="Samples",
                       caption="../report/samples.rst"),
    params:
        links=report_links(),
        view=REPORT_RUNS,
        metrics=lambda wc, input: os.path.dirname(input.metrics[0]),
        out=lambda wc, output: os.path.dirname(output.table),
        uri=f"--uri {config['mlflow_uri']}" if config.get("mlflow_uri") else "",
    log:
        f"{LOGS}/report.log",
    localrule: True
    conda:
        ENV
    shell:
        "{params.links} && pixelgen report --grid {input.grid} --metrics {params.metrics} --runs {params.view} "
        "--out {params.out} > {log} 2>&1 && "
        "pixelgen finish-parent --run-id-file {input.parent} --report {params.out} {params.uri} >> {log} 2>&1"
