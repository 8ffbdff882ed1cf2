"""The demo detector: synthetic data, a compact CNN per loss, training and COCO evaluation."""
