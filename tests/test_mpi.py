"""Data-parallel training under MPI (gpurnn/distributed.py).

* Without MPI: batch sharding, and ``DataParallel.allreduce_grads`` run by 3 ranks as threads
  over an in-process stand-in for the communicator: the summed and scaled gradients and loss
  equal one model's on the whole batch (mean and sum, with unequal masks), and so does a whole
  ``train_step`` with global-norm clipping.
* Under MPI (``mpiexec`` from the ``mpich`` wheel next to this Python, and mpi4py): ``gpurnn
  train`` on 2 ranks ends with the weights and optimiser state of 1 process on the whole batch
  (float64), also across a resume; rank 0 alone writes the metrics; an indivisible batch is
  refused.
"""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from gpurnn.training.distributed import DataParallel, SingleProcess, launched_by_mpi, world
from gpurnn.nn.optim import Adam
from gpurnn.training.step import train_step
from gpurnn.training.tasks import make_task, model_for_task
from gpurnn.training.tbptt import train_batch

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
TIMEOUT_S = 120  # per command; a hung collective fails the test instead of blocking CI


class ThreadWorld(SingleProcess):
    """``size`` ranks as threads of one process, exchanging values through shared slots and a
    barrier; sums run in rank order."""

    def __init__(self, rank, size, shared):
        self.rank, self.size, self.shared = rank, size, shared

    def _exchange(self, value):
        """Every rank's ``value``, by rank."""
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = value
        barrier.wait()
        values = list(slots)
        barrier.wait()  # everyone has read the slots before any rank writes them again
        return values

    def allreduce_(self, buf):
        values = self._exchange(buf.copy())
        buf[...] = values[0]
        for v in values[1:]:
            buf += v
        return buf

    def broadcast_(self, buf, root=0):
        buf[...] = self._exchange(buf.copy())[root]
        return buf

    def broadcast_object(self, obj, root=0):
        return self._exchange(obj)[root]

    def allgather_object(self, obj):
        return self._exchange(obj)


def run_ranks(size, work):
    """``work(world)`` on ``size`` thread ranks; their results by rank."""
    shared = {"slots": [None] * size, "barrier": threading.Barrier(size, timeout=60)}
    results, errors = [None] * size, []

    def run(rank):
        try:
            results[rank] = work(ThreadWorld(rank, size, shared))
        except BaseException as exc:  # reported below; an abort breaks the barrier for all
            errors.append(exc)
            shared["barrier"].abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_plain_run_is_one_process_without_mpi():
    assert not launched_by_mpi({"HOME": "/root"})
    assert launched_by_mpi({"PMI_RANK": "0"}) and launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "2"})
    if not launched_by_mpi():
        imported_before = "mpi4py" in sys.modules
        w = world()
        assert (w.rank, w.size, w.is_root) == (0, 1, True)
        assert imported_before or "mpi4py" not in sys.modules  # a plain run never imports it


@pytest.mark.parametrize("task_name", ["adding", "copy"])
def test_shards_partition_the_global_batch(task_name):
    task = make_task(task_name, 7)
    head = task.model_kwargs()["head"]
    batch = task.batch(np.random.default_rng(1), 6)
    batch = dataclasses.replace(batch, lengths=np.arange(1, 7))
    shards = [DataParallel(ThreadWorld(r, 3, None), 6).shard(batch, head) for r in range(3)]
    target_axis = 1 if head == "all" else 0
    np.testing.assert_array_equal(np.concatenate([s.x for s in shards], axis=1), batch.x)
    np.testing.assert_array_equal(np.concatenate([s.lengths for s in shards]), batch.lengths)
    np.testing.assert_array_equal(
        np.concatenate([s.target for s in shards], axis=target_axis), batch.target)
    if batch.mask is not None:
        np.testing.assert_array_equal(
            np.concatenate([s.mask for s in shards], axis=target_axis), batch.mask)
    assert all(s.x.shape[1] == 2 for s in shards)


def test_indivisible_batch_and_wrong_batch_are_refused():
    with pytest.raises(ValueError, match="multiple of 3"):
        DataParallel(ThreadWorld(0, 3, None), 8)
    batch = make_task("adding", 5).batch(np.random.default_rng(0), 4)
    with pytest.raises(ValueError, match="global batch of 6 sequences, got 4"):
        DataParallel(ThreadWorld(0, 3, None), 6).shard(batch, "last")
    with pytest.raises(ValueError, match="reduction"):
        DataParallel(ThreadWorld(0, 1, None), 4).allreduce_grads({}, 0.0, batch, "max")


def _copy_batch_with_uneven_mask(rng, B):
    """A copy-task batch whose mask counts different positions in each rank's shard."""
    task = make_task("copy", 9)
    batch = task.batch(rng, B)
    mask = rng.random(batch.mask.shape) < 0.5  # [T, B]
    mask[:, 0] = True  # the ranks' counts differ: the first shard has a full sequence
    mask[:, -1] = False  # the last shard an empty one
    return task, dataclasses.replace(batch, mask=mask)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_allreduced_gradients_are_the_whole_batch_gradients(reduction, rng):
    task, batch = _copy_batch_with_uneven_mask(rng, 6)
    whole = model_for_task(task, cell="gru", hidden_size=5, dtype="float64", seed=4)
    loss, dy = whole.loss(whole(batch.x), batch, task.loss, reduction)
    whole.backward(dy)

    def work(w):
        model = model_for_task(task, cell="gru", hidden_size=5, dtype="float64", seed=4)
        dp = DataParallel(w, 6)
        shard = dp.shard(batch, model.head_mode)
        local_loss, dy = model.loss(model(shard.x), shard, task.loss, reduction)
        model.backward(dy)
        local = {k: g.copy() for k, g in model.grads.items()}
        return dp.allreduce_grads(model.grads, local_loss, shard, reduction), model.grads, local

    results = run_ranks(3, work)
    for total, grads, local in results:
        assert total == pytest.approx(loss, rel=1e-13)
        for name, g in whole.grads.items():
            np.testing.assert_allclose(grads[name], g, rtol=1e-12,
                                       atol=1e-12 * np.abs(g).max(), err_msg=name)
    # The shards' own gradients are not the whole batch's: the reduction did the work.
    name = "rnn.weight_hh_l0"
    assert not np.allclose(results[0][2][name], whole.grads[name], rtol=1e-3)


def test_tbptt_chunk_with_loss_on_some_shards_only(rng):
    """A chunk whose loss positions all fall in one rank's shard: every rank must still join
    the all-reduce (a rank that skipped it would hang the others), and the result is the
    whole batch's."""
    task = make_task("copy", 9)
    batch = task.batch(rng, 4)
    mask = np.array(batch.mask, copy=True)  # [T, B]
    mask[:3] = 0
    mask[:3, 3] = 1  # in the first chunk only sequence 3 (rank 1's shard) counts
    batch = dataclasses.replace(batch, mask=mask)
    whole = model_for_task(task, cell="gru", hidden_size=5, dtype="float64", seed=4)
    train_batch(whole, task, Adam(whole.params, whole.grads, lr=0.05), batch, tbptt=3)

    def work(w):
        model = model_for_task(task, cell="gru", hidden_size=5, dtype="float64", seed=4)
        dp = DataParallel(w, 4)
        train_batch(model, task, Adam(model.params, model.grads, lr=0.05),
                    dp.shard(batch, model.head_mode), tbptt=3, data_parallel=dp)
        return model.state_dict()

    for weights in run_ranks(2, work):
        for name, value in whole.state_dict().items():
            np.testing.assert_allclose(weights[name], value, rtol=1e-12, atol=1e-14, err_msg=name)


def test_train_step_clips_the_summed_gradients(rng):
    task = make_task("adding", 6)
    batch = task.batch(rng, 8)
    options = dict(reduction="mean", clip_norm=1e-3)  # clipping active: the norm is far above
    whole = model_for_task(task, hidden_size=4, dtype="float64", seed=2)
    _, norm = train_step(whole, task, Adam(whole.params, whole.grads, lr=0.05), batch, **options)
    assert norm > 1e-2

    def work(w):
        model = model_for_task(task, hidden_size=4, dtype="float64", seed=2)
        dp = DataParallel(w, 8)
        optimizer = Adam(model.params, model.grads, lr=0.05)
        _, rank_norm = train_step(model, task, optimizer, dp.shard(batch, model.head_mode),
                                  data_parallel=dp, **options)
        return rank_norm, model.params

    for rank_norm, params in run_ranks(2, work):
        assert rank_norm == pytest.approx(norm, rel=1e-12)
        for name, p in whole.params.items():
            np.testing.assert_allclose(params[name], p, rtol=1e-12, atol=1e-14, err_msg=name)


def test_ranks_start_from_rank_0s_weights_and_data_stream():
    task = make_task("adding", 5)

    def work(w):
        model = model_for_task(task, hidden_size=3, dtype="float64", seed=10 + w.rank)
        rng = np.random.default_rng(20 + w.rank)
        DataParallel(w, 4).broadcast_start(model, rng)
        return model.state_dict(), rng.random(3)

    (params0, draws0), (params1, draws1) = run_ranks(2, work)
    expected = model_for_task(task, hidden_size=3, dtype="float64", seed=10).state_dict()
    for name, p in expected.items():
        np.testing.assert_array_equal(params0[name], p)
        np.testing.assert_array_equal(params1[name], p)
    np.testing.assert_array_equal(draws0, np.random.default_rng(20).random(3))
    np.testing.assert_array_equal(draws1, draws0)


def test_ranks_on_different_devices_are_refused():
    task = make_task("adding", 5)

    def work(w):
        model = model_for_task(task, hidden_size=3, device=["cpu", "cuda"][w.rank])
        DataParallel(w, 4).broadcast_start(model, np.random.default_rng(0))

    with pytest.raises(RuntimeError, match=r"different devices \['cpu', 'cuda'\]"):
        run_ranks(2, work)


# ---------------------------------------------------------------------------- under MPI
def _mpi_missing():
    if not os.path.exists(MPIEXEC):
        return f"no mpiexec next to {sys.executable} (pip install 'gpurnn[mpi]')"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'gpurnn[mpi]')"
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


def _train(out, *options, ranks=None):
    """``gpurnn train`` on tiny sizes, in one process or under ``mpiexec -n ranks``."""
    command = [sys.executable, "-m", "gpurnn", "train", "--device", "cpu", "--dtype", "float64",
               "--quiet", "--eval-every", "100", "--out", str(out), *options]
    if ranks is not None:
        command = [MPIEXEC, "-n", str(ranks), *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)


def _ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _assert_same_run(got_dir, want_dir):
    """Same step, weights and optimiser state (float64, up to summation order)."""
    with np.load(os.path.join(want_dir, "checkpoint.npz")) as want, \
            np.load(os.path.join(got_dir, "checkpoint.npz")) as got:
        assert json.loads(str(got["meta"]))["step"] == json.loads(str(want["meta"]))["step"]
        names = [n for n in want.files if n.startswith(("model/", "optim/"))]
        assert sorted(names) == sorted(n for n in got.files if n.startswith(("model/", "optim/")))
        for name in names:
            w = want[name]
            np.testing.assert_allclose(got[name], w, rtol=1e-12, atol=1e-12 * np.abs(w).max(),
                                       err_msg=name)


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


ADDING = ("--task", "adding", "--seq-len", "6", "--hidden", "5", "--batch", "8", "--seed", "3",
          "--clip", "0.05")  # clipping active: the gradient norm at these sizes is about 0.5
COPY = ("--task", "copy", "--seq-len", "7", "--hidden", "6", "--cell", "gru", "--batch", "6",
        "--seed", "5", "--reduction", "sum", "--optimizer", "momentum")


@needs_mpi
def test_two_ranks_train_like_one_process(tmp_path):
    _ok(_train(tmp_path / "one", *ADDING, "--steps", "4"))
    two = _ok(_train(tmp_path / "two", *ADDING, "--steps", "4", ranks=2))
    _assert_same_run(tmp_path / "two", tmp_path / "one")
    # Rank 0 alone wrote: one header, one record per step, one summary; the logged loss is
    # the whole batch's.
    one_records, two_records = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r.get("step") for r in two_records] == [None, 1, 2, 3, 4, 4]
    for a, b in zip(one_records[1:5], two_records[1:5]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-12)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-12)
    assert two.stderr.count("gpurnn train:") == 1 and two.stdout.count("done:") == 1


@needs_mpi
def test_two_ranks_resume_like_one_process(tmp_path):
    """Sum reduction, token inputs, a per-step masked head; resumed half way under MPI."""
    _ok(_train(tmp_path / "one", *COPY, "--steps", "4"))
    _ok(_train(tmp_path / "two", *COPY, "--steps", "2", ranks=2))
    _ok(_train(tmp_path / "two", "--resume", str(tmp_path / "two"), "--steps", "4", ranks=2))
    _assert_same_run(tmp_path / "two", tmp_path / "one")


@needs_mpi
def test_batch_indivisible_by_ranks_is_refused(tmp_path):
    result = _train(tmp_path / "bad", *ADDING, "--steps", "2", "--batch", "7", ranks=2)
    assert result.returncode != 0
    assert "multiple of 2" in result.stderr
    assert not os.path.exists(tmp_path / "bad" / "checkpoint.npz")


@needs_mpi
def test_a_failure_on_one_rank_ends_the_job(tmp_path):
    """Rank 0 alone creates the run directory; when it cannot, the other rank, already waiting
    in a collective, must not hang: the job is aborted after ``ERROR_WAIT_S``."""
    (tmp_path / "file").write_text("not a directory")
    result = _train(tmp_path / "file" / "run", *ADDING, "--steps", "2", ranks=2)
    assert result.returncode != 0
    assert "Not a directory" in result.stderr
