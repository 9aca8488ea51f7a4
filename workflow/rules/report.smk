rule report:
    input:
        expand(f"{RESULTS}/metrics/{{variant}}.json", variant=list(VARIANTS)),
    output:
        table=report(f"{RESULTS}/table.md", category="Results", caption="../report/table.rst"),
        csv=f"{RESULTS}/table.csv",
        losses=report(f"{RESULTS}/loss_curves.png", category="Training"),
        fid_recall=report(f"{RESULTS}/fid_recall.png", category="Results"),
        samples=report(directory(f"{RESULTS}/samples"), patterns=["{name}.png"], category="Samples"),
    log:
        f"{LOGS}/report.log",
    localrule: True
    shell:
        "pixelgen report --grid {config[variants]} --metrics {RESULTS}/metrics --runs {RUNS} --out {RESULTS} "
        "> {log} 2>&1"
