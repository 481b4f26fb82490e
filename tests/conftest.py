"""Shared test setup: offline/quiet env defaults, a small thread count, and a tiny shapes dataset fixture."""
from __future__ import annotations

import os

from kelix.env import apply_env_defaults

apply_env_defaults()

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A small shapes dataset (generated once per session) for stage and model tests."""
    from kelix.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, num_train=256, num_val=64, num_test=64, seed=0, image_size=64)
    return root


@pytest.fixture
def one_thread():
    """For tests of tiny tensors: a second intra-op thread only adds synchronisation (and stalls on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def runner_log():
    """The runners' log lines (outside a flow they log to `kelix.runners`; Prefect owns the root handlers)."""
    handler, logger = _Lines(), logging.getLogger("kelix.runners")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
