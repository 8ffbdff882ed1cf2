"""``detloss train --loss ssd``: the demo's SSD head (torchvision's SSDHead layout, a background
column) and its decoding without that column (the short trainings: test_demo_retinanet.py)."""
import torch

from detloss.losses.ssd import SSDLoss
from detloss.tools.demo.evaluate import decode
from detloss.tools.demo.models import Detector, head_shapes, ssd_default_box_generator


def test_head_outputs_default_boxes_and_the_background_column():
    m = Detector("ssd", 3, 64).eval()
    cls, reg, anchors = head_shapes(m, batch=2)
    a = 6 * (8 * 8 + 4 * 4 + 2 * 2)
    assert cls == (2, a, 4) and reg == (2, a, 4) and anchors == (a, 4)  # 3 classes + background
    loss = m.build_loss()
    assert isinstance(loss, SSDLoss) and loss.num_classes == 4
    gen = ssd_default_box_generator()
    with torch.no_grad():
        logits, _, boxes = m(torch.zeros(1, 3, 64, 64))
    assert torch.equal(boxes, gen([(8, 8), (4, 4), (2, 2)], (64, 64)))
    # The background starts at 1 - 0.01 of the softmax, the classes share the rest.
    p = torch.softmax(logits, -1)
    assert torch.allclose(p[..., 0].mean(), torch.tensor(0.99), atol=0.02)


def test_decode_drops_the_background_column():
    m = Detector("ssd", 2, 64).eval()
    with torch.no_grad():
        cls, reg, anchors = m(torch.zeros(1, 3, 64, 64))
    cls = torch.full_like(cls, -20.0)
    cls[0, :, 0] = 20.0  # background everywhere ...
    cls[0, 7] = torch.tensor([-20.0, -20.0, 20.0])  # ... but default box 7 is class 1
    boxes, scores = decode("ssd", (cls, torch.zeros_like(reg), anchors), m.config)
    assert scores.shape == (1, anchors.shape[0], 2)
    assert torch.allclose(scores[0, 7], torch.tensor([0.0, 1.0]), atol=1e-6)
    assert scores[0, :7].max() < 1e-6 and torch.allclose(boxes[0], anchors)

