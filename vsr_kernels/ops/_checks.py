"""Argument checks shared by every op: each failure names the argument, what was expected
and what was given, and is raised before any kernel runs."""
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value, dims: str) -> torch.Tensor:
    """`value` must be a floating-point tensor whose rank matches the letters of `dims`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({', '.join(dims)}), got {type(value).__name__}")
    if value.dim() != len(dims):
        raise ValueError(
            f"{name} must be {len(dims)}-D ({', '.join(dims)}), got {value.dim()}-D shape {tuple(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating-point dtype {FLOAT_DTYPES}, got {value.dtype}")
    return value


def same_size(name: str, value: torch.Tensor, dim: int, letter: str, ref_name: str, ref: torch.Tensor,
              ref_dim: int) -> None:
    if value.shape[dim] != ref.shape[ref_dim]:
        raise ValueError(
            f"{name} must have {letter} = {ref.shape[ref_dim]} (from {ref_name} of shape {tuple(ref.shape)}), "
            f"got shape {tuple(value.shape)}")


def same_dtype_and_device(tensors: dict) -> None:
    (first_name, first), *rest = tensors.items()
    for name, value in rest:
        if value.dtype != first.dtype:
            raise TypeError(f"{name} must have the dtype of {first_name} ({first.dtype}), got {value.dtype}")
        if value.device != first.device:
            raise ValueError(f"{name} must be on the device of {first_name} ({first.device}), got {value.device}")


def integer(name: str, value, minimum: int, odd: bool = False, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    kind = "an odd integer" if odd else "an integer"
    if value < minimum or (odd and value % 2 == 0):
        raise ValueError(f"{name} must be {kind} >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be {kind} <= {maximum} (the largest the kernels represent), "
                         f"got {value}")
    return int(value)


def square(name: str, value, minimum: int, maximum: int, odd: bool = False) -> int:
    """A window parameter given as an int or, like torchvision's, a pair of equal ints (the
    ops' windows are square): the int, checked like `integer`."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of equal ints, got {value!r}")
        first, second = (integer(name, v, minimum, odd, maximum) for v in value)
        if first != second:
            raise ValueError(f"{name} must be an int or a pair of equal ints (the window is square), "
                             f"got {value!r}")
        return first
    return integer(name, value, minimum, odd, maximum)


def real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value
