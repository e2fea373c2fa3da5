"""photosim.ir.ieee: division by a number and square root correctly rounded on every device, against Python's
math (IEEE 754 double operations) as the independent reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from photosim.ir import ieee

CUDA = torch.cuda.is_available()
finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)
divisors = st.floats(allow_nan=False, allow_infinity=False, min_value=1e-300, max_value=1e300)


@given(st.lists(finite, min_size=1, max_size=64), divisors)
def test_divide_is_the_ieee_quotient(values: list[float], divisor: float) -> None:
    got = ieee.divide(torch.tensor(values, dtype=torch.float64), divisor)
    assert got.tolist() == [v / divisor for v in values]  # Python's float division is IEEE's


def test_divide_keeps_torchs_result_dtype() -> None:
    assert ieee.divide(torch.tensor([3, 4]), 2.5).dtype == torch.result_type(torch.tensor([3]), 2.5)
    assert ieee.divide(torch.tensor([3.0]), 2).dtype == torch.float32
    assert ieee.divide(torch.tensor([1.0], dtype=torch.float32), 3.0).item() == np.float32(1.0) / np.float32(3.0)


def test_sqrt_is_correctly_rounded_where_torchs_cpu_sqrt_is_not() -> None:
    x = torch.rand(100_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e6
    expected = torch.tensor([math.sqrt(v) for v in x.tolist()], dtype=torch.float64)
    assert torch.equal(ieee.sqrt(x), expected)
    x32 = x.float()  # float32: the double square root rounded to float32 is the correctly rounded one
    assert torch.equal(ieee.sqrt(x32), torch.tensor([math.sqrt(v) for v in x32.tolist()]).float())
    print(f"torch's CPU sqrt misrounds {(torch.sqrt(x) != expected).sum().item()} of {len(x)} float64 values")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_divides_and_takes_roots_as_the_cpu() -> None:
    """On CUDA a tensor divided by a Python number is t * (1 / d), off by one ulp for some t; ieee's is not."""
    x = torch.rand(1_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e4
    for dtype in (torch.float32, torch.float64):
        t = x.to(dtype)
        assert torch.equal(ieee.divide(t.cuda(), 16448.503937007874).cpu(), t / 16448.503937007874)
        assert torch.equal(ieee.sqrt(t.cuda()).cpu(), ieee.sqrt(t))
    print(f"torch's CUDA t / d differs from the CPU's on {((x.cuda() / 3.7).cpu() != x / 3.7).sum().item()} of "
          f"{len(x)} float64 values")
