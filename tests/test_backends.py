"""Every registered execution backend gives the reference backend's codes, node for node, on a table of layers
and settings; the registry records its choices, and a required backend that cannot serve a layer is an error.

The reference is ``torch`` (with ``fbgemm`` for the layers whose PyTorch kernel saturates pair sums: only it
computes those, and tests/test_fbgemm_saturation.py checks it against PyTorch's own kernels). Triton's kernels run
under the interpreter on CPU tensors where there is no GPU (set before Triton is first imported).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import make_conv_net

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton fixes the mode of every kernel when it is imported

from photosim.engine import backends  # noqa: E402
from photosim.engine.executor import Engine, execution_plan  # noqa: E402
from photosim.errors import PhotosimError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REFERENCE = ["torch", "fbgemm"]
SETTINGS = {
    "ideal float": {"requant": "float"},
    "ideal fixedpoint": {"requant": "fixedpoint"},
    "ideal pytorch": {"requant": "pytorch"},
    "ideal pytorch, avx2 kernels": {"requant": "pytorch", "pytorch_cpu": "avx2"},
    "tiles, adc, saturating accumulator": {"tile": 8, "adc": {"bits": 6},
                                           "accumulator": {"bits": 12, "overflow": "saturate"}},
    "output and shot noise, adc 8": {"tile": 16, "adc": {"bits": 8},
                                     "noise": {"output": {"sigma": 0.01}, "shot": {"sigma": 0.005}}},
    "one tile, output noise, wrapping accumulator": {"noise": {"output": {"sigma": 0.02}},
                                                    "accumulator": {"bits": 10, "overflow": "wrap"}},
    "weight error": {"tile": 8, "noise": {"weight_static": {"sigma": 0.02}, "weight_read": {"sigma": 0.01}}},
    "per-layer: ideal fixedpoint fc": {"tile": 8, "adc": {"bits": 8}, "noise": {"output": {"sigma": 0.01}},
                                       "layers": [{"match": "fc", "requant": "fixedpoint", "tile": None,
                                                   "adc": {"bits": None}, "noise": {"output": {"sigma": 0}}}]},
}
CANDIDATES = [name for name in backends.BACKENDS if name not in REFERENCE]


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("backend", CANDIDATES)
def test_every_backend_gives_the_reference_codes(backend: str, setting: str) -> None:
    model = make_conv_net(seed=4)
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    hw = SETTINGS[setting]
    engine = Engine(model, hw, seed=7, device=DEVICE, backend=[backend, *REFERENCE])
    ran = [name for name, choice in engine.backends.items() if choice.backend == backend]
    if not ran:
        reasons = {name: choice.declined.get(backend) for name, choice in engine.backends.items()}
        pytest.skip(f"{backend} runs no layer here: {reasons}")
    reference = Engine(model, hw, seed=7, device=DEVICE, backend=REFERENCE)
    assert all(reference.backends[name].backend in REFERENCE for name in ran)
    got, want = engine.node_outputs(x, first_sample=3), reference.node_outputs(x, first_sample=3)
    assert [name for name in want if not torch.equal(got[name], want[name])] == []
    for name in set(ran) & set(engine.analog):
        mine, theirs = engine.analog[name].stats, reference.analog[name].stats
        assert (mine.clipped, mine.overflowed, mine.max_abs_acc) == (theirs.clipped, theirs.overflowed,
                                                                      theirs.max_abs_acc), name


@pytest.mark.skipif(DEVICE != "cpu", reason="which backends a CPU picks")
def test_a_cpu_picks_its_fast_backends_and_says_why_the_others_declined() -> None:
    model = make_conv_net(seed=4)
    ideal = Engine(model, {"requant": "float"}).backends
    assert ideal["conv1"].backend == "onednn" and ideal["fc"].backend == "torch"
    assert ideal["fc"].declined["onednn"] == "runs convolutions only"
    assert ideal["conv1"].declined["cuda-ideal"] == "runs on CUDA GPUs"
    analog = Engine(model, SETTINGS["output and shot noise, adc 8"]).backends
    assert {choice.backend for choice in analog.values()} == {"fused-cpu"}
    custom = Engine(model, {"tile": 8, "noise": {"custom": {"function": "math:fabs"}}}).backends
    assert {choice.backend for choice in custom.values()} == {"torch"}
    assert custom["conv1"].declined["fused-cpu"] == "custom noise functions run in torch"


def test_a_required_backend_that_cannot_serve_a_layer_is_an_error() -> None:
    model = make_conv_net(seed=4)
    with pytest.raises(PhotosimError, match="layer 'fc' cannot run on the required backend .onednn: runs "
                                            "convolutions only"):
        Engine(model, {"requant": "float"}, backend=["onednn"])
    with pytest.raises(PhotosimError, match="unknown backend.*nope.*torch"):
        Engine(model, None, backend=["nope"])
    forced = Engine(model, SETTINGS["weight error"], backend=["torch"]).backends
    assert {choice.backend for choice in forced.values()} == {"torch"} and not any(c.declined for c in forced.values())


def test_the_execution_plan_is_the_engines_choice() -> None:
    model = make_conv_net(seed=4)
    hw = SETTINGS["per-layer: ideal fixedpoint fc"]
    rows = {row["layer"]: row for row in execution_plan(model, hw, device=DEVICE)}
    engine = Engine(model, hw, device=DEVICE)
    assert {name: row["backend"] for name, row in rows.items()} == {n: c.backend for n, c in engine.backends.items()}
    assert rows["fc"]["kind"] == "ideal" and rows["conv1"]["kind"] == "analog" and rows["conv1"]["tile"] == 8


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU readout")
def test_a_numba_that_cannot_be_imported_leaves_the_readout_to_torch_with_one_warning(monkeypatch) -> None:
    """A GPU machine's numpy may be newer than numba supports: its import then fails, which must cost speed only."""
    real_import = backends.importlib.import_module

    def failing_import(name: str, *args: object) -> object:
        if name == "numba":
            raise ImportError("Numba needs NumPy 2.3 or less. Got NumPy 2.5.")
        return real_import(name, *args)

    monkeypatch.setattr(backends.importlib, "import_module", failing_import)
    backends.numba_problem.cache_clear()
    try:
        model = make_conv_net(seed=4)
        hw = SETTINGS["output and shot noise, adc 8"]
        with pytest.warns(UserWarning, match="numba cannot be imported .Numba needs NumPy 2.3 or less") as caught:
            engine = Engine(model, hw, seed=7)
        assert len(caught) == 1
        assert {choice.backend for choice in engine.backends.values()} == {"torch"}
        assert engine.backends["conv1"].declined["fused-cpu"].startswith("numba cannot be imported (Numba needs")
        x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
        reference = Engine(model, hw, seed=7, backend=["torch"])
        assert torch.equal(engine.codes(x), reference.codes(x))
    finally:
        backends.numba_problem.cache_clear()
