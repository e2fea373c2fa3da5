"""torchao PT2E-quantized models imported with from_torch reproduce PyTorch's execution under `requant: pytorch`.

PyTorch runs a ``convert_pt2e`` graph on a CPU in one of two ways: lowered by torchao's
``lower_pt2e_quantized_to_x86`` to oneDNN's int8 kernels (``onednn.qconv_pointwise`` / ``qlinear_pointwise``, what
torch.compile runs), which the `pytorch` mode must match on every code; or as it is, dequantize -> float conv ->
quantize (the Q/DQ graph), whose float32 convolutions round differently from any integer kernel, so the test bounds
how many codes differ. The model is the built-in digits-cnn with its shipped weights, on seeded uniform images in the
digits' pixel range [0, 1) (sklearn's digits would add seconds of import for no other coverage).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import fx, nn
from typer.testing import CliRunner

from photosim.cli import app
from photosim.engine.executor import node_outputs, simulate_codes
from photosim.errors import PhotosimError
from photosim.frontend.models import load_model
from photosim.frontend.torch_import import from_torch
from photosim.ir.format import QuantizedModel, load

HW = {"requant": "pytorch"}
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """64 calibration and 256 test images of digits-cnn's input shape."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(64, *SHAPE, generator=g), torch.rand(256, *SHAPE, generator=g)


def x86_default() -> object:
    """X86InductorQuantizer with its default config: uint8 activations, symmetric per-channel int8 weights."""
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    return x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())


def x86_quantizer() -> object:
    """X86InductorQuantizer's default config, with the model output quantized too."""
    from photosim.frontend.pt2e_import import with_quantized_output

    return with_quantized_output(x86_default())


def xnnpack_quantizer() -> object:
    """torchao's copy of ExecuTorch's XNNPACKQuantizer: int8 activations, symmetric per-channel weights."""
    xnnpack = pytest.importorskip("torchao.testing.pt2e._xnnpack_quantizer")
    return xnnpack.XNNPACKQuantizer().set_global(xnnpack.get_symmetric_quantization_config(is_per_channel=True))


QUANTIZERS: dict[str, Callable[[], object]] = {"x86": x86_quantizer, "xnnpack": xnnpack_quantizer}


def pt2e(model: nn.Module, quantizer: object, calibration: torch.Tensor) -> fx.GraphModule:
    """export (batch size free), prepare_pt2e, calibrate, convert_pt2e."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batch = {0: torch.export.Dim("batch")}
    exported = torch.export.export(model.eval(), (calibration[:2],), dynamic_shapes=(batch,)).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        prepared(calibration)
    return convert_pt2e(prepared)


@pytest.fixture(scope="module")
def converted(digits: tuple[torch.Tensor, torch.Tensor]) -> Callable[[str], fx.GraphModule]:
    """digits-cnn quantized with a named quantizer (each built once)."""
    pytest.importorskip("torchao")
    cache: dict[str, fx.GraphModule] = {}

    def get(quantizer: str) -> fx.GraphModule:
        if quantizer not in cache:
            cache[quantizer] = pt2e(load_model("digits-cnn").module, QUANTIZERS[quantizer](), digits[0])
        return cache[quantizer]

    return get


def lowered_codes(gm: fx.GraphModule, x: torch.Tensor) -> list[torch.Tensor]:
    """Output codes of each oneDNN int8 conv / linear of the X86 lowering, in execution order."""
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

    lowered = lower_pt2e_quantized_to_x86(copy.deepcopy(gm), (x,))
    for node in lowered.graph.nodes:  # the int8 convs write channels_last, which a view cannot flatten eagerly
        if node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    lowered.recompile()
    codes: list[torch.Tensor] = []

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            result = super().run_node(n)
            if n.op == "call_function" and n.target in (torch.ops.onednn.qconv_pointwise.default,
                                                        torch.ops.onednn.qlinear_pointwise.default):
                codes.append(result.int())
            return result

    with torch.no_grad():
        Recorder(lowered).run(x)
    return codes


def qdq_values(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every node's result when PyTorch runs the Q/DQ graph as it is."""
    values: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            values[n.name] = result = super().run_node(n)
            return result

    with torch.no_grad():
        Recorder(gm).run(x)
    return values


def qdq_codes(qm: QuantizedModel, gm: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The Q/DQ graph's codes of every imported node (provenance.pt2e_nodes names the fx node holding them; a
    dequantized result, such as a flatten's, is quantized back with the node's own scale, which is exact)."""
    values = qdq_values(gm, x)
    codes = {}
    for name, source in qm.provenance["pt2e_nodes"].items():
        value = values[source]
        codes[name] = qm.node(name).output_q.quantize(value) if value.is_floating_point() else value.int()
    return codes


def test_x86_digits_cnn_is_bit_exact_against_pytorch_int8_kernels(converted: Callable[[str], fx.GraphModule],
                                                                   digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x = digits[1]
    gm = converted("x86")
    qm = from_torch(gm, SHAPE, name="digits-cnn")
    theirs = lowered_codes(gm, x)
    weighted = [n.name for n in qm.nodes if n.op in ("conv2d", "linear")]
    assert weighted == ["conv1", "conv2", "fc1", "fc2"] and len(theirs) == len(weighted)
    ours, floats = node_outputs(qm, x, HW), node_outputs(qm, x, {"requant": "float"})
    for name, codes in zip(weighted, theirs):
        diff = int((ours[name] != codes).sum())
        assert diff == 0, f"node {name}: {diff} of {codes.numel()} codes differ from PyTorch's int8 kernel"
    assert torch.equal(simulate_codes(qm, x, HW), theirs[-1])
    # the comparison discriminates: photosim's own float64 requantization lands elsewhere on some codes
    assert any(not torch.equal(floats[name], codes) for name, codes in zip(weighted, theirs))


@pytest.mark.parametrize("quantizer", list(QUANTIZERS))
def test_qdq_graph_agrees_but_for_its_float32_convolutions(quantizer: str, converted: Callable[[str], fx.GraphModule],
                                                           digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The Q/DQ graph convolves dequantized float32 values in float32: a sum rounded near a code's rounding tie
    can land on the other code. Measured with torch 2.14 on an AVX512-VNNI CPU: no code differs on these images; on
    the 360 digits test images 7 of 383,760 do under X86 (one conv2 code and its consequences), none under XNNPACK.
    photosim's float64 `float` mode misses the bound: 0.2% of the codes differ."""
    x = digits[1]
    gm = converted(quantizer)
    qm = from_torch(gm, SHAPE)
    ours, theirs = node_outputs(qm, x, HW), qdq_codes(qm, gm, x)
    assert set(theirs) == {n.name for n in qm.nodes}
    total = sum(codes.numel() for codes in theirs.values())
    differ = sum(int((ours[name] != codes).sum()) for name, codes in theirs.items())
    assert differ <= total * 1e-4, f"{differ} of {total} codes differ from the Q/DQ graph"
    floats = node_outputs(qm, x, {"requant": "float"})
    assert sum(int((floats[name] != codes).sum()) for name, codes in theirs.items()) > total * 1e-4
    assert max(int((ours[name] - codes).abs().max()) for name, codes in theirs.items()) <= 1
    logits = qdq_values(gm, x)[next(n.name for n in gm.graph.nodes if n.op == "output")]
    assert torch.equal(simulate_codes(qm, x, HW).argmax(1), logits[0].argmax(1))
    assert qm.input_q.signed == (quantizer == "xnnpack")  # XNNPACK's int8 activations, X86's uint8


def test_imported_model_survives_save_load_and_export(converted: Callable[[str], fx.GraphModule],
                                                      digits: tuple[torch.Tensor, torch.Tensor],
                                                      tmp_path: Path) -> None:
    x = digits[1][:64]
    gm = converted("xnnpack")
    qm = from_torch(gm, SHAPE, name="digits-cnn")
    conv = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.conv2d.default)[0]
    weight = conv.args[1]  # dequantize_per_channel(int8 codes, scales, zero points, axis, ...)
    assert torch.equal(qm.tensors["conv1.weight"], getattr(gm, weight.args[0].target))
    assert torch.equal(qm.tensors["conv1.weight_scale"], getattr(gm, weight.args[1].target).float())
    assert torch.equal(qm.tensors["conv1.bias_float"], gm.conv1.bias)
    assert qm.provenance["source"] == "torchao.pt2e" and qm.provenance["qengine"] == "onednn"
    qm.save(tmp_path / "m.safetensors")
    assert torch.equal(simulate_codes(load(tmp_path / "m.safetensors"), x, HW), simulate_codes(qm, x, HW))
    program = from_torch(torch.export.export(gm, (x,)), SHAPE)  # an ExportedProgram of the converted graph
    assert torch.equal(simulate_codes(program, x, HW), simulate_codes(qm, x, HW))


class Unsupported(nn.Module):
    """A conv + add, which X86InductorQuantizer fuses (leaving the conv's output in float), and a sigmoid no
    quantizer here quantizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        return self.fc(torch.flatten(torch.sigmoid(torch.relu(self.conv2(y) + y)), 1))


def test_unsupported_nodes_are_all_refused_by_name(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    pytest.importorskip("torchao")
    gm = pt2e(Unsupported(), x86_quantizer(), digits[0][:16])
    with pytest.raises(PhotosimError, match=r"2 operation\(s\).*add \(aten\.add, adds the unquantized float result "
                                            r"of conv2d_1.*; sigmoid \(aten\.sigmoid\)\. Supported"):
        from_torch(gm, SHAPE)


def test_a_float_model_output_is_refused_with_the_fix(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    pytest.importorskip("torchao")
    gm = pt2e(load_model("digits-cnn").module, x86_default(), digits[0][:16])
    with pytest.raises(PhotosimError, match=r"linear_1 \(aten\.linear, its float result is the model output.*"
                                            r"with_quantized_output"):
        from_torch(gm, SHAPE)


SCRIPT = """
import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

from photosim.frontend.pt2e_import import with_quantized_output


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 10))
    x = torch.randn(8, 1, 8, 8)
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model.eval(), (x,)).module(), with_quantized_output(quantizer))
    prepared(x)
    return convert_pt2e(prepared), (1, 8, 8)
"""


def test_import_torch_command_takes_a_pt2e_script(tmp_path: Path) -> None:
    pytest.importorskip("torchao")
    script = tmp_path / "build_pt2e.py"
    script.write_text(SCRIPT)
    result = CliRunner().invoke(app, ["import-torch", f"{script}:build", "-o", str(tmp_path / "q.safetensors")])
    assert result.exit_code == 0, result.output
    assert [n.op for n in load(tmp_path / "q.safetensors").nodes] == ["conv2d", "flatten", "linear"]


def test_import_torch_without_torchao_exits_2_with_the_install_command(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for module in [name for name in sys.modules if name.split(".")[0] == "torchao"] + ["torchao"]:
        monkeypatch.setitem(sys.modules, module, None)  # importing torchao now fails as if it were not installed
    script = tmp_path / "needs_torchao.py"
    script.write_text(SCRIPT)
    result = CliRunner().invoke(app, ["import-torch", f"{script}:build", "-o", str(tmp_path / "q.safetensors")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "not installed; pip install 'photosim[torchao]'" in " ".join(result.output.split())
    assert f"{script}, line 3" in " ".join(result.output.split())
