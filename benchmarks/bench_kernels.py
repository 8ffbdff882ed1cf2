"""Fused single-pass kernels vs the plain formula, native BCE and the bandwidth bound (see detloss.bench.kernels)."""
import sys

from detloss.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
