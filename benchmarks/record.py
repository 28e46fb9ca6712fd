"""Record asv results of commits into asv_benches/results/, the history that ``asv publish`` draws.

    python benchmarks/record.py                     # HEAD
    python benchmarks/record.py --last 10 main      # the last ten commits of main (first parents)
    python benchmarks/record.py 5c4fb45 f3abbfb     # these commits
    python benchmarks/record.py --gpu               # HEAD on a GPU machine: the cuda rows

Each commit is built from git (``git archive``, then ``pip install --no-deps --target`` a
temporary folder; the working tree is not touched) and measured with the benchmark suite of the
working tree, ``asv run --python=same --set-commit-hash <commit>``, the build first on the path
(``ASV_PYTHONPATH``).  So every commit runs with the same NumPy, Numba, OpenBLAS (and torch, for
the reference rows) as this Python, and a commit whose own benchmark files differ or are missing
is measured all the same; a benchmark that the commit's API cannot run is recorded as failed.
``--set-commit-hash`` is what makes asv save results from an existing environment at all.

The machine is named from what decides the figures, so results from different CPUs do not mix in
one graph: ``cpu-<vendor>-f<family>m<model>-<OpenBLAS core>-<n>cpu`` from ``lscpu`` and
threadpoolctl (e.g. ``cpu-intel-f6m143-sapphirerapids-2cpu``), or with ``--gpu``
``gpu-<name>-<n>cpu`` from ``nvidia-smi`` (e.g. ``gpu-nvidia-h200-16cpu``).  One file per commit
and machine lands in ``asv_benches/results/<machine>/``, its environment named after the Python,
NumPy and Numba versions (``name_environment``).

What is measured (``--bench`` replaces it): on a CPU machine the instruction counts of every cell
(``instructions.Instructions``, about a minute under valgrind) and the wall-clock forward and
training step of every cell, gpurnn and torch, float32, at (T, B, I, H) = (100, 32, 256, 256),
five samples each (``TIMING``), and one optimiser step over a two-layer LSTM's parameters
(``optim``: SGD, momentum, Adam at H = 256 and 1024, gpurnn and torch.optim); with ``--gpu``
the same wall-clock benchmarks on ``cuda`` at every shape.  ``--quick`` takes one sample of
each timing.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import instructions

ASV_DIR = Path(__file__).resolve().parents[1] / "asv_benches"
_TIMED = r"recurrent\.(Gpurnn|Torch)(Inference|Training)\.time_"
_OPTIM = r"optim\.(Gpurnn|Torch)Step\.time_step"
CPU_BENCH = (r"^instructions\.Instructions\.|^" + _TIMED + r".*'100x32x256x256', 'cpu', 'float32'\)"
             + "|^" + _OPTIM + r".*'cpu', 'float32'\)")
GPU_BENCH = "^" + _TIMED + r".*'cuda', 'float32'\)|^" + _OPTIM + r".*'cuda', 'float32'\)"
#: Five samples in one round, shorter warm-up than the suite's: about 2 minutes of timing a commit
#: on 2 cores instead of 10; the instruction counts are exact whatever these are.
TIMING = ["-a", "rounds=1", "-a", "repeat=5", "-a", "warmup_time=0.2"]


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _ram():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return line.split(":")[1].strip()
    return ""


def cpu_machine():
    """(name, description) of this CPU from lscpu and the OpenBLAS core NumPy loads."""
    import numpy  # noqa: F401  (loads OpenBLAS, so that threadpoolctl sees it)
    from threadpoolctl import threadpool_info

    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    info = dict((k.strip(), v.strip()) for k, _, v in
                (line.partition(":") for line in out.splitlines()) if v)
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(info.get("Vendor ID"),
                                                                  info.get("Vendor ID", "cpu"))
    family, model = info.get("CPU family", "x"), info.get("Model", "x")
    cores = [p.get("architecture") for p in threadpool_info() if p.get("user_api") == "blas"]
    core = cores[0] if cores and cores[0] else "unknown"
    name = f"cpu-{_slug(vendor)}-f{family}m{model}-{_slug(core)}-{os.cpu_count()}cpu"
    description = (f"{info.get('Model name', '?')} (family {family}, model {model}); "
                   f"OpenBLAS core {core}")
    return name, description


def gpu_machine():
    """(name, description) of the first GPU, from nvidia-smi."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout
    gpu, _, driver = out.splitlines()[0].partition(",")
    _, cpu = cpu_machine()
    return (f"gpu-{_slug(gpu)}-{os.cpu_count()}cpu",
            f"{gpu.strip()} (driver {driver.strip()}); host {cpu}")


def register_machine(name, description):
    """``asv machine`` for ``name`` (kept in ~/.asv-machine.json; asv copies it to the results)."""
    subprocess.run([sys.executable, "-m", "asv", "machine", "--yes", "--machine", name,
                    "--os", platform.system(), "--arch", platform.machine(),
                    "--cpu", description, "--num_cpu", str(os.cpu_count()), "--ram", _ram()],
                   cwd=ASV_DIR, check=True, stdout=subprocess.DEVNULL)


def commits_to_record(revs, last):
    """Full hashes, oldest first: the ``last`` first-parent commits up to ``revs[0]``, or
    ``revs``."""
    if last:
        out = instructions.git("rev-list", "--first-parent", f"--max-count={last}",
                                revs[0] if revs else "HEAD")
        return out.split()[::-1]
    hashes = []
    for rev in revs or ["HEAD"]:
        commit = instructions.resolve(rev)
        if commit is None:
            raise SystemExit(f"record: no commit {rev!r}")
        hashes.append(commit)
    return hashes


def name_environment(commit, machine):
    """Name the environment of ``commit``'s new results after the versions that decide the
    figures instead of the interpreter's path.

    asv names an existing environment, and keys its graphs, by the interpreter's path, so the
    same venv at another path would start a new series.  Here the Python, NumPy and Numba
    versions name it: a new NumPy (its OpenBLAS) or Numba starts a new series, as it should,
    since instruction counts from different builds are not comparable."""
    import numba
    import numpy

    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    versions = {"numpy": numpy.__version__, "numba": numba.__version__}
    env_name = f"existing-py{python}-numpy{versions['numpy']}-numba{versions['numba']}"
    folder = ASV_DIR / "results" / machine
    for path in folder.glob(f"{commit[:8]}-existing-py_*.json"):
        data = json.loads(path.read_text())
        data["python"] = data["params"]["python"] = python
        data["params"].update(versions)
        data["requirements"].update(versions)
        data["env_name"] = env_name
        (folder / f"{commit[:8]}-{env_name}.json").write_text(json.dumps(data))
        path.unlink()


def record(commit, machine, bench, quick):
    """Build ``commit`` and run the selected benchmarks on it; asv's exit status."""
    with tempfile.TemporaryDirectory(prefix="gpurnn-record-") as tmp:
        site = instructions.build(commit, tmp)
        cmd = [sys.executable, "-m", "asv", "run", "--python=same", "--set-commit-hash", commit,
               "--machine", machine, "--bench", bench, "--show-stderr"]
        cmd += ["--quick"] if quick else TIMING
        env = dict(os.environ, ASV_PYTHONPATH=str(site))
        returncode = subprocess.run(cmd, cwd=ASV_DIR, env=env).returncode
    name_environment(commit, machine)
    return returncode


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revs", nargs="*", help="commits to record (default: HEAD); with "
                                                "--last, the commit to count back from")
    parser.add_argument("--last", type=int, help="record this many first-parent commits")
    parser.add_argument("--gpu", action="store_true",
                        help="name the machine from nvidia-smi and measure the cuda rows")
    parser.add_argument("--bench", help="asv's --bench regular expression (default: see above)")
    parser.add_argument("--quick", action="store_true", help="run each timing once")
    parser.add_argument("--machine", help="the machine name (default: derived, see above)")
    args = parser.parse_args(argv)

    name, description = gpu_machine() if args.gpu else cpu_machine()
    machine = args.machine or name
    bench = args.bench or (GPU_BENCH if args.gpu else CPU_BENCH)
    commits = commits_to_record(args.revs, args.last)
    register_machine(machine, description)
    print(f"record: {len(commits)} commit(s) on machine {machine} ({description})", flush=True)
    failed = []
    for commit in commits:
        start = time.perf_counter()
        print(f"record: {commit[:10]} {instructions.git('log', '-1', '--format=%s', commit)}",
              flush=True)
        try:
            rc = record(commit, machine, bench, args.quick)
        except instructions.CountError as e:
            print(f"record: {commit[:10]} not recorded: {e}", flush=True)
            rc = None
        if rc != 0:
            failed.append(commit[:10])
        print(f"record: {commit[:10]} done in {time.perf_counter() - start:.0f} s "
              f"(asv exit {rc})", flush=True)
    print(f"record: results in {ASV_DIR / 'results' / machine}"
          + (f"; failed: {' '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
