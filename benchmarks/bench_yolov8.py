"""YOLOv8Loss, candidate-restricted vs dense assignment: time and peak memory (see detloss_bench.yolov8)."""
import sys

from detloss_bench.yolov8 import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
