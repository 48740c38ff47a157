"""Autocast for the ops: the casts torch.autocast applies to its own ops, applied here before
the argument checks (the ops are custom ops, outside autocast's lists).

Inside an autocast region, floating-point inputs other than float64 run in one dtype: the
region's dtype on GPU (the kernels compute in float16/bfloat16 with float32 accumulation,
like autocast's matmuls), float32 on CPU. The CPU kernels take float16/bfloat16 too
(with float32 accumulation), but there half precision would only cost accuracy: they are
compute bound (each key element is used K*K times) and widen every half-precision element to
float32 before multiplying, so casting autocast's mixed inputs down would not make them
faster, while the argmax, which a rounding can flip, would be taken on rounded features.
Outside a region nothing is cast and
mixed dtypes are an error. Devices autocast does not know (meta) are left alone.
"""
import torch


def cast_inputs(*tensors: torch.Tensor) -> tuple:
    """`tensors`, cast to the dtype the enclosing autocast region asks for their device."""
    device_type = tensors[0].device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.float32 if device_type == "cpu" else torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)
