"""The CPU backend's compiled time loops: same results as the loops run as Python, each step
kernel called with its declared signature, BLAS called correctly from Numba, no Numba thread
pool, and Numba's cache hit by a new process.

Speed itself is measured by the asv suite and benchmarks/compare_torch.py, not here.
"""
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from gpurnn.engine import drivers
from gpurnn.engine.backend import CPUBackend
from gpurnn.kernels import cpu
from gpurnn.kernels.loops import make_loops, time_slots
from gpurnn.kernels.signatures import STEP_KERNELS, numba_signature

from conftest import CELL_IDS, CELLS

SPECS = {
    "rnn_tanh": drivers.CellSpec("rnn"),
    "rnn_relu": drivers.CellSpec("rnn", relu=True),
    "lstm": drivers.CellSpec("lstm"),
    "gru_reset_before": drivers.CellSpec("gru"),
    "gru_reset_after": drivers.CellSpec("gru", reset_after=True),
}
assert set(SPECS) == set(CELL_IDS) and len(CELLS) == len(SPECS)


class PythonLoopsCPU(CPUBackend):
    """The CPU backend without its compiled loops: the drivers run the loops as Python."""

    def compiled_loops(self, dtype):
        return None


def test_numpy_openblas_is_found_here():
    # This environment has NumPy's OpenBLAS wheel: the compiled loops must be in use, else
    # every comparison below would compare the Python loops with themselves.
    blas = cpu.numpy_blas()
    assert blas is not None
    assert CPUBackend().compiled_loops(np.float64) is not None
    # and its GEMV (products of one row) and thread count (the cut rule): both in OpenBLAS
    assert blas.gemv is not None and blas.threads is not None
    assert cpu._blas_threads is not None


def test_the_compiled_products_see_the_blas_thread_count():
    """The cut rule reads OpenBLAS's thread count on every product (``small_gemm_blocks``):
    ``openblas_get_num_threads`` follows threadpoolctl's limit."""
    import threadpoolctl

    count = numba.njit(lambda: cpu._blas_threads())
    path = cpu.numpy_blas().path
    for threads in (1, 2):
        with threadpool_limits(threads):
            reported = [d["num_threads"] for d in threadpoolctl.threadpool_info()
                        if d["filepath"] == path]
            assert count() == reported[0] <= threads


def test_numpy_openblas_is_preferred_over_scipys(monkeypatch):
    # SciPy brings its own OpenBLAS; the loops must call the one NumPy's matmul uses, which
    # threadpoolctl limits with it (calling SciPy's made training steps 5-30x slower here).
    pytest.importorskip("scipy.linalg")  # loads scipy.libs' OpenBLAS into the process
    import threadpoolctl

    found = threadpoolctl.threadpool_info()
    blas = [d for d in found if d.get("internal_api") == "openblas"]
    if len(blas) < 2:
        pytest.skip("this SciPy shares NumPy's OpenBLAS")
    # the order the libraries are listed in must not matter
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: found[::-1])
    numpy_dir = os.path.dirname(np.__file__)
    path = cpu.numpy_blas()[0]
    assert path.startswith((numpy_dir + os.sep, numpy_dir + ".libs" + os.sep)), path


def _run(be, cell, T, B, I, H, reverse, rng, lengths, dtype=np.float64):
    G = cell.gates

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    w = drivers.Weights(*(normal(*s, scale=0.4) for s in
                          ((G * H, I), (G * H, H), (G * H,), (G * H,))))
    x = normal(T, B, I)
    h0 = normal(B, H, scale=0.5)
    c0 = normal(B, H, scale=0.5) if cell.has_cell_state else None
    dy = normal(T, B, H)
    dh = normal(B, H)
    dc = normal(B, H) if cell.has_cell_state else None
    grads = drivers.Weights(*(np.empty_like(a) for a in (w.w_ih, w.w_hh, w.b_ih, w.b_hh)))
    ws = drivers.Workspace(be)
    y, tape = drivers.forward(be, cell, w, x, h0, c0, lengths, reverse, True, ws)
    dx, dh0, dc0 = drivers.backward(be, cell, w, tape, dy, dh, dc, grads, ws)
    y_eval, tape_eval = drivers.forward(be, cell, w, x, h0, c0, lengths, reverse, False,
                                        drivers.Workspace(be))
    out = [y, tape.h_last, dx, dh0, grads.w_ih, grads.w_hh, grads.b_ih, grads.b_hh, y_eval,
           tape_eval.h_last]
    if cell.has_cell_state:
        out += [tape.c_last, dc0]
    return out


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("reverse", [False, True])
def test_compiled_loops_match_python_loops(name, reverse):
    cell = SPECS[name]
    T, B, I, H = 6, 3, 5, 7
    lengths = np.array([6, 0, 4], dtype=np.int32)
    want = _run(PythonLoopsCPU(), cell, T, B, I, H, reverse, np.random.default_rng(5), lengths)
    got = _run(CPUBackend(), cell, T, B, I, H, reverse, np.random.default_rng(5), lengths)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


class FreshLoopsCPU(CPUBackend):
    """The CPU backend with its step kernels and loops compiled in this process, not loaded
    from Numba's cache as whole loops, so that each kernel records what it was called with."""

    def __init__(self):
        super().__init__()
        self._kernels = {}

    def kernels(self, dtype):
        dtype = np.dtype(dtype)
        if dtype not in self._kernels:
            self._kernels[dtype] = cpu.make_cpu_kernels(dtype)
        return self._kernels[dtype]

    def compiled_loops(self, dtype):
        dtype = np.dtype(dtype)
        if dtype not in self._loops:
            loops = make_loops(cpu._make_matmul(dtype), self.kernels(dtype),
                               numba.njit(time_slots))
            self._loops[dtype] = {name: numba.njit(fn) for name, fn in loops.items()}
        return self._loops[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loops_call_each_kernel_with_its_declared_signature(dtype):
    """The signature the vectorisation test inspects is the one that runs."""
    be = FreshLoopsCPU()
    lengths = np.array([6, 0, 4], dtype=np.int32)
    for cell in SPECS.values():
        for reverse in (False, True):
            _run(be, cell, 6, 3, 5, 7, reverse, np.random.default_rng(1), lengths, dtype)
    f = np.dtype(dtype).type  # the dropout mask, as a layer calls it (layers._dropout_mask)
    be.kernels(dtype)["dropout_mask"](4, 6, np.empty((4, 6), dtype), 7, 0, f(0.5), f(2.0))
    for name, kernel in be.kernels(dtype).items():
        want = numba_signature(STEP_KERNELS[name], dtype)
        assert kernel.signatures == [want], name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 9, 4), (5, 1, 3), (4, 6, 1), (3, 8, 5),
                                   (1, 300, 130)])
def test_blas_matmul_of_views(dtype, M, K, N):
    """Every layout the loops pass, one row (GEMV) and more (GEMM)."""
    rng = np.random.default_rng(M * 100 + K * 10 + N)
    matmul = cpu._make_matmul(dtype)
    unit, tiny = np.finfo(dtype).eps / 2, np.finfo(dtype).tiny
    a_rows = rng.standard_normal((M, K + 3)).astype(dtype)[:, 2:2 + K]  # row stride > K
    a_t = np.ascontiguousarray(rng.standard_normal((K, M)).astype(dtype)).T  # a transposed view
    a_cols = rng.standard_normal((K, M + 2)).astype(dtype)[:, :M].T  # columns of a wider array
    b_t = rng.standard_normal((N, K)).astype(dtype).T  # as w.T
    b = rng.standard_normal((K, N)).astype(dtype)
    for a_ in (a_rows, a_t, a_cols):
        for b_ in (b, b_t):
            out = np.full((M, N + 2), np.nan, dtype)[:, :N]  # row stride > N
            matmul(a_, b_, out)
            exact = a_.astype(np.float64) @ b_.astype(np.float64)
            # a sum of K products: within K units of roundoff of |a| @ |b|
            bound = K * unit * (np.abs(a_).astype(np.float64) @ np.abs(b_)) + tiny
            assert np.all(np.abs(out - exact) <= bound)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_bias_gradient_sums_of_views(dtype, threads):
    """``sum_rows`` (a GEMV where BLAS takes the dtype) sums a whole array and a block of its
    columns, as the drivers pass them, within the roundoff bound of a sum of its rows, and
    writes nothing beside ``out``; 16-bit arrays (summed into float32) too."""
    rng = np.random.default_rng(threads)
    a = rng.standard_normal((1000, 12)).astype(dtype)  # [T*B, G*H]
    compute = np.float32 if dtype == "float16" else dtype
    unit, tiny = np.finfo(compute).eps / 2, np.finfo(compute).tiny
    for view in (a, a[:, 8:]):  # the whole array; the reset-after GRU's n block
        out = np.full(view.shape[1] + 2, np.nan, compute)
        with threadpool_limits(threads):
            CPUBackend().sum_rows(view, out[1:-1])
        exact = view.astype(np.float64).sum(axis=0)
        bound = view.shape[0] * unit * np.abs(view).astype(np.float64).sum(axis=0) + tiny
        assert np.all(np.abs(out[1:-1] - exact) <= bound)
        assert np.isnan(out[0]) and np.isnan(out[-1])


@pytest.mark.parametrize("rule", sorted(set(cpu.SMALL_GEMM_RULES.values())))
@pytest.mark.parametrize("M,K,N", [(1, 1024, 1200), (4, 256, 1100), (3, 700, 600),
                                   (4, 8, 40001), (8, 512, 300), (32, 768, 300),
                                   (37, 512, 200), (100, 96, 130)])
def test_float32_products_cut_into_blocks(rule, M, K, N):
    """Past the small-matrix kernels' bound (M*N*K > 100**3) a float32 product runs as calls on
    blocks within it, of a multiple of the rule's unit of columns and, where the rule splits
    rows and OpenBLAS runs one thread, of a power of two of rows, the last ones shorter; a
    product the rule does not cut runs as one call.  Every rule of ``SMALL_GEMM_RULES`` is
    checked on every machine (the cut is the same code whichever kernels OpenBLAS then takes),
    at one BLAS thread and at two, and every layout gives the product within float32's bound
    for a sum of K products, K * 2^-24 * (|a| @ |b|)."""
    max_mk, unit, most, least_rows, threaded_rows, most_row_blocks = rule
    for one_thread in (True, False):
        rows, cols = cpu.small_gemm_blocks(M, N, K, rule, one_thread)
        if (rows, cols) != (M, N):
            assert M * K <= max_mk and rows * cols * K <= 100 ** 3 < M * N * K
            assert one_thread or M <= threaded_rows
            assert M <= rows * most_row_blocks
            assert cols % unit == 0 and cols <= most
            assert rows == M or (one_thread and least_rows <= rows == 2 ** (rows.bit_length() - 1))
        elif least_rows == 0 and (one_thread or M <= threaded_rows):
            assert M * K > max_mk or M * N * K <= 100 ** 3
    assert cpu.small_gemm_blocks(M, 100 ** 3 // (M * K), K, rule, True) == (
        M, 100 ** 3 // (M * K))  # within the bound: one call takes it
    rng = np.random.default_rng(M + K + N)
    matmul = cpu._make_matmul(np.float32, rule)
    a = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    bound = K * 2.0 ** -24 * (np.abs(a).astype(np.float64) @ np.abs(w).T)
    for threads in (1, 2):
        with threadpool_limits(threads):
            for a_ in (a, np.asfortranarray(a)):  # rows contiguous, and a transposed layout
                for b in (np.ascontiguousarray(w.T), w.T):  # W^T copied, and the view of W
                    out = np.full((M, N + 3), np.nan, np.float32)[:, :N]  # row stride > N
                    matmul(a_, b, out)
                    assert np.all(np.abs(out - a.astype(np.float64) @ w.T) <= bound)


def test_each_rule_cuts_where_measured():
    """The shapes behind each rule's table (``kernels/cpu.py``) get the blocks measured best."""
    intel, zen4 = cpu.SMALL_GEMM_RULES[("SkylakeX", None)], cpu.SMALL_GEMM_RULES[
        ("SkylakeX", "znver4")]
    assert cpu.small_gemm_blocks(4, 1024, 256, intel, True) == (4, 976)
    assert cpu.small_gemm_blocks(16, 2048, 512, intel, True) == (16, 2048)  # M*K past 4096
    assert cpu.small_gemm_blocks(32, 1024, 256, zen4, True) == (32, 64)
    assert cpu.small_gemm_blocks(64, 2048, 512, zen4, True) == (16, 64)
    assert cpu.small_gemm_blocks(64, 2048, 512, zen4, False) == (64, 2048)  # threaded: whole
    assert cpu.small_gemm_blocks(8, 2048, 512, zen4, False) == (8, 64)  # all rows fit
    assert cpu.small_gemm_blocks(32, 1024, 256, zen4, False) == (32, 1024)  # threaded, 32 rows
    assert cpu.small_gemm_blocks(16, 512, 2048, zen4, True) == (4, 64)
    assert cpu.small_gemm_blocks(128, 512, 2048, zen4, True) == (4, 64)  # 32 row blocks
    assert cpu.small_gemm_blocks(256, 512, 2048, zen4, True) == (256, 512)  # 64: whole


def test_the_cut_rule_is_the_cpus_own_else_its_cores():
    """A CPU measured on its own gets its rule; another CPU with that OpenBLAS core the core's;
    a core without small-matrix kernels none (one call per product)."""
    zen4 = cpu.SMALL_GEMM_RULES[("SkylakeX", "znver4")]
    assert cpu.small_gemm_rule("SkylakeX", "znver4") == zen4
    assert cpu.small_gemm_rule("SkylakeX", "sapphirerapids") == cpu.SMALL_GEMM_RULES[
        ("SkylakeX", None)] != zen4
    assert cpu.small_gemm_rule("Haswell", "znver4") == cpu.small_gemm_rule(None, "x") == \
        cpu.NO_CUT
    assert cpu.small_gemm_blocks(1, 10 ** 6, 16, cpu.NO_CUT, True) == (1, 10 ** 6)


def test_the_grid_script_times_the_rules_blocks():
    """``benchmarks/small_gemm_grid.py``, which measures a rule: the whole product, the blocks
    within the bound, and the blocks this machine's rule picks, on one line per shape; a shape
    that is not M,K,N is refused."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks",
                          "small_gemm_grid.py")
    run = [sys.executable, script, "--threads", "1", "--calls", "1", "--repeat", "1"]
    done = subprocess.run(run + ["--shapes", "4,256,1100"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    line = done.stdout.splitlines()[-1]
    rows, cols = cpu.small_gemm_blocks(4, 1100, 256, cpu.SMALL_GEMM_RULE, True)
    rule = "whole" if (rows, cols) == (4, 1100) else f"{rows}x{cols}"
    assert line.startswith("4 256 1100 | ") and f"| {rule}: " in line, line
    done = subprocess.run(run + ["--shapes", "4,256"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "a shape is M,K,N (three positive ints), got '4,256'" in \
        done.stderr


def test_blas_matmul_refuses_bad_shapes():
    matmul = cpu._make_matmul(np.float64)
    with pytest.raises(ValueError, match="shapes must be"):
        matmul(np.ones((2, 3)), np.ones((4, 5)), np.empty((2, 5)))
    with pytest.raises(ValueError, match="shapes must be"):
        matmul(np.ones((2, 3)), np.ones((3, 5)), np.empty((5, 2)).T)


def test_no_cpu_kernel_or_loop_is_parallel():
    # Another thread pool spinning against OpenBLAS's made a training step up to 20x slower
    # here (BENCHMARKS.md, core ownership): the cores belong to BLAS, so nothing gpurnn
    # compiles for the CPU may use parallel=True / prange.
    be = CPUBackend()
    for dtype in (np.float32, np.float64):
        for fn in (list(be.kernels(dtype).values()) + list(be.compiled_loops(dtype).values())
                   + list(be.update_kernels(dtype).values())):
            assert not fn.targetoptions.get("parallel"), fn


def _python(code, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


_FIRST_STEP = """
    import numpy as np
    import numba.np.ufunc.parallel as numba_parallel
    import gpurnn
    m = gpurnn.GRU(5, 6, dtype="float64", seed=0)
    out, _ = m(np.ones((4, 2, 5)))
    m.backward(out)
    loops = m.backend.compiled_loops(np.float64)
    kernels = m.backend.kernels(np.float64)
    # The step kernels are compiled into the loops, and loaded with them.
    used = [loops["gru_reset_before_forward"], loops["gru_reset_before_backward"]]
    called = used + [kernels["gru_reset_before_gates_step"],
                     kernels["gru_reset_before_candidate_step"]]
    print(sum(len(f.stats.cache_hits) for f in used),
          sum(len(f.stats.cache_misses) for f in called), numba_parallel._is_initialized)
"""


def test_new_process_hits_numba_cache_and_starts_no_numba_threads(tmp_path):
    # Cold: everything compiles (and is written to the cache).
    hits, misses, pool = _python(_FIRST_STEP, tmp_path).split()
    assert (int(hits), int(misses), pool) == (0, 4, "False")
    # Warm: a new process loads all of it from the cache, compiling nothing.
    hits, misses, pool = _python(_FIRST_STEP, tmp_path).split()
    assert (int(hits), int(misses), pool) == (2, 0, "False")
