"""Start-up cost of the transformers autoload hook (``tacq_kernels_autoload.pth``).

Times fresh interpreters of this environment with the package installed and "not installed"
(its start-up files hidden: the two ``.pth`` files and the ``.dist-info`` that ``import torch``
scans for entry points, renamed for the run and restored after), the two states interleaved run
by run so that the load of other processes drifts into both alike. Median (and min, max) of
``--runs`` runs per command and state:

* ``pass``: interpreter start-up alone (the ``.pth`` runs in every interpreter);
* ``import torch``: must not change (the hook imports no torch, transformers or Triton);
* ``import transformers.modeling_utils``: what every ``from_pretrained`` imports; with the
  package this is where the hook imports tacq_kernels and registers the format.

    python benchmarks/autoload_startup.py --runs 10 --json benchmarks/results/autoload_startup.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import time

COMMANDS = {"pass": "pass", "import torch": "import torch",
            "import transformers.modeling_utils": "import transformers.modeling_utils"}


def package_files(site: str) -> list[str]:
    files = [os.path.join(site, "tacq_kernels_autoload.pth")]
    files += glob.glob(os.path.join(site, "__editable__.tacq_kernels-*.pth"))
    files += glob.glob(os.path.join(site, "tacq_kernels-*.dist-info"))
    return [f for f in files if os.path.exists(f)]


def timed(code: str, cwd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=cwd, capture_output=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated names of COMMANDS")
    ap.add_argument("--json", help="write the timings here")
    args = ap.parse_args()
    site = sysconfig.get_paths()["purelib"]
    files = package_files(site)
    if not any(f.endswith("tacq_kernels_autoload.pth") for f in files):
        sys.exit(f"no tacq_kernels_autoload.pth in {site}: install the package first")
    cwd = os.path.expanduser("~")  # not the repository: its tacq_kernels/ would import from the cwd
    names = args.commands.split(",")
    times = {n: {"installed": [], "not installed": []} for n in names}
    try:
        for _ in range(args.runs):
            for name in names:
                for state in ("installed", "not installed"):
                    for f in files:  # hide or restore
                        src, dst = (f + ".hidden", f) if state == "installed" else (f, f + ".hidden")
                        if os.path.exists(src):
                            os.rename(src, dst)
                    times[name][state].append(timed(COMMANDS[name], cwd))
    finally:
        for f in files:
            if os.path.exists(f + ".hidden"):
                os.rename(f + ".hidden", f)
    load = os.getloadavg()
    print(f"{'command':<36} {'installed':>22} {'not installed':>22} {'difference':>11}")
    rows = {}
    for name in names:
        s = {state: (statistics.median(v), min(v), max(v)) for state, v in times[name].items()}
        diff = s["installed"][0] - s["not installed"][0]
        rows[name] = {"median_s": {k: v[0] for k, v in s.items()}, "runs_s": times[name], "difference_s": diff}
        fmt = lambda t: f"{t[0] * 1e3:7.0f} ms ({t[1] * 1e3:.0f}-{t[2] * 1e3:.0f})"  # noqa: E731
        print(f"{name:<36} {fmt(s['installed']):>22} {fmt(s['not installed']):>22} {diff * 1e3:+8.0f} ms")
    print(f"median of {args.runs} runs each, interleaved; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"runs": args.runs, "load_average": load, "python": platform.python_version(),
                       "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
