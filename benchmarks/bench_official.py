"""The imported-release path, timed (issue 10): a random-weight PixelGen-XL/16 stand-in written in the official
release layout (no network on the GPU machines), `pixelgen import-official`, then `pixelgen sample` of --num
images with the official sampler (Heun-50, shift 2, guidance interval (0.1, 0.9]) and, with --score, the ADM
metrics against a random stand-in reference batch. Prints img/s and appends a section to benchmarks/RESULTS.md.

    python benchmarks/bench_official.py                              # GPU: XL/16, 1,000 samples, Heun-50
    python benchmarks/bench_official.py --size tiny --num 8 --steps 3 --no-record   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pixelgen.model import SIZES, JiT
from pixelgen.official import release_format

RESULTS = Path(__file__).parent / "RESULTS.md"


def run(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pixelgen.cli", *args], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="XL/16", choices=list(SIZES))
    parser.add_argument("--num", type=int, default=1000, help="images to sample (default 1000)")
    parser.add_argument("--steps", type=int, default=50, help="Heun steps (default 50 = 99 evaluations)")
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance scale (2.25 for the 160-epoch model)")
    parser.add_argument("--batch-size", type=int, default=125)
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        release = tmp / "PixelGen_XL_80ep.ckpt"
        torch.save(release_format(JiT(SIZES[args.size])), release)
        import_s = run("import-official", str(release), "--out", str(tmp / "ckpt.pt"))
        sample_s = run("sample", "--ckpt", str(tmp / "ckpt.pt"), "--num", str(args.num), "--out", str(tmp / "s"),
                       "--steps", str(args.steps), "--guidance", str(args.guidance), "--batch-size", str(args.batch_size),
                       "--quiet")
        manifest = json.loads((tmp / "s/samples.json").read_text())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    rate = args.num / sample_s
    line = (f"| {device} | {args.size} | {manifest['sampler']}-{manifest['steps']} shift {manifest['shift']} "
            f"guidance {manifest['guidance']} | {args.num} | {args.batch_size} | {import_s:.1f} s | {sample_s:.1f} s | "
            f"{rate:.2f} | {50000 / rate / 3600:.2f} h |")
    print(line)
    if not args.no_record:
        header = ("\n## Imported release path (`bench_official.py`: random-weight stand-in in the release layout, "
                  "fp32, whole job incl. start-up)\n\n| device | size | sampler | images | batch | import | sample | "
                  "img/s | 50K at this rate |\n|---|---|---|---|---|---|---|---|---|\n")
        text = RESULTS.read_text()
        RESULTS.write_text(text + ("" if "## Imported release path" in text else header) + line + "\n")


if __name__ == "__main__":
    main()
