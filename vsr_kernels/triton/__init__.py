"""Triton kernels: _launch.py holds the generic launch machinery, and one module per op
defines its kernels and registers its "vsr_kernels::<op>_triton" ops with torch.library.

Imported lazily, by vsr_kernels.ops._backend.op_for, which then registers the ops' fake
tensors and autograd from the op's OpSpec: vsr_kernels imports without Triton, and nothing
here imports vsr_kernels.ops.
"""
