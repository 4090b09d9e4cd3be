import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/models.py, importable as `models`
torch.set_num_threads(2)
