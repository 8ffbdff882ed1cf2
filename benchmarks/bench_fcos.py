"""FCOSLoss vs torchvision's dense FCOS matcher + head loss: time and peak memory (see detloss_bench.fcos)."""
import sys

from detloss_bench.fcos import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
