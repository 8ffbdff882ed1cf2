"""Suite-wide settings: one intra-op thread, so many small tensor ops don't pay thread wake-ups
(results do not depend on it) and the suite stays fast on a 2-core machine."""
import torch

torch.set_num_threads(1)
