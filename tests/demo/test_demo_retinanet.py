"""``detloss train --loss retinanet``: the demo's RetinaNet head, its decoding, a short training
(and SSD's, whose head and decoding are in test_demo_ssd.py).

The head's outputs are in torchvision's layout (per level, per location, per anchor), so the
loss and decode() read them as they read torchvision's RetinaNet."""
import json

import numpy as np
import pytest
import torch

from detloss.losses.retinanet import RetinaNetLoss
from detloss.tools.cli import main
from detloss.tools.demo.evaluate import decode
from detloss.tools.demo.models import Detector, head_shapes, retinanet_anchor_generator
from test_demo_train import FILES, TINY, _fixed_dataset


def test_head_outputs_and_anchors():
    m = Detector("retinanet", 3, 64).eval()
    cls, reg, anchors = head_shapes(m, batch=2)
    a = 9 * (8 * 8 + 4 * 4 + 2 * 2)
    assert cls == (2, a, 3) and reg == (2, a, 4) and anchors == (a, 4)
    loss = m.build_loss()
    assert isinstance(loss, RetinaNetLoss)
    gen = retinanet_anchor_generator(64)
    assert torch.equal(m(torch.zeros(1, 3, 64, 64))[2], gen([(8, 8), (4, 4), (2, 2)], (64, 64)))


def test_decode_reads_torchvision_layout():
    m = Detector("retinanet", 2, 64).eval()
    with torch.no_grad():
        cls, reg, anchors = m(torch.zeros(1, 3, 64, 64))
    cls, reg = torch.full_like(cls, -20.0), torch.zeros_like(reg)
    # the conv channel of anchor slot 4 at level 0, location (y 3, x 5), class 1: index (3 * 8 + 5) * 9 + 4
    k = (3 * 8 + 5) * 9 + 4
    cls[0, k, 1] = 20.0
    reg[0, k] = torch.tensor([0.5, 0.0, 0.0, 0.0])
    boxes, scores = decode("retinanet", (cls, reg, anchors), m.config)
    a = anchors[k]
    assert torch.allclose((a[:2] + a[2:]) / 2, torch.tensor([5 * 8.0, 3 * 8.0]))
    w = a[2] - a[0]
    assert torch.allclose(boxes[0, k], a + torch.tensor([0.5 * w, 0.0, 0.5 * w, 0.0]))
    assert torch.allclose(scores[0, k], torch.tensor([0.0, 1.0]), atol=1e-6)


@pytest.mark.parametrize("loss", ["retinanet", "ssd"])
def test_a_few_steps_write_every_output(tmp_path, loss):
    assert main(["train", *TINY, "--project", str(tmp_path), "--name", "r", "--loss", loss, "--steps", "3"]) == 0
    for f in FILES:
        assert (tmp_path / "r" / f).stat().st_size > 0, f
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["loss"] == loss and set(m["history"]) >= {"total", "cls", "box"}


@pytest.mark.parametrize("loss", ["retinanet", "ssd"])
def test_training_decreases_the_loss(tmp_path, loss):
    data = _fixed_dataset(tmp_path / "data")
    code = main(["train", *TINY, "--project", str(tmp_path), "--name", "r", "--loss", loss, "--data", str(data),
                 "--steps", "30", "--warmup", "3", "--lr", "1e-2"])
    assert code == 0
    h = json.loads((tmp_path / "r" / "metrics.json").read_text())["history"]
    for key in ("total", "cls", "box"):
        assert np.mean(h[key][-5:]) < 0.8 * np.mean(h[key][:5]), key
