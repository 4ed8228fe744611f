from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny built-in synthetic dataset (car only), generated once per test session."""
    from nvsm.data.synth import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    generate_synthetic_dataset(root, size={"car": (6, 4)}, seed=0, categories=("car",))
    return root
