"""YOLOv5Loss vs the original ComputeLoss structure: time and peak memory (see detloss_bench.yolov5)."""
import sys

from detloss_bench.yolov5 import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
