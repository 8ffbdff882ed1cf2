"""Loading the reference cases copied into tests/data/<folder>/ (see each folder's manifest.json)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"


def case_names(folder: str, pattern: str = "c*.npz") -> List[str]:
    """The case files of one reference folder, sorted."""
    return sorted(p.name for p in (DATA / folder).glob(pattern))


def load_case(folder: str, name: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """A case's arrays as tensors (without its ``config`` and version strings) and its config."""
    d = np.load(DATA / folder / name)
    cfg = json.loads(str(d["config"]))
    return {k: torch.from_numpy(d[k]) for k in d.files if k != "config" and not k.endswith("version")}, cfg
