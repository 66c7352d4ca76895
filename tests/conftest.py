"""Make the repository root importable and keep torch to the machine's cores."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(min(2, torch.get_num_threads()))
