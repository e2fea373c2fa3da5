"""Philox4x32-10 counter-based streams: known answers, independence of batching, normal statistics."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import box_muller_edge_words
from scipy import stats

from photosim.hardware import philox, rng

# Random123 (github.com/DEShawResearch/random123) tests/kat_vectors, the "philox4x32 7" and "philox4x32 10"
# lines: rounds, counter (4 words), key (2 words) -> output (4 words), all hex uint32.
KAT = """
7 00000000 00000000 00000000 00000000 00000000 00000000 5f6fb709 0d893f64 4f121f81 4f730a48
7 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff 5207ddc2 45165e59 4d8ee751 8c52f662
7 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0 4dfccaba 190a87f0 c47362ba b6b5242a
10 00000000 00000000 00000000 00000000 00000000 00000000 6627e8d5 e169c58d bc57ac4c 9b00dbd8
10 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff 408f276d 41c83b0e a20bc7c6 6d5451fd
10 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0 d16cfe09 94fdcceb 5001e420 24126ea1
"""


def kat_cases() -> list[tuple[int, list[int], list[int], list[int]]]:
    """(rounds, counter, key, expected) per line of KAT."""
    cases = []
    for line in KAT.strip().splitlines():
        rounds, *words = line.split()
        w = [int(x, 16) for x in words]
        cases.append((int(rounds), w[:4], w[4:6], w[6:]))
    return cases


def bits(counter: list[int], key: list[int], rounds: int, device: str = "cpu") -> list[int]:
    out = philox.philox4x32(tuple(torch.tensor([c], device=device) for c in counter), (key[0], key[1]), rounds)
    return [int(o) for o in out]


@pytest.mark.parametrize(("rounds", "counter", "key", "expected"), kat_cases())
def test_known_answers(rounds: int, counter: list[int], key: list[int], expected: list[int]) -> None:
    assert bits(counter, key, rounds) == expected


def test_vectorised_equals_one_counter_at_a_time() -> None:
    g = torch.Generator().manual_seed(0)
    words = [torch.randint(0, 2 ** 32, (20,), generator=g, dtype=torch.int64) for _ in range(4)]
    out = torch.stack(philox.philox4x32(tuple(words), (0x12345678, 0x9ABCDEF0)), dim=1)
    for n in range(20):
        assert out[n].tolist() == bits([int(w[n]) for w in words], [0x12345678, 0x9ABCDEF0], 10)


def test_derive_key_separates_tuples() -> None:
    keys = {philox.derive_key(s, r, e, layer) for s in range(3) for r in range(3) for e in range(1, 6)
            for layer in range(4)}
    assert len(keys) == 3 * 3 * 5 * 4
    assert all(0 <= k < 2 ** 32 for pair in keys for k in pair)


def test_batch_chunk_and_sub_batch_do_not_change_a_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    draw = lambda ids: rng.normal_per_sample((3, 7), torch.tensor(ids), 4, 1, "output", 2)  # noqa: E731
    whole = draw(list(range(10)))
    assert torch.equal(whole, torch.cat([draw(list(range(5))), draw(list(range(5, 10)))]))
    assert torch.equal(whole[[7, 2]], draw([7, 2]))
    monkeypatch.setattr(philox, "CHUNK_BLOCKS", 3)  # passes that split samples and blocks anywhere
    assert torch.equal(whole, draw(list(range(10))))
    longer = rng.normal_per_sample((30,), torch.tensor([3]), 4, 1, "output", 2)
    assert torch.equal(longer[0, :21], whole[3].flatten())  # element j is the same whatever the shape


def test_per_chip_stream_is_its_own() -> None:
    chip = rng.normal((1000,), 0, 0, "output", 1)
    sample0 = rng.normal_per_sample((1000,), torch.tensor([0]), 0, 0, "output", 1)[0]
    assert chip.dtype == torch.float32 and not torch.equal(chip, sample0)
    assert torch.equal(chip, rng.normal((10, 100), 0, 0, "output", 1).flatten())


def test_normal_moments_ks_and_tails() -> None:
    n = 1_000_000
    z = philox.normal(philox.derive_key(7, 0, 3, 0), torch.tensor([11]), n)[0]
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    z = z.double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 5 * math.sqrt(0.5 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    p = 2 * stats.norm.sf(4.0)
    beyond = int((z.abs() > 4.0).sum())
    lo, hi = stats.binom.ppf([1e-4, 1 - 1e-4], n, p)
    assert lo <= beyond <= hi


def test_transform_is_box_muller_to_float32_rounding() -> None:
    w = torch.randint(0, 2 ** 32, (1_000_000,), generator=torch.Generator().manual_seed(3), dtype=torch.int64)
    u = (w.bitwise_right_shift(8) + 1).double() * 2.0 ** -24
    theta = w.double() * (2 * math.pi * 2.0 ** -32)
    torch.testing.assert_close(philox.radius(w).double(), (-2 * u.log()).sqrt(), rtol=0, atol=1e-6)
    cos, sin = philox.cos_sin(w)
    torch.testing.assert_close(cos.double(), theta.cos(), rtol=0, atol=3e-7)
    torch.testing.assert_close(sin.double(), theta.sin(), rtol=0, atol=3e-7)
    assert philox.radius(torch.tensor([2 ** 32 - 1])).item() == 0.0  # u = 1
    assert abs(philox.radius(torch.tensor([0])).item() - math.sqrt(48 * math.log(2))) < 1e-6  # u = 2^-24


def test_streams_of_different_keys_samples_and_lanes_are_uncorrelated() -> None:
    n = 400_000
    ids = torch.tensor([0, 1])
    base = rng.normal_per_sample((n,), ids, 0, 0, "output", 0)
    others = [base[1], rng.normal_per_sample((n,), ids, 1, 0, "output", 0)[0],
              rng.normal_per_sample((n,), ids, 0, 1, "output", 0)[0],
              rng.normal_per_sample((n,), ids, 0, 0, "shot", 0)[0],
              rng.normal_per_sample((n,), ids, 0, 0, "output", 1)[0], rng.normal((n,), 0, 0, "output", 0)]
    for other in others:
        assert abs(torch.corrcoef(torch.stack([base[0], other]))[0, 1].item()) < 5 / math.sqrt(n)
    lanes = base[0].view(-1, 4).T  # the four normals of one counter (the two Box-Muller pairs)
    corr = torch.corrcoef(lanes)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max().item() < 5 / math.sqrt(n / 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bits_and_normals_equal_cpu() -> None:
    for rounds, counter, key, expected in kat_cases():
        assert bits(counter, key, rounds, "cuda") == expected
    g = torch.Generator().manual_seed(1)
    words = tuple(torch.randint(0, 2 ** 32, (100_000,), generator=g, dtype=torch.int64) for _ in range(4))
    cpu = philox.philox4x32(words, (0xDEADBEEF, 0x01234567))
    gpu = philox.philox4x32(tuple(w.cuda() for w in words), (0xDEADBEEF, 0x01234567))
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu))
    ids = torch.tensor([0, 5, 2 ** 32 - 1])
    a = rng.normal_per_sample((50, 999), ids, 3, 2, "shot", 4, "cpu")
    b = rng.normal_per_sample((50, 999), ids, 3, 2, "shot", 4, "cuda")
    assert b.device.type == "cuda"
    assert torch.equal(b.cpu(), a)  # bit for bit: every operation of the transform is correctly rounded on both
    words = box_muller_edge_words()
    assert torch.equal(philox.radius(words.cuda()).cpu(), philox.radius(words))
    assert all(torch.equal(g.cpu(), c) for g, c in zip(philox.cos_sin(words.cuda()), philox.cos_sin(words)))
