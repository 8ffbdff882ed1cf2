"""Run benchmark suites: ``python benchmarks/run.py SUITE|all [suite options]``."""
import argparse
import sys

from detloss_bench import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description="detloss benchmarks")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
