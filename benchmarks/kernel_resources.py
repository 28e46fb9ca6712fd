"""Resource report of every gpurnn CUDA kernel for sm_90 (Hopper), made without a GPU.

Each kernel is compiled to PTX by Numba (``gpurnn.kernels.ptx``), then assembled by ``ptxas -v``
for sm_90, which reports registers per thread, stack frame, spill stores/loads, static shared
memory and barriers.  The occupancy column is computed from those numbers and the sm_90 limits
below, for the launch shape gpurnn uses; it is not measured.

ptxas: ``--ptxas PATH``, else ``$PTXAS``, else ``ptxas`` on the PATH, else the one in the
``nvidia-cuda-nvcc`` wheel (``pip install --target DIR nvidia-cuda-nvcc==13.5.37`` and pass
``--ptxas DIR/nvidia/cu13/bin/ptxas``; its version should be at least NVVM's, so that it reads
the PTX ISA Numba emits).

    python benchmarks/kernel_resources.py --ptxas /path/to/ptxas --markdown docs/kernel_resources.md

The persistent kernels call the cooperative-groups grid barrier in ``cudadevrt``; they are
assembled with ``-c`` (relocatable), so the barrier's own registers are not in the count.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")

# sm_90 limits (CUDA C Programming Guide, compute capability 9.0 table).
REGS_PER_SM = 65536
REG_UNIT = 256  # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
SMEM_UNIT = 128
H100_SMS = 132


def find_ptxas(given):
    for candidate in (given, os.environ.get("PTXAS"), shutil.which("ptxas")):
        if candidate:
            return candidate
    for base in sys.path:
        hits = glob.glob(os.path.join(base, "nvidia", "cu1*", "bin", "ptxas"))
        if hits:
            return hits[0]
    sys.exit("ptxas not found: pass --ptxas PATH or set PTXAS (it comes in the nvidia-cuda-nvcc "
             "wheel: pip install --target DIR nvidia-cuda-nvcc==13.5.37)")


#: a static shared array of the PTX module (``cuda.shared.array``), its size in bytes
_SHARED_ARRAY = re.compile(r"^\s*\.(?:visible\s+)?\.shared\s+\.align\s+\d+\s+\.b8\s+\w+\[(\d+)\];",
                           re.M)
_FIELDS = {
    "registers": r"Used (\d+) registers",
    "barriers": r"used (\d+) barriers",
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "smem": r"(\d+) bytes smem",
}


def ptxas_report(ptxas, path):
    """``{field: int}`` from ``ptxas -v`` on one PTX file (one kernel)."""
    with tempfile.NamedTemporaryFile(suffix=".o") as obj:
        done = subprocess.run([ptxas, "-c", "-v", "-arch=sm_90", path, "-o", obj.name],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed on {path}:\n{done.stderr}")
    out = {}
    for field, pattern in _FIELDS.items():
        match = re.search(pattern, done.stderr)
        out[field] = int(match.group(1)) if match else 0
    if not out["smem"]:  # relocatable code: the static shared arrays are the module's variables
        with open(path) as f:
            out["smem"] = sum(int(n) for n in _SHARED_ARRAY.findall(f.read()))
    return out


def occupancy(registers, threads, smem_bytes):
    """(resident blocks per SM, fraction of the 64 warp slots) from the sm_90 limits."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // REG_UNIT) * REG_UNIT
    by_regs = REGS_PER_SM // regs_per_warp // warps
    by_warps = MAX_WARPS_PER_SM // warps
    smem = -(-smem_bytes // SMEM_UNIT) * SMEM_UNIT + SMEM_RESERVED_PER_BLOCK
    by_smem = SMEM_PER_SM // smem
    blocks = min(by_regs, by_warps, by_smem, MAX_BLOCKS_PER_SM)
    return blocks, blocks * warps / MAX_WARPS_PER_SM


def persistent_shapes():
    """Launch shapes of the persistent kernels at the small-batch benchmark shapes (float32),
    as ``CUDABackend`` plans them on an H100 (132 SMs, 48 KiB of shared memory per block)."""
    from gpurnn.kernels import persistent

    out = {}
    for mode, G in (("rnn", 1), ("lstm", 4), ("gru", 3)):
        for direction in ("forward", "backward"):
            for B, H in ((4, 256), (1, 128)):
                out[f"persistent_{mode}_{direction}", B, H] = persistent.plan(
                    G, B, H, 4, H100_SMS, 48 * 1024, backward=direction == "backward")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptxas")
    parser.add_argument("--markdown", help="also write the report to this file")
    args = parser.parse_args()
    ptxas = find_ptxas(args.ptxas)
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    version = version.strip().splitlines()[-1]

    from gpurnn.kernels.cuda import THREADS
    from gpurnn.kernels.fused import SPLITS, UNITS
    from gpurnn.kernels.ptx import write_all

    lines = ["| kernel | dtype | registers | stack B | spill st/ld B | static smem B | "
             "threads | dyn smem B | blocks/SM | occupancy (computed) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    shapes = persistent_shapes()
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted(write_all(tmp, ccs=((9, 0),))):
            name, dtype, _ = os.path.basename(path)[:-4].split("-")
            r = ptxas_report(ptxas, path)
            rows = []
            if name.startswith("persistent_"):
                for (kernel, B, H), shape in shapes.items():
                    if kernel != name or dtype != "float32":
                        continue
                    if shape is None:
                        rows.append((f"B={B},H={H}: does not fit", "", "", ""))
                        continue
                    threads, dyn = shape[4], shape[5]
                    blocks, occ = occupancy(r["registers"], threads, r["smem"] + dyn)
                    rows.append((threads, f"{dyn} (B={B},H={H}, {shape[0]} blocks)", blocks,
                                 f"{occ:.0%}"))
                if not rows:
                    rows.append(("-", "-", "-", "-"))  # float64: shapes not tabulated
            else:  # step kernels and the optimisers' updates (the same launch shape); fused
                # step kernels: UNITS x SPLITS threads, static smem
                threads = UNITS * SPLITS if name.startswith("fused_") else THREADS
                blocks, occ = occupancy(r["registers"], threads, r["smem"])
                rows.append((threads, 0, blocks, f"{occ:.0%}"))
            for threads, dyn, blocks, occ in rows:
                lines.append(f"| {name} | {dtype} | {r['registers']} | {r['stack']} | "
                             f"{r['spill_stores']}/{r['spill_loads']} | {r['smem']} | "
                             f"{threads} | {dyn} | {blocks} | {occ} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    import numba_cuda

    header = (f"sm_90, {version}; numba-cuda {numba_cuda.__version__}; kernels at commit "
              f"{commit.strip() or 'unknown'}.")
    report = header + "\n\n" + "\n".join(lines) + "\n"
    print(report)
    if args.markdown:
        _replace_report(args.markdown, report)


_BEGIN, _END = "<!-- report begin -->", "<!-- report end -->"


def _replace_report(path, report):
    """Put ``report`` between the markers of ``path``, written whole or not at all."""
    with open(path) as f:
        text = f.read()
    if _BEGIN not in text or _END not in text:
        raise SystemExit(f"{path} has no {_BEGIN} ... {_END} markers")
    head, rest = text.split(_BEGIN, 1)
    tail = rest.split(_END, 1)[1]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(head + _BEGIN + "\n" + report + _END + tail)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
