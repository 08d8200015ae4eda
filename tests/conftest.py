"""Shared pytest set-up: markers, thread pinning and the image-folder fixtures.

Markers (declared in pyproject.toml):

- ``gpu``: needs a CUDA device; skipped without one. ``pytest -m gpu`` selects exactly those
  tests (benchmarks/gpu_check.sh runs them on a lent GPU).
- ``ddp``: launches torchrun with 2 gloo processes. Every ``ddp`` test is also ``slow`` (three
  fresh interpreters, each importing torch: never under 10 s).
- ``slow``: over ~10 s on the 2-core CI box (a subprocess that imports torch costs ~8 s there).

``make test-fast`` runs ``pytest -m "not slow and not ddp"``; ``make test`` runs everything.
Tests are marked where they are written (a decorator or a module ``pytestmark``); here every
``ddp`` test is also marked ``slow``.

Fixtures: ``one_torch_thread_per_session`` (autouse), ``image_folder``, ``shared_images`` and
``tiny_profile``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("ddp") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread_per_session() -> Iterator[None]:
    """Tiny convolutions on a shared 2-core machine: a second intra-op thread only spins
    (measured: the standard-protocol linear test takes 20 s with 2 threads, 3 s with one).
    Subprocesses get the same through ``OMP_NUM_THREADS=1``; a test that needs another count
    sets it itself (test_demo_learns.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ImageFolder = Callable[..., Path]


@pytest.fixture
def image_folder(tmp_path: Path) -> ImageFolder:
    """``image_folder(name, n=48, classes=3, size=20)``: a new folder ``tmp_path/name`` of ``n``
    random-noise PNGs in ``classes`` class folders (``tests.image_helpers.noise_folder``), for a
    test that changes the folder it gets."""
    from tests.image_helpers import noise_folder

    def make(name: str = "images", **kw: int) -> Path:
        return noise_folder(tmp_path / name, **kw)

    return make


@pytest.fixture(scope="session")
def shared_images(tmp_path_factory: pytest.TempPathFactory) -> ImageFolder:
    """``shared_images(n=48, classes=3, size=20)``: the same folder as ``image_folder`` makes,
    built once per run for each set of arguments and shared by every test that asks for it.
    Read only: a test that adds, removes or damages files uses ``image_folder``."""
    from tests.image_helpers import noise_folder

    built: dict[tuple[tuple[str, int], ...], Path] = {}

    def get(**kw: int) -> Path:
        key = tuple(sorted(kw.items()))
        if key not in built:
            name = "images-" + "-".join(f"{k}{v}" for k, v in key) if key else "images"
            built[key] = noise_folder(tmp_path_factory.mktemp(name), **kw)
        return built[key]

    return get


@pytest.fixture
def tiny_profile(tmp_path: Path) -> Callable[..., Path]:
    """``tiny_profile(extra="")``: ``tmp_path/tiny.yaml``, the tiny resnet18 profile of the CLI
    tests (``tests.fault_helpers.TINY_PROFILE``) followed by ``extra`` YAML."""
    from tests.fault_helpers import TINY_PROFILE

    def write(extra: str = "", name: str = "tiny.yaml") -> Path:
        path = tmp_path / name
        path.write_text(TINY_PROFILE + extra)
        return path

    return write
