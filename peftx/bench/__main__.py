"""python -m peftx.bench [SUITE ...] [--full] [--json PATH] [--threads N]

Prints the machine's measured limits, then each suite's table: median time, p10-p90 spread, and the
ratio to the suite's anchor (dense torch or bitsandbytes), all measured in this process."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
from tqdm import tqdm

from peftx.bench import dora_suite, e2e_suite, lora_suite, machine, methods_suite, nf4_suite, optim_suite

SUITES = {"nf4": (nf4_suite, nf4_suite.STEPS), "lora": (lora_suite, 17), "optim": (optim_suite, 3),
          "e2e": (e2e_suite, 4), "methods": (methods_suite, len(methods_suite.CASES) + 1),
          "dora": (dora_suite, dora_suite.STEPS)}


def _table(rows: list[dict], dram_GBps: float | None = None) -> str:
    lines = [f"{'op':<16}{'dtype':<10}{'M':>5}  {'candidate':<24}{'median ms':>11}{'p10-p90':>17}{'ratio':>9}"]
    for row in rows:
        for name, r in row["results"].items():
            ratio = next(v for k, v in r.items() if k.startswith("x_vs_"))
            extra = ""
            if "GBps" in r:
                extra = f"  {r['GBps']:.1f} GB/s"
                if dram_GBps:
                    extra += f" = {100 * r['GBps'] / dram_GBps:.0f}% of DRAM read"
            extra += f"  saved {r['saved_MiB']:.2f} MiB" if "saved_MiB" in r else ""
            extra += f"  {r['page_faults']:.0f} page faults" if r.get("page_faults", 0) >= 100 else ""
            lines.append(f"{row['op']:<16}{row['dtype']:<10}{str(row['M'] or '-'):>5}  {name:<24}"
                         f"{r['median_ms']:>11.3f}{r['p10_ms']:>8.3f}-{r['p90_ms']:<8.3f}{ratio:>8.2f}x{extra}")
        note = f", dropout {row['dropout']}" if row.get("dropout") else ""
        lines.append(f"{'':<29}(ratio = time / {row['anchor']}{note})")
        lines.extend(f"{'':<29}{note}" for note in row.get("notes", []))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftx.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", default=["nf4", "lora", "optim"],
                   help=f"suites to run: {', '.join(SUITES)} (default: nf4 lora optim)")
    p.add_argument("--full", action="store_true", help="more repeats and cases (default: a quick subset)")
    p.add_argument("--json", metavar="PATH", help="write all results as JSON")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before measuring")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        p.error(f"unknown suite(s) {unknown}; available: {', '.join(SUITES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    m = machine.measure(quick=not args.full)
    print(machine.describe(m), flush=True)
    out = {"machine": m, "suites": {}}
    for name in args.suites:
        module, steps = SUITES[name]
        with tqdm(total=steps, desc=f"suite {name}", file=sys.stderr) as bar:
            rows = module.run(quick=not args.full, progress=bar.update)
        out["suites"][name] = rows
        table = module.table(rows) if hasattr(module, "table") else _table(rows, m["dram_read_GBps"])
        print(f"\n== {name} ==\n" + table, flush=True)
    if args.json:
        from peftx.bench.io import write_json_atomic
        write_json_atomic(args.json, out)
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
