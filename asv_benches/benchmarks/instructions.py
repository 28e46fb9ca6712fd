"""Instructions per call of gpurnn's CPU forward and training step, counted by valgrind.

A figure that the machine's load cannot move, beside the wall-clock ``time_*`` benchmarks:
``track_total`` (every instruction of a call) and ``track_compiled`` (those in Numba's compiled
code and libm: the step kernels and time loops), per cell and mode (``forward``: inference;
``step``: forward + backward), float32 at ``SHAPE`` of ``benchmarks/instructions.py``, where
the counting and the CI gate live and their method is described.  One count of all cases runs
in ``setup_cache`` (about a minute under valgrind); skipped where valgrind is not installed.
"""
import importlib.util
import shutil
import sys
from pathlib import Path


def _load_counter():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "instructions.py"
    spec = importlib.util.spec_from_file_location("gpurnn_instruction_counter", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_counter = _load_counter()


class Instructions:
    params = [list(_counter.CELLS), list(_counter.MODES)]
    param_names = ["cell", "mode"]
    unit = "instructions"
    timeout = 1800

    def setup_cache(self):
        if shutil.which("valgrind") is None:
            return None
        import gpurnn

        # asv's runner takes PYTHONPATH out of its environment: name the gpurnn it imported.
        return _counter.count(sys.executable, Path(gpurnn.__file__).resolve().parents[1])[0]

    def setup(self, counts, cell, mode):
        if counts is None:
            raise NotImplementedError("valgrind is not installed")

    def track_total(self, counts, cell, mode):
        return counts[f"{cell}.{mode}"]["total"]

    def track_compiled(self, counts, cell, mode):
        return counts[f"{cell}.{mode}"]["compiled"]
