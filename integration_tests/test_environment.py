"""The integrations environment has the frameworks at the versions the reference data came from."""
import importlib.metadata as md


def test_framework_versions():
    assert md.version("torchvision") == "0.29.1"
    assert md.version("ultralytics") == "8.4.190"
    assert md.version("yolov5") == "7.0.14"
    import detloss  # from src/, on PYTHONPATH

    assert detloss.__version__
