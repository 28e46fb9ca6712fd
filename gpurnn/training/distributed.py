"""Data-parallel training over MPI: ``mpirun -n 4 gpurnn train ...``.

Every process (rank) builds the same model and draws the same global batch from the same data
stream; each trains on its own equal slice of it (``DataParallel.shard``).  After the backward,
the ranks' gradients are summed and scaled (``DataParallel.allreduce_grads``) so that every rank
holds the gradients of one process on the whole global batch; clipping and the optimiser step
then run identically everywhere.  So the run follows a single-process run with the same seed,
up to floating-point summation order.

The communicator (``world()``):

* a plain run: ``SingleProcess``, rank 0 of 1; mpi4py is never imported;
* under an MPI launcher (its environment variables present) with more than one process:
  ``MPIWorld`` over mpi4py's ``COMM_WORLD``.  NumPy buffers (the CPU backend, and the CUDA
  simulator) go through ``MPI_Allreduce``/``MPI_Bcast``; CuPy buffers (a real GPU) through NCCL
  (``cupy.cuda.nccl``), whose communicator is bootstrapped over MPI: rank 0 creates the unique
  id and broadcasts it.
"""
import dataclasses
import os
import sys
import time

import numpy as np

from ..engine.arrays import array_module, to_numpy

#: Environment variables an MPI launcher sets in the processes it starts: MPICH/Hydra and Intel
#: MPI (PMI_*), Open MPI (OMPI_COMM_WORLD_*), PMIx launchers such as Open MPI 5 and Slurm.
LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")

#: How long a failed rank waits for the others to fail alike before it aborts the job.
ERROR_WAIT_S = 10.0

_world = None


class SingleProcess:
    """The world of a plain run: rank 0 of 1, every collective the identity."""

    rank, size, local_rank, local_size = 0, 1, 0, 1

    @property
    def is_root(self):
        return self.rank == 0

    def allreduce_(self, buf):
        """Sum ``buf`` (a contiguous NumPy or CuPy array) over the ranks, in place."""
        return buf

    def broadcast_(self, buf, root=0):
        """Overwrite ``buf`` with rank ``root``'s, in place."""
        return buf

    def broadcast_object(self, obj, root=0):
        return obj

    def allgather_object(self, obj):
        return [obj]

    def end_after_error(self, code):
        """Called on an error: nothing to do for one process."""


class MPIWorld(SingleProcess):
    """The processes of ``COMM_WORLD`` (mpi4py).  ``local_rank``/``local_size``: this process's
    place among those on the same machine (which GPU it takes)."""

    def __init__(self, comm):
        from mpi4py import MPI

        self._mpi, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self._errors = comm.Dup()  # for failure agreement, apart from the work's collectives
        self._nccl = None
        previous = sys.excepthook

        def end_on_uncaught(kind, value, tb):
            previous(kind, value, tb)
            self.end_after_error(1)

        sys.excepthook = end_on_uncaught

    def allreduce_(self, buf):
        if isinstance(buf, np.ndarray):
            self.comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)
        else:
            self._nccl_comm().allreduce_(buf)
        return buf

    def broadcast_(self, buf, root=0):
        if isinstance(buf, np.ndarray):
            self.comm.Bcast(buf, root=root)
        else:
            self._nccl_comm().broadcast_(buf, root)
        return buf

    def broadcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def allgather_object(self, obj):
        return self.comm.allgather(obj)

    def end_after_error(self, code, wait_s=ERROR_WAIT_S):
        """After an error on this rank: return (to exit normally with ``code``) if every rank
        failed alike within ``wait_s`` seconds (a bad option, say: their messages then all
        reach the terminal), else abort the whole job.  Exiting alone would leave the others
        blocked in a collective for ever (checked with MPICH: they hang)."""
        agreed = self._errors.Ibarrier()
        deadline = time.monotonic() + wait_s
        while not agreed.Test():
            if time.monotonic() > deadline:
                sys.stdout.flush()
                sys.stderr.flush()
                self.comm.Abort(code)
                os._exit(code)  # MPI_Abort may return before the launcher ends this process
            time.sleep(0.01)

    def _nccl_comm(self):
        if self._nccl is None:
            self._nccl = NCCL(self)
        return self._nccl


class NCCL:
    """An NCCL communicator over the world's ranks, one GPU each (the current CuPy device),
    bootstrapped over MPI.  Collectives run on CuPy's current stream, in order with the
    gradient computation."""

    def __init__(self, world):
        import cupy
        from cupy.cuda import nccl

        if not nccl.available:
            raise RuntimeError("CuPy finds no NCCL library (cupy.cuda.nccl.available is "
                               "False), which training on several GPUs needs: install NCCL as "
                               "CuPy's installation guide says, or run with --device cpu")
        uid = nccl.get_unique_id() if world.rank == 0 else None
        uid = world.broadcast_object(uid, root=0)
        self._cupy, self._nccl = cupy, nccl
        self.comm = nccl.NcclCommunicator(world.size, uid, world.rank)
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                       np.dtype(np.float64): nccl.NCCL_FLOAT64}

    def _args(self, buf):
        if buf.dtype not in self._types or not buf.flags.c_contiguous:
            raise TypeError(f"NCCL collectives take contiguous float32/float64 CuPy arrays, got "
                            f"{buf.dtype} (contiguous: {buf.flags.c_contiguous})")
        return buf.size, self._types[buf.dtype]

    def allreduce_(self, buf):
        count, kind = self._args(buf)
        stream = self._cupy.cuda.get_current_stream().ptr
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, count, kind, self._nccl.NCCL_SUM, stream)

    def broadcast_(self, buf, root):
        count, kind = self._args(buf)
        self.comm.bcast(buf.data.ptr, count, kind, root, self._cupy.cuda.get_current_stream().ptr)


def launched_by_mpi(environ=None):
    """Whether an MPI launcher (mpirun, mpiexec, srun) started this process."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in LAUNCHER_VARS)


def world():
    """This process's world, made once: ``MPIWorld`` when an MPI launcher started more than one
    process, else ``SingleProcess`` (mpi4py is imported only under a launcher)."""
    global _world
    if _world is None:
        _world = _make_world()
    return _world


def _make_world():
    if not launched_by_mpi():
        return SingleProcess()
    if any(os.environ.get(name) == "1" for name in _SIZE_VARS):
        return SingleProcess()  # mpiexec -n 1: nothing to share
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError("started by an MPI launcher (one of " + ", ".join(LAUNCHER_VARS) +
                           " is set) but mpi4py is not installed: pip install "
                           "'gpurnn[mpi]'") from exc
    comm = MPI.COMM_WORLD
    return MPIWorld(comm) if comm.Get_size() > 1 else SingleProcess()


def end_after_error(code):
    """After an error: under MPI, see ``MPIWorld.end_after_error``; nothing in a plain run or
    before the world was made."""
    if _world is not None:
        _world.end_after_error(code)


def use_local_gpu(world, device):
    """Give each process on a machine its own GPU (local rank i takes GPU i) for CuPy and Numba;
    call before any model is made.  Nothing to do for ``device="cpu"``, one process, or when no
    real GPU is usable (then ``"auto"`` means the CPU, and ``"cuda"`` fails with the reason).
    Returns the GPU index or None."""
    if device == "cpu" or world.size == 1:
        return None
    from ..engine.backend import cuda_unavailable_reason

    if cuda_unavailable_reason() is not None:
        return None
    import cupy
    from numba import cuda

    count = cupy.cuda.runtime.getDeviceCount()
    if world.local_size > count:
        raise ValueError(f"{world.local_size} processes on this machine but {count} GPU(s): "
                         f"start at most one process per GPU, or give --device cpu")
    cupy.cuda.Device(world.local_rank).use()
    cuda.select_device(world.local_rank)
    return world.local_rank


class DataParallel:
    """Data-parallel training of one model over ``world``: each rank trains on its share
    ``global_batch // world.size`` of every global batch; ``allreduce_grads`` makes the
    gradients those of the whole batch.  ``global_batch`` must be a multiple of the ranks."""

    def __init__(self, world, global_batch):
        if global_batch % world.size:
            raise ValueError(f"the batch ({global_batch} sequences) is split evenly over the "
                             f"{world.size} processes: give a --batch that is a multiple of "
                             f"{world.size}")
        self.world = world
        self.global_batch = global_batch
        self.local_batch = global_batch // world.size
        self._flat = None  # [n + 2]: every gradient entry, then the loss and the weight

    def shard(self, batch, head):
        """This rank's slice of a global ``Batch`` (host arrays): sequences
        ``[rank * b, (rank + 1) * b)`` with ``b = local_batch``.  The batch axis is 1 of x
        ([T, B, I] or tokens [T, B]), 0 of lengths [B], and of target and mask 1 for
        ``head="all"`` ([T, B, ...]) and 0 for ``head="last"`` ([B, ...])."""
        B = batch.x.shape[1]
        if B != self.global_batch:
            raise ValueError(f"expected a global batch of {self.global_batch} sequences, got "
                             f"{B}")
        lo = self.world.rank * self.local_batch
        rows = slice(lo, lo + self.local_batch)
        target_axis = 1 if head == "all" else 0

        def take(a, axis):
            return None if a is None else np.ascontiguousarray(a[(slice(None),) * axis + (rows,)])

        return dataclasses.replace(batch, x=take(batch.x, 1), lengths=take(batch.lengths, 0),
                                   target=take(batch.target, target_axis),
                                   mask=take(batch.mask, target_axis))

    def allreduce_grads(self, grads, loss, batch, reduction):
        """Turn every rank's ``grads`` (dict name -> device array, of this rank's ``loss`` on
        its shard ``batch`` under ``reduction``) into those of the loss on the whole global
        batch, in place; return that loss.

        ``"sum"``: the global loss is the sum of the shards' losses, its gradient the sum of
        theirs.  ``"mean"``: the global loss is the sum over all valid positions divided by
        their global count N, while a shard's is divided by its own count n_r; so each rank
        weights its loss and gradients by n_r, they are summed, and divided by N.  Any clipping
        must come after this, on the summed gradients.  One message: gradients, loss and weight
        travel in one flat buffer (of the gradients' dtype)."""
        if reduction == "sum":
            weight = 1.0
        elif reduction == "mean":
            weight = self._positions(batch)
        else:
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        flat = self._pack(grads, weight)
        flat[-2] = loss * weight
        flat[-1] = weight
        self.world.allreduce_(flat)
        total_loss, total_weight = (float(v) for v in to_numpy(flat[-2:]))
        divisor = max(total_weight, 1.0) if reduction == "mean" else 1.0
        if divisor != 1.0:
            flat[:-2] *= flat.dtype.type(1.0 / divisor)
        self._unpack(grads)
        return total_loss / divisor

    def any(self, flag):
        """Whether ``flag`` holds on any rank.  Collective: every rank must call it."""
        return any(self.world.allgather_object(bool(flag)))

    @staticmethod
    def _positions(batch):
        """The shard's count of valid loss positions, up to a factor common to all ranks: the
        mask's sum, or without a mask the number of sequences (each then has the same number
        of positions: 1 for head "last", T for head "all")."""
        if batch.mask is not None:
            return float(np.count_nonzero(batch.mask))
        return float(batch.x.shape[1])

    def broadcast_start(self, model, rng):
        """Give every rank rank 0's weights and data stream ``rng``, so that all start alike
        even from different seeds; refuse ranks on different backends."""
        devices = self.world.allgather_object(model.device)
        if len(set(devices)) > 1:
            raise RuntimeError(f"the processes run on different devices {devices}: give them "
                               f"all the same --device (and each its own GPU)")
        self._pack(model.params, 1.0)
        self.world.broadcast_(self._flat)
        self._unpack(model.params)
        rng.bit_generator.state = self.world.broadcast_object(rng.bit_generator.state)

    def _pack(self, arrays, weight):
        """Copy ``weight * arrays`` (dict of device arrays) into the flat buffer."""
        first = next(iter(arrays.values()))
        n = sum(a.size for a in arrays.values())
        xp = array_module(first)
        if self._flat is None or self._flat.size != n + 2 or self._flat.dtype != first.dtype \
                or not isinstance(self._flat, xp.ndarray):
            self._flat = xp.empty(n + 2, dtype=first.dtype)
        offset = 0
        for a in arrays.values():
            part = self._flat[offset:offset + a.size]
            if weight == 1.0:
                part[...] = a.ravel()
            else:
                xp.multiply(a.ravel(), a.dtype.type(weight), out=part)
            offset += a.size
        return self._flat

    def _unpack(self, arrays):
        offset = 0
        for a in arrays.values():
            a[...] = self._flat[offset:offset + a.size].reshape(a.shape)
            offset += a.size


def data_parallel(global_batch, device):
    """``DataParallel`` over this process's world with its GPU chosen, or None in a plain run
    (which then runs exactly as without MPI)."""
    w = world()
    if w.size == 1:
        return None
    dp = DataParallel(w, global_batch)
    use_local_gpu(w, device)
    return dp
