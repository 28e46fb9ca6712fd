"""The instruction counter's parts that need no valgrind: reading a callgrind dump, the gate's
comparison, and the gate's answer where there is nothing to compare with.

The counts themselves (valgrind, a minute a run) are exercised by CI's gate (``.ci/run``)."""
import importlib.util
import subprocess
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "instructions.py"
_spec = importlib.util.spec_from_file_location("gpurnn_instruction_counter", _PATH)
counter = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(counter)

# The shape of a callgrind dump (callgrind 3.19, --dump-before): objects named once, then by
# id; the cost line after calls= is the callee's inclusive cost, not the caller's own.
DUMP = """\
# callgrind format
version: 1
creator: callgrind-3.19.0
part: 4
desc: Trigger: --dump-before=getppid

positions: line
events: Ir
summary: 1000

ob=(7) /usr/bin/python3.11
fl=(1) python.c
fn=(1) main
cob=(2) ???
cfn=(2) 0x0000000004e3a000
calls=1 0
15 950
15 30
16 20

ob=(2)
fn=(2)
0 600
+2 100
cob=(3) /usr/lib/x86_64-linux-gnu/libm.so.6
cfn=(3) expf
calls=10 0
0 250

ob=(3)
fn=(3)
0 230
* 20
"""


def test_parse_dump_sums_compiled_code_and_libm_without_call_costs():
    total, compiled = counter.parse_dump(DUMP)
    assert total == 1000
    assert compiled == 600 + 100 + 230 + 20  # ??? and libm's own lines, not the calls= lines


def test_parse_dump_refuses_a_dump_whose_lines_do_not_sum_to_its_summary():
    with pytest.raises(counter.CountError, match="summary 999"):
        counter.parse_dump(DUMP.replace("summary: 1000", "summary: 999"))
    with pytest.raises(counter.CountError, match="summary None"):
        counter.parse_dump(DUMP.replace("summary: 1000\n", ""))


def _counts(**changed):
    counts = {case: {"total": 1000, "compiled": 500} for case in counter.CASES}
    for case_figure, value in changed.items():
        case, figure = case_figure.rsplit("__", 1)
        counts[case.replace("__", ".")][figure] = value
    return counts


def test_compare_names_each_figure_that_rose_beyond_the_limit():
    base = _counts()
    head = _counts(lstm__forward__compiled=516, gru__step__total=1031, rnn__step__total=1030,
                   gru_seed__forward__total=500)
    lines, regressions = counter.compare(base, head, threshold=0.03)
    assert len(regressions) == 2
    assert regressions[0].startswith("lstm.forward compiled: 500 -> 516")
    assert regressions[1].startswith("gru.step total: 1,000 -> 1,031")
    assert len(lines) == 1 + len(counter.CASES) * len(counter.FIGURES)
    assert sum(line.endswith("ROSE") for line in lines) == 2


def _in_git_checkout():
    result = subprocess.run(["git", "-C", str(_PATH.parent), "rev-parse", "--git-dir"],
                            capture_output=True)
    return result.returncode == 0


@pytest.mark.skipif(not _in_git_checkout(), reason="needs the git history")
def test_gate_passes_a_root_commit_and_refuses_an_unknown_one(capsys):
    root = counter.git("rev-list", "--max-parents=0", "HEAD").split()[-1]
    assert counter.gate(None, root) == 0
    assert "has no parent commit" in capsys.readouterr().out
    assert counter.gate(None, "no-such-commit-here") == 2
    assert "no commit 'no-such-commit-here'" in capsys.readouterr().out
