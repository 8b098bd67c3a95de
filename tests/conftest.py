"""Test session setup: JAX on CPU with 8 virtual devices, exact f32 matmuls, shared fixtures.

GPU tests (marker `gpu`) are deselected by default; run them on a GPU machine with
`JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu`.
"""

from __future__ import annotations

import os
import sys
import tempfile

# NOTE: these must be set before anything imports jax; an explicit JAX_PLATFORMS wins.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Engines in one test session share compiled steps through a fresh cache of their own: nothing
# is read from or written to ~/.cache, and no run depends on an earlier one.
os.environ.setdefault("INFERFLUX_CACHE_DIR", tempfile.mkdtemp(prefix="inferflux-test-cache-"))
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# NOTE: comparisons against torch need true f32 matmuls (TPU/GPU default to bf16 passes).
jax.config.update("jax_default_matmul_precision", "highest")

_torch_threads_set = False


def pytest_configure(config: pytest.Config) -> None:
    for marker in ("gpu: needs a CUDA GPU", "tpu: needs a TPU", "slow: slow test"):
        config.addinivalue_line("markers", marker)


def _has_platform(platform: str) -> bool:
    try:
        return bool(jax.devices(platform))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker in ("gpu", "tpu"):
        marked = [item for item in items if marker in item.keywords]
        if marked and not _has_platform(marker):
            skip = pytest.mark.skip(reason=f"no {marker.upper()} available")
            for item in marked:
                item.add_marker(skip)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # NOTE: torch is heavy and only some tests use it; cap its threads once it is imported.
    global _torch_threads_set
    if not _torch_threads_set and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(2)
        _torch_threads_set = True


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory `tiny_checkpoint(family, **kw) -> Path`: each distinct checkpoint built once.

    Keyword arguments are those of `tests.hf_fixtures.make_tiny_checkpoint`.
    """
    cache: dict[tuple[str, str], Path] = {}

    def make(family: str, **kwargs: Any) -> Path:
        from tests.hf_fixtures import make_tiny_checkpoint

        key = (family, repr(sorted(kwargs.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"ckpt-{family}")
            cache[key] = make_tiny_checkpoint(folder, family, **kwargs)
        return cache[key]

    return make
