"""Serve one TVM Relax VM module to ``partc.runtime.emulate``: run by path by the target's own Python under qemu-user.

It imports only the standard library, numpy and tvm (the target's Python has no partc and no torch).
``python emulated_runner.py MODULE.so FOLDER`` loads the module and prints ``ready``; then for
each line on stdin it reads ``FOLDER/in.npz`` (the inputs as ``arr_0``, ``arr_1``, ... in the
module's order), calls ``main``, writes the outputs in order to ``FOLDER/out.npz`` and prints
``ok``, or ``error: <one line>`` if the call failed. It ends with stdin. Anything else written
to stdout (by tvm, say) goes to stderr, so these lines are all that stdout carries.
"""

import os
import sys

import numpy as np
import tvm
from tvm import relax


def serve(module: str, folder: str) -> None:
    """Load ``module`` and answer requests on stdin, through files in ``folder``, until it closes."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    main = relax.VirtualMachine(tvm.runtime.load_module(module), tvm.cpu())["main"]
    print("ready", file=replies, flush=True)
    for _ in sys.stdin:
        try:
            with np.load(os.path.join(folder, "in.npz")) as arrays:
                args = [tvm.runtime.tensor(np.ascontiguousarray(arrays[f"arr_{i}"])) for i in range(len(arrays.files))]
            result = main(*args)
            values = [result] if hasattr(result, "numpy") else list(result)
            np.savez(os.path.join(folder, "out.npz"), *[v.numpy() for v in values])
            reply = "ok"
        except Exception as err:  # the caller raises it
            text = str(err).strip()
            reply = f"error: {type(err).__name__}: {text.splitlines()[0] if text else ''}"
        print(reply, file=replies, flush=True)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
