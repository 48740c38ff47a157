"""Prints which of the given distributions are not installed, so `make` installs only those."""
import importlib.metadata
import sys


def missing(names):
    out = []
    for name in names:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


if __name__ == "__main__":
    print(" ".join(missing(sys.argv[1:])))
