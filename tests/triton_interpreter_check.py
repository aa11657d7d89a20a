"""Run the ``triton`` backend under triton's CPU interpreter and print one JSON line per case.

Started by ``tests/test_kernels_gpu.py`` in a subprocess with ``TRITON_INTERPRET=1``: triton
decides between compiling and interpreting when ``@triton.jit`` runs, i.e. when
``suite.kernels.triton_qgemm`` is imported, so the variable must be set before the process
imports it.

One shim: triton 3.8's interpreter stores bfloat16 as uint16 bit patterns and its ``tl.dot``
hands them to ``numpy.matmul`` unconverted (only fp8 operands are converted), so a bf16
``tl.dot`` returns garbage there. The shim converts bf16 operands to float32 first, which is
what the GPU's bf16 MMA computes (exact products, float32 accumulation). Nothing else in the
interpreter is patched; the kernel's own int -> bf16 conversion goes through float32 because
the interpreter's direct int -> bf16 cast is also a bit reinterpretation.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from gpu_cases import small_states
from triton.runtime import interpreter

from suite.kernels import gpu
from suite.kernels.packing import from_qstate


def _patch_bf16_dot() -> None:
    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # noqa: ANN001, ANN202
        def f32(h):  # noqa: ANN001, ANN202
            if h.dtype.scalar != interpreter.tl.bfloat16:
                return h
            data = interpreter._convert_float(h.data, h.dtype.scalar, interpreter.tl.float32,
                                              None).view(np.float32)
            return interpreter.TensorHandle(data, interpreter.tl.float32)

        return original(self, f32(a), f32(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot


def main() -> None:
    """Every small state x M in {1, 3, 5} x every activation dtype; one JSON line each."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    _patch_bf16_dot()
    gen = torch.Generator().manual_seed(0)
    for name, qs in small_states():
        w, weight = from_qstate(qs), qs.dequantize()
        for m in (1, 3, 5):
            for dtype in gpu.DTYPES:
                x = torch.randn(m, w.cols, generator=gen).to(dtype)
                err = gpu.check(w, "triton", x, weight)
                print(json.dumps({"case": f"{name}-M{m}-{str(dtype)[6:]}", "err": err,
                                  "tol": gpu.TOLERANCE[dtype]}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
