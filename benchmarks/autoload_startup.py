"""Start-up cost of the transformers autoload hook (``tacq_kernels_autoload.pth``).

Times fresh interpreters of this environment in three states, interleaved run by run so that
the load of other processes drifts into all alike: the package installed; installed but without
the hook (``tacq_kernels_autoload.pth`` hidden: the package as it was before the hook); and "not
installed" (also its editable-install ``.pth`` and the ``.dist-info`` that ``import torch`` scans
for entry points hidden). Files are hidden by renaming them for one run and restored after.
Median (and min, max) of ``--runs`` runs per command and state, of the wall time and of the CPU
time (user + system, steadier on a shared machine), plus the hook module's own import time as
``-X importtime`` reports it:

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
import random
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


STATES = ("installed", "without the hook", "not installed")


def hidden_in(state: str, files: list[str]) -> list[str]:
    if state == "installed":
        return []
    if state == "without the hook":
        return [f for f in files if f.endswith("tacq_kernels_autoload.pth")]
    return files


def timed(code: str, cwd: str) -> tuple[float, float, float | None]:
    """Wall time and CPU time (user + system) of a fresh interpreter running ``code``, and the
    import time of the hook module. On a shared machine the CPU time is the steadier measure:
    waiting for a busy core counts in the wall time only."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-c", code], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    if proc.returncode != 0:
        raise RuntimeError(f"{code!r} failed: {err[-2000:]}")
    hook = [int(line.split("|")[0].split(":")[1]) * 1e-6 for line in err.splitlines()
            if line.split("|")[-1].strip() == "tacq_kernels_autoload"]
    return wall, usage.ru_utime + usage.ru_stime, (hook[0] if hook else None)


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
    times = {n: {state: [] for state in STATES} for n in names}
    cpu = {n: {state: [] for state in STATES} for n in names}
    hook_import = []
    order = random.Random(0)  # a new order of the states every round: no state always runs first
    try:
        for _ in range(args.runs):
            for name in names:
                for state in order.sample(STATES, len(STATES)):
                    hide = hidden_in(state, files)
                    for f in files:  # hide or restore
                        src, dst = (f, f + ".hidden") if f in hide else (f + ".hidden", f)
                        if os.path.exists(src):
                            os.rename(src, dst)
                    wall, cpu_s, hook = timed(COMMANDS[name], cwd)
                    times[name][state].append(wall)
                    cpu[name][state].append(cpu_s)
                    if hook is not None:
                        hook_import.append(hook)
    finally:
        for f in files:
            if os.path.exists(f + ".hidden"):
                os.rename(f + ".hidden", f)
    load = os.getloadavg()
    print(f"{'command':<36} {'':>5}" + "".join(f" {st:>26}" for st in STATES))
    rows = {}
    fmt = lambda t: f"{t[0] * 1e3:.0f} ms ({t[1] * 1e3:.0f}-{t[2] * 1e3:.0f})"  # noqa: E731
    for name in names:
        rows[name] = {}
        for label, data in (("wall", times[name]), ("cpu", cpu[name])):
            s = {state: (statistics.median(v), min(v), max(v)) for state, v in data.items()}
            rows[name][label] = {"median_s": {k: v[0] for k, v in s.items()}, "runs_s": data}
            print(f"{name if label == 'wall' else '':<36} {label:>5}" + "".join(f" {fmt(s[st]):>26}" for st in STATES))
    if hook_import:
        print(f"import of tacq_kernels_autoload itself (-X importtime, {len(hook_import)} runs): median "
              f"{statistics.median(hook_import) * 1e3:.2f} ms (min {min(hook_import) * 1e3:.2f})")
    print(f"median (min-max) of {args.runs} runs each, interleaved; load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"runs": args.runs, "load_average": load, "python": platform.python_version(),
                       "results": rows, "hook_import_s": hook_import}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
