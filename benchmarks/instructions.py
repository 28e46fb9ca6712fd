"""Instructions executed by gpurnn's CPU forward and training step: a figure load cannot move.

On a shared 2-core machine the same code's training step measured 234-444 ms from run to run;
the number of instructions a call executes, counted by valgrind's callgrind, is the same from
run to run whatever else the machine runs.  It does not say how fast a call is, but a change
that makes a call do more work shows in it, so it can gate every commit (``gate`` below).

    python benchmarks/instructions.py count                # the gpurnn this Python imports
    python benchmarks/instructions.py count --rev HEAD~3   # a commit, built into a temporary folder
    python benchmarks/instructions.py gate                 # HEAD against HEAD^; exit 1 on a rise

Cases: each cell (``rnn``, ``lstm``, ``gru`` reset-after, ``gru_seed`` reset-before), one layer,
float32, at ``SHAPE``, in two modes:

* ``forward``: inference, ``layer.eval(); layer(x)``;
* ``step``: a training step, ``layer.train(); layer(x); layer.backward(dout)``.

Two figures per case, each the mean over ``CALLS`` calls:

* ``total``: every instruction of the call: Python, NumPy, OpenBLAS and Numba's code;
* ``compiled``: the instructions in Numba-compiled code (callgrind finds no object file for it
  and names it ``???``) and in libm, which that code calls for ``exp``: the step kernels and the
  time loops without the BLAS products and the Python around them.

What makes a count repeatable to the instruction:

* One driver process (this file, ``_drive``) builds every case and calls each ``WARMUP`` times
  (kernels compiled or loaded, workspaces sized), then runs ``CALLS`` calls of each case, with a
  call of ``os.getppid()`` before each case and after the last.  callgrind runs with
  ``--dump-before=getppid``: each dump holds the instructions since the previous one, so dump
  ``k + 1`` holds case ``k``'s calls and nothing of the start-up.
* Numba compiles for one fixed CPU, ``NUMBA_CPU_NAME=haswell`` with that CPU's features (AVX2,
  FMA): valgrind hides AVX-512 from CPUID, so code compiled for the host would differ inside and
  outside valgrind.  A native run of the same driver first compiles into a private
  ``NUMBA_CACHE_DIR``; the run under valgrind loads that code, so nothing compiles under
  valgrind (which takes minutes) and both runs execute the same code.  For the same reason
  OpenBLAS runs its Haswell kernels in both (``OPENBLAS_CORETYPE=Haswell``, what it picks under
  valgrind anyway): the compiled products depend on its core (``kernels/cpu.py``,
  ``SMALL_GEMM_RULES``).
* ``PYTHONHASHSEED=0``; one BLAS thread (OpenBLAS's threads spin for a time-dependent count);
  the garbage collector off during the counted calls.

Counts depend on the CPU (OpenBLAS picks its kernels by CPUID) and on the Python, NumPy, Numba
and OpenBLAS builds: compare counts from one machine and one environment only.  ``gate`` builds
both commits into the same environment on the same machine, so that holds.
"""
import argparse
import concurrent.futures
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

#: (T steps, B batch, I input, H hidden) of every case.
SHAPE = (20, 16, 32, 32)
#: cell -> (gpurnn class, options), as in asv_benches/benchmarks/recurrent.py.
CELLS = {"rnn": ("RNN", {}), "lstm": ("LSTM", {}), "gru": ("GRU", {"reset_after": True}),
         "gru_seed": ("GRU", {"reset_after": False})}
MODES = ("forward", "step")
CASES = [f"{cell}.{mode}" for cell in CELLS for mode in MODES]
FIGURES = ("total", "compiled")
WARMUP = 2
CALLS = 3
#: The gate fails on a rise of either figure beyond this fraction.
THRESHOLD = 0.03
#: A line in the head commit's message that lets a deliberate rise pass the gate.
ACCEPT_TRAILER = "Accept-instruction-rise:"
_MARKER = "getppid"
_REPO = Path(__file__).resolve().parents[1]

#: tarfile's "data" filter (no links out of the folder, no devices) where Python has it
#: (3.10.12, 3.11.4 and later).
_SAFE_EXTRACT = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class CountError(RuntimeError):
    """A count could not be made (no valgrind, a build or a driver run failed)."""


# ---------------------------------------------------------------------------- the driver
def _drive(calls):
    """The measured process: warm every case up, then ``calls`` calls of each between markers."""
    import gc

    import numpy as np

    import gpurnn

    T, B, I, H = SHAPE
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I)).astype(np.float32)  # [T, B, I]
    dout = rng.standard_normal((T, B, H)).astype(np.float32)  # [T, B, H]

    def forward(layer):
        layer.eval()
        layer(x)

    def step(layer):
        layer.train()
        layer(x)
        layer.backward(dout)

    runs = []
    for cls, opts in CELLS.values():
        layer = getattr(gpurnn, cls)(I, H, seed=0, **opts)
        runs += [(forward, layer), (step, layer)]
    for run, layer in runs:
        for _ in range(WARMUP):
            run(layer)
    print(json.dumps({"gpurnn": gpurnn.__file__}), flush=True)
    gc.collect()
    gc.disable()
    for run, layer in runs:
        os.getppid()
        for _ in range(calls):
            run(layer)
    os.getppid()


# ---------------------------------------------------------------------------- counting
def _environment(pythonpath, numba_cache):
    """The driver's environment: this one without PYTHON*/NUMBA_* settings, plus fixed ones;
    PYTHONPATH is ``pythonpath`` if given, else this process's."""
    if pythonpath is None:
        pythonpath = os.environ.get("PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "NUMBA_"))}
    env.update(PYTHONHASHSEED="0", NUMBA_CACHE_DIR=str(numba_cache), NUMBA_CPU_NAME="haswell",
               NUMBA_CPU_FEATURES="", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1", OPENBLAS_CORETYPE="Haswell")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def _check_python(python):
    """valgrind must start the interpreter itself, not a shell script (a pyenv shim) around it."""
    with open(os.path.realpath(python), "rb") as f:
        if f.read(4) != b"\x7fELF":
            raise CountError(f"{python} is not an ELF executable (a shell wrapper?); pass the "
                             f"interpreter itself (python -c 'import sys; print(sys.executable)')")


def _run(cmd, what, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise CountError(f"{what} failed (exit {result.returncode}):\n{tail}")
    return result


def parse_dump(text):
    """(total, compiled) instructions of one callgrind dump (the text of its file).

    ``total`` is the dump's ``summary:`` line; ``compiled`` sums the self cost of the code in no
    object file (``???``: JIT-compiled code) and in libm.  A cost line directly after a
    ``calls=`` line is the inclusive cost of that call, not self cost, and is skipped."""
    names = {}  # object id -> name, from "ob=(id) name" and "cob=(id) name"
    compiled_objects = set()
    current = None
    total = None
    compiled = 0
    self_cost = 0  # of every object: must come to the summary
    after_call = False
    for line in text.splitlines():
        if line.startswith(("ob=", "cob=")):
            key, _, spec = line.partition("=")
            match = re.fullmatch(r"\((\d+)\)(?: (.*))?", spec)
            ident, name = (match.group(1), match.group(2)) if match else (spec, spec)
            if name is not None:
                names[ident] = name
                if name == "???" or re.search(r"/libm[.-]", name):
                    compiled_objects.add(ident)
            if key == "ob":
                current = ident
        elif line.startswith("calls="):
            after_call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if after_call:
                after_call = False
                continue
            fields = line.split()
            cost = int(fields[1]) if len(fields) > 1 else 0
            self_cost += cost
            if current in compiled_objects:
                compiled += cost
        elif line.startswith("summary:"):
            total = int(line.split()[1])
    if total is None or self_cost != total:
        raise CountError(f"a callgrind dump not understood: summary {total}, the self costs "
                         f"of its lines sum to {self_cost}")
    return total, compiled


def count(python=sys.executable, pythonpath=None, calls=CALLS):
    """Count every case with ``python`` (``pythonpath`` first on its path, if given; else this
    process's PYTHONPATH).

    Returns ``({case: {"total": n, "compiled": m}}, path of the gpurnn package counted)``,
    instructions per call.  Raises CountError if valgrind is missing or a run fails."""
    if shutil.which("valgrind") is None:
        raise CountError("valgrind is not installed (apt-get install valgrind)")
    _check_python(python)
    with tempfile.TemporaryDirectory(prefix="gpurnn-instructions-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "numba-cache"
        env = _environment(pythonpath, cache)
        driver = [python, str(Path(__file__).resolve()), "_drive", "--calls", str(calls)]
        # Native runs until one compiles nothing.  A process that imports a module from its
        # source (no .pyc yet, or a stale one) pickles the kernels' closures differently from
        # one that loads the .pyc, and Numba's cache key holds that pickle: the second run may
        # compile again.  If the third still does, the keys change in every process (commits
        # from before they were made stable), and the run under valgrind would compile too.
        cached = set()
        for attempt in range(3):
            native = _run(driver, "the driver (native run)", env=env, cwd=tmp, timeout=900)
            if attempt > 0 and set(cache.rglob("*")) == cached:
                break
            cached = set(cache.rglob("*"))
        else:
            raise CountError("Numba's cache misses in every new process (its keys are not "
                             "stable at this commit): a count would include compiling")
        package = json.loads(native.stdout.splitlines()[0])["gpurnn"]
        if pythonpath is not None and not Path(package).is_relative_to(pythonpath):
            raise CountError(f"the driver imported gpurnn from {package}, not from {pythonpath}")
        out = tmp / "callgrind.out"
        _run(["valgrind", "--tool=callgrind", f"--dump-before={_MARKER}",
              f"--callgrind-out-file={out}", *driver],
             "the driver under valgrind", env=env, cwd=tmp, timeout=1800)
        if set(cache.rglob("*")) != cached:
            raise CountError("Numba compiled code under valgrind (a cache miss): that code "
                             "differs from the native run's; counts are not comparable")
        dumps = sorted(tmp.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
        if len(dumps) != len(CASES) + 1:
            raise CountError(f"expected {len(CASES) + 1} callgrind dumps, got {len(dumps)}")
        counts = {}
        for case, dump in zip(CASES, dumps[1:]):
            total, compiled = parse_dump(dump.read_text())
            counts[case] = {"total": round(total / calls), "compiled": round(compiled / calls)}
    return counts, package


# ---------------------------------------------------------------------------- commits
def git(*args, check=True):
    """The output of ``git args`` in this repository (None on failure if not ``check``)."""
    result = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise CountError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip() if result.returncode == 0 else None


def resolve(rev):
    """The full hash of commit ``rev``, or None if there is no such commit."""
    return git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)


def build(commit, dest, python=sys.executable):
    """Install the package of ``commit`` (without dependencies) into ``dest``/site.

    The source comes from ``git archive``, so the working tree is not touched; the package runs
    with the dependencies of ``python``'s environment.  Returns the site folder."""
    archive = subprocess.run(["git", "-C", str(_REPO), "archive", "--format=tar", commit],
                             capture_output=True, check=True).stdout
    src, site = Path(dest) / "src", Path(dest) / "site"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(src, **_SAFE_EXTRACT)
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(src)],
         f"building {commit[:10]}")
    return site


def count_commit(commit, python=sys.executable):
    """``count`` for ``commit``, built into a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="gpurnn-build-") as tmp:
        return count(python, build(commit, tmp, python))


# ---------------------------------------------------------------------------- the gate
def compare(base, head, threshold=THRESHOLD):
    """Table lines and the regressions (figures that rose beyond ``threshold``)."""
    lines = [f"{'case':<18}{'figure':<10}{'base':>14}{'head':>14}{'change':>10}"]
    regressions = []
    for case in CASES:
        for figure in FIGURES:
            b, h = base[case][figure], head[case][figure]
            change = h / b - 1 if b else 0.0
            flag = ""
            if round(change, 9) > threshold:  # a rise of exactly the limit passes
                flag = "  ROSE"
                regressions.append(f"{case} {figure}: {b:,} -> {h:,} instructions per call "
                                   f"({change:+.2%}, limit {threshold:+.1%})")
            lines.append(f"{case:<18}{figure:<10}{b:>14,}{h:>14,}{change:>+10.2%}{flag}")
    return lines, regressions


def say(message):
    print(f"instruction gate: {message}", flush=True)


def gate(base_rev, head_rev="HEAD", threshold=THRESHOLD):
    """Count ``base_rev`` (default: the head's first parent) and ``head_rev``; print both.

    Returns 0 if no figure rose beyond ``threshold``, or if there is nothing to compare with
    (no parent, a base that does not build or that the driver cannot run); 1 if one rose,
    unless the head's commit message has an ``ACCEPT_TRAILER`` line; 2 on an error."""
    start = time.perf_counter()
    head = resolve(head_rev)
    if head is None:
        say(f"no commit {head_rev!r}")
        return 2
    base = resolve(base_rev if base_rev is not None else f"{head}^")
    if base is None:
        if git("rev-parse", "--is-shallow-repository") == "true":
            say(f"NOT RUN: a shallow clone lacks the parent of {head[:10]} "
                f"(git fetch --deepen=1 fetches it)")
        else:
            say(f"{head[:10]} has no parent commit to compare with: gate passes")
        return 0
    if shutil.which("valgrind") is None:
        say("valgrind is not installed (apt-get install valgrind); it counts the instructions")
        return 2
    T, B, I, H = SHAPE
    say(f"head {head[:10]} against base {base[:10]}, instructions per call (mean of {CALLS}), "
        f"T={T} B={B} I={I} H={H} float32, limit {threshold:+.1%}")
    with tempfile.TemporaryDirectory(prefix="gpurnn-gate-") as tmp:
        sites = {}
        for c in (base, head):
            try:
                sites[c] = build(c, Path(tmp) / c)
            except CountError as e:
                if c == head:
                    say(str(e))
                    return 2
                say(f"base {base[:10]} does not build; gate passes without a comparison:\n{e}")
                return 0
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            jobs = {c: pool.submit(count, sys.executable, sites[c]) for c in (base, head)}
            results = {}
            for c, job in jobs.items():
                try:
                    results[c] = job.result()[0]
                except CountError as e:
                    results[c] = e
    if isinstance(results[head], CountError):
        say(f"counting head {head[:10]} failed:\n{results[head]}")
        return 2
    if isinstance(results[base], CountError):
        say(f"base {base[:10]} cannot be counted by this driver (an older public API?); "
            f"gate passes without a comparison:\n{results[base]}")
        return 0
    lines, regressions = compare(results[base], results[head], threshold)
    print("\n".join(lines))
    say(f"counted in {time.perf_counter() - start:.0f} s")
    if not regressions:
        say("PASSED: no figure rose beyond the limit")
        return 0
    message = git("log", "-1", "--format=%B", head)
    accepted = [line for line in message.splitlines() if line.startswith(ACCEPT_TRAILER)]
    for regression in regressions:
        say(f"ROSE {regression}")
    if accepted:
        say(f"accepted by the head commit's message: {accepted[0]}")
        return 0
    say(f"FAILED: {len(regressions)} figure(s) rose beyond {threshold:+.1%} (a deliberate rise "
        f"passes with a line '{ACCEPT_TRAILER} <why>' in the commit message)")
    return 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("count", help="count every case and print the figures")
    p.add_argument("--rev", help="count this commit, built into a temporary folder "
                                 "(default: the gpurnn this Python imports)")
    p.add_argument("--json", help="also write the counts to this file")
    p = sub.add_parser("gate", help="compare two commits; exit 1 on a rise beyond the limit")
    p.add_argument("--base", help="the commit to compare with (default: the head's parent)")
    p.add_argument("--head", default="HEAD", help="the commit to check (default: HEAD)")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help=f"the largest rise that passes, as a fraction (default {THRESHOLD})")
    p = sub.add_parser("_drive", help=argparse.SUPPRESS)
    p.add_argument("--calls", type=int, default=CALLS)
    args = parser.parse_args(argv)

    if args.command == "_drive":
        _drive(args.calls)
        return 0
    if args.command == "gate":
        return gate(args.base, args.head, args.threshold)
    try:
        if args.rev is not None:
            commit = resolve(args.rev)
            if commit is None:
                raise CountError(f"no commit {args.rev!r}")
            counts, package = count_commit(commit)
        else:
            counts, package = count()
    except CountError as e:
        print(f"count failed: {e}", file=sys.stderr)
        return 2
    print(f"gpurnn from {package}; instructions per call (mean of {CALLS})")
    for case in CASES:
        print(f"{case:<18}" + "".join(f"{f} {counts[case][f]:>12,}   " for f in FIGURES))
    if args.json:
        Path(args.json).write_text(json.dumps(counts, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
