"""The `mode` fixture, shared by tests/conftest.py and the on-device suite (which keeps that conftest out)."""
import mindspore as ms
import pytest


@pytest.fixture(params=["pynative", "graph"])
def mode(request):
    """Runs a test in PyNative mode and again in GRAPH_MODE (calls made through a compiled Cell)."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE if request.param == "pynative" else ms.GRAPH_MODE)
    yield request.param
    ms.set_context(mode=previous)
