from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it holds the reference data and fixtures; CI has it)")
    return SHARED


@pytest.fixture(scope="session")
def official_fixture(shared_dir):
    path = shared_dir / "fixtures" / "official_ovenet_ocr_tiny.pt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return torch.load(path, weights_only=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, OpenMP threads waiting on each other make
    tiny models 10-30x slower; one thread keeps such tests fast everywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _onnx_cache(tmp_path_factory, monkeypatch):
    """ONNX exports that `ovenet predict` caches go to a folder of the test session, never the user's home."""
    monkeypatch.setenv("OVENET_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ovenet_cache"))
