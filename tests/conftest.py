"""Test session set-up.

Without a CUDA device, Triton kernels run on CPU tensors through Triton's interpreter, which
must be switched on before any kernel module is imported: hence here, before vsr_kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's on-disk caches key compiled graphs by the graph, not by the fake kernels the
# ops register: after a change to one, a cached graph would carry the old output strides.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
