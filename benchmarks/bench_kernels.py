"""Fused single-pass kernels vs the plain formula, native BCE and the bandwidth bound (see detloss_bench.kernels)."""
import sys

from detloss_bench.kernels import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
