"""Checks of a ``gpurnn train`` run before anything of it is allocated.

The layers check each forward's workspace against free memory (``gpurnn/engine/memory.py``),
but the parameters are allocated when the model is built, before any forward: a run asking for
``--hidden 1000000`` or ``--layers 1000000`` would otherwise allocate (or loop over) far more
than the machine has before failing.  ``check_run_fits`` refuses it up front with the sizes.
"""

from ..engine.drivers import CellSpec
from ..engine.memory import OutOfMemory, free_bytes
from ..kernels.storage import compute_dtype
from ..nn.model import default_embed_size
from ..nn.optim import OPTIMIZERS


def parameter_count(cell, hidden, layers, model_kwargs):
    """Parameters of the run's model: recurrent layers, embedding and head.  ``model_kwargs``:
    a task's ``model_kwargs()`` or those read from the data (input_size or vocab_size,
    output_size)."""
    G, H = CellSpec(cell).gates, hidden
    vocab = model_kwargs.get("vocab_size")
    embed = default_embed_size(H) if vocab is not None else 0
    inputs = embed if vocab is not None else model_kwargs["input_size"]
    recurrent = G * H * (inputs + H + 2) + (layers - 1) * G * H * (2 * H + 2)  # closed form:
    # a loop over a huge --layers would itself hang
    return recurrent + (vocab or 0) * embed + model_kwargs["output_size"] * (H + 1)


def check_run_fits(config, model_kwargs, backend):
    """Raise ``OutOfMemory`` when the model's parameters, gradients and optimiser buffers
    alone (plus the float64 draw of the largest weight at initialisation) exceed the free
    memory of ``backend``'s device."""
    count = parameter_count(config["cell"], config["hidden"], config["layers"], model_kwargs)
    item = compute_dtype(config["dtype"]).itemsize  # float32 masters under a 16-bit dtype
    copies = 2 + len(OPTIMIZERS[config["optimizer"]].slots)  # weights, gradients, buffers
    G, H = CellSpec(config["cell"]).gates, config["hidden"]
    need = count * item * copies + 8 * G * H * H
    free = free_bytes(backend)
    if free is not None and need > free:
        gib = 2.0 ** 30
        raise OutOfMemory(
            f"a {config['cell']} of hidden size {H} with {config['layers']} layer(s) has "
            f"{count} parameters: with gradients and {config['optimizer']} buffers about "
            f"{need / gib:.3g} GiB, but device '{backend.name}' has {free / gib:.3g} GiB free. "
            f"Lower --hidden or --layers.")
