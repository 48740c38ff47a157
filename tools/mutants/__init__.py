"""Mutant lists for tools/mutate.py, one module per op (named after it), each defining MUTANTS."""
from typing import NamedTuple


class Mutant(NamedTuple):
    id: str
    file: str  # path relative to the repository root
    original: str  # a fragment that occurs exactly once in the file (on one line)
    replacement: str
    backend: str  # "reference", "checks", "triton", "cpu" (C++ math or launcher), "cuda"
    kind: str  # "tie rule", "window radius", "dropped mask", "missing check", "swapped stride", "dropped gradient"
    note: str = ""
