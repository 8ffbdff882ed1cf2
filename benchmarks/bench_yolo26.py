"""YOLO26 detect loss, detloss's drop-in vs ultralytics' criterion: time and peak memory (see detloss_bench.yolo26)."""
import sys

from detloss_bench.yolo26 import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
