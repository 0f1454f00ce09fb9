"""Accelerate keeps process-global state (mixed precision, the process group): each in-process run needs its own."""

import pytest
from accelerate.state import AcceleratorState, GradientState


def reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Autouse in every test module that imports it: a fresh Accelerate state before and after each test."""
    reset_accelerate()
    yield
    reset_accelerate()
