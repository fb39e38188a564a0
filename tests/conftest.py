"""Fixtures shared by the tests. Helpers that tests import are in tests/helpers/, by purpose."""

import pytest


@pytest.fixture
def one_thread():
    """Tiny convolutions run faster on one thread than on two shared cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
