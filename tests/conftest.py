"""Make the repository root importable, keep torch to the machine's cores, and share the demo cache."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """The bundled demo's latent cache (1,797 digits at 16x16 in pixel space), extracted once for the whole
    session. Tests only read it."""
    from phases import extract
    from runtime.config import load_config

    path = tmp_path_factory.mktemp("digits") / "digits16.h5"
    extract.run(load_config(ROOT / "configs/demo/digits.yaml", [f"data.cache_path={path}"]))
    return path
