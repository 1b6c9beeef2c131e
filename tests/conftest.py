"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    "One torch thread while a module's tests run: tiny models gain nothing from a second thread, and on a shared CPU two threads can be many times slower."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
