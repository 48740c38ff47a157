"""Autocast for the ops: the casts torch.autocast applies to its own ops, applied here before
the argument checks (the ops are custom ops, outside autocast's lists).

Inside an autocast region, floating-point inputs other than float64 run in one dtype: the
region's dtype on GPU (the kernels compute in float16/bfloat16 with float32 accumulation,
like autocast's matmuls), float32 on CPU (the CPU kernels have no half-precision path).
Outside one, nothing is cast and mixed dtypes are an error.
"""
import torch


def cast_inputs(*tensors: torch.Tensor):
    """`tensors`, cast to the dtype the enclosing autocast region asks for their device."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.float32 if device_type == "cpu" else torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)
