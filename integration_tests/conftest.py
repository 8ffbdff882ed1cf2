"""Integration tests run in the second environment (``make test-integrations``): the real
frameworks (torchvision 0.29.1, ultralytics 8.4.190, yolov5 7.0.14) beside detloss from src/.

They are not part of ``make test``; a missing framework here is an error, not a skip.
"""
