"""YOLOv3Loss (darknet flavor), vectorized vs per-truth-loop ignore pass: time and peak memory (see detloss_bench.yolov3)."""
import sys

from detloss_bench.yolov3 import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
