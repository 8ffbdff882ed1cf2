"""Suite-wide settings: one intra-op thread, so many small tensor ops don't pay thread wake-ups
(results do not depend on it) and the suite stays fast on a 2-core machine."""
import torch

torch.set_num_threads(1)

import os

# Fused kernels run their eager closed-form pass in tests unless a test asks for the compiled one
# (tests/kernels/test_compiled.py), so large inputs in other tests don't pay a compile.
os.environ.setdefault("DETLOSS_COMPILE", "0")
