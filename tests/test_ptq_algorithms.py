"""Error-correcting PTQ (issue 14): each algorithm lowers the error it targets; registry, config and auto rules."""

from __future__ import annotations

import pytest
import torch

from photosim.errors import PhotosimError
from photosim.frontend.algorithms import ALGORITHMS
from photosim.frontend.algorithms.equalization import equalizable_pairs, equalize, input_channel_index
from photosim.frontend.algorithms.gpfq import gpfq_round
from photosim.frontend.algorithms.gptq import gptq_round
from photosim.frontend.algorithms.layer import LayerGrams
from photosim.frontend.algorithms.registry import register_algorithm
from photosim.frontend.algorithms.selection import CANDIDATES, RECONSTRUCTION_CANDIDATES, label
from photosim.frontend.capture import capture
from photosim.frontend.data import load_dataset
from photosim.frontend.models import load_model
from photosim.frontend.ptq import quantize
from photosim.frontend.qconfig import QuantSpec
from photosim.ir.fakequant import dequantized_params, fake_quant_forward, fake_quantize, run_node
from photosim.ir.format import QuantizedModel
from photosim.ir.observers import quantize_weight, weight_scale
from photosim.ir.ops import OPS


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.stack([x for x, _ in load_dataset("digits", "calibration")])


def layer_errors(model: torch.nn.Module, qm: QuantizedModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per conv/linear layer: float output (float model) minus quantized output (quantized model), both before
    the fused activation, on ``x``: (N, O, ...) float64."""
    graph = capture(model, x[:1])
    floats: dict[str, torch.Tensor] = {}
    graph.run(x, lambda name, y: floats.__setitem__(name, y.double()))
    quants = {"input": fake_quantize(x.double(), qm.input_q)}
    for node in qm.nodes:
        quants[node.name] = run_node(qm, node, *(quants[i] for i in node.inputs))
    errors = {}
    for fnode in (n for n in graph.nodes if OPS[n.op].weighted):
        weight, bias = dequantized_params(qm, qm.node(fnode.name))
        op = OPS[fnode.op]
        y_float = op.reference(fnode.attrs, [floats[fnode.inputs[0]]], fnode.weight.double(), fnode.bias.double())
        errors[fnode.name] = y_float - op.reference(fnode.attrs, [quants[fnode.inputs[0]]], weight, bias)
    return errors


def relative_mse(errors: dict[str, torch.Tensor], model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    graph = capture(model, x[:1])
    outputs: dict[str, torch.Tensor] = {}
    graph.run(x, lambda name, y: outputs.__setitem__(name, y.double()))
    return {name: float(e.pow(2).mean() / outputs[name].pow(2).mean().clamp(min=1e-12)) for name, e in errors.items()}


def correlated_layer(seed: int, rows: int = 16, features: int = 64, samples: int = 512) -> tuple[torch.Tensor, ...]:
    """A random linear layer and inputs with correlated features (where error feedback pays)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, features, generator=gen, dtype=torch.float64)
    x = torch.randn(samples, features, generator=gen, dtype=torch.float64) @ torch.randn(
        features, features, generator=gen, dtype=torch.float64)
    scale = weight_scale(w, 3, True, "minmax").double()
    return w, x, scale


@pytest.mark.parametrize("rounding", [gptq_round, gpfq_round])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_and_gpfq_beat_round_to_nearest_on_a_random_linear_layer(rounding, seed: int) -> None:
    w, x, scale = correlated_layer(seed)
    gram = x.T @ x
    codes = rounding(w, scale, 3, LayerGrams(gram, gram))
    nearest = quantize_weight(w, scale, 3).double()
    assert codes.abs().max() <= 3 and torch.equal(codes, codes.round())  # 3-bit narrow-range codes

    def output_mse(c: torch.Tensor) -> float:
        return float(((w - c * scale[:, None]) @ x.T).pow(2).mean())

    assert output_mse(codes) < 0.7 * output_mse(nearest)


def test_gpfq_corrects_the_error_of_the_quantized_prefix() -> None:
    """GPFQ fits Q x_q to the float W x; GPTQ fits it to W x_q. When the prefix shrinks the inputs by 10%, only
    GPFQ's outputs follow the float model's."""
    w, x, scale = correlated_layer(3)
    xq = 0.9 * x
    grams = LayerGrams(xq.T @ xq, xq.T @ x)

    def mse(c: torch.Tensor) -> float:
        return float((x @ w.T - xq @ (c * scale[:, None]).T).pow(2).mean())

    assert mse(gpfq_round(w, scale, 3, grams)) < mse(gptq_round(w, scale, 3, grams))


@pytest.mark.parametrize("name", ["digits-cnn", "digits-resnet"])
@pytest.mark.parametrize("algorithm", ["gptq", "gpfq", "bias_correction"])
def test_algorithms_lower_every_layer_output_error(calibration: torch.Tensor, name: str, algorithm: str) -> None:
    model = load_model(name).module
    spec = {"w_bits": 3, "a_bits": 3}
    plain = relative_mse(layer_errors(model, quantize(model, calibration, spec), calibration), model, calibration)
    qm = quantize(model, calibration, {**spec, "ptq": algorithm})
    better = relative_mse(layer_errors(model, qm, calibration), model, calibration)
    assert all(better[layer] < plain[layer] for layer in plain), (plain, better)
    assert sum(better.values()) < 0.85 * sum(plain.values())


def test_bias_correction_makes_the_mean_error_zero(calibration: torch.Tensor) -> None:
    model = load_model("digits-resnet").module
    plain = quantize(model, calibration, {"w_bits": 4, "a_bits": 4})
    qm = quantize(model, calibration, {"w_bits": 4, "a_bits": 4, "ptq": "bias_correction"})
    for name, error in layer_errors(model, qm, calibration).items():
        node = qm.node(name)
        bias_step = node.input_q[0].scale * qm.tensors[f"{name}.weight_scale"].double()
        mean = error.transpose(0, 1).reshape(error.shape[1], -1).mean(dim=1)
        assert bool((mean.abs() <= bias_step / 2 + 1e-9).all()), name  # only the integer bias rounding is left
    before = layer_errors(model, plain, calibration)["fc"].mean(dim=0).abs().max()
    assert before > 0.3  # plain rounding leaves a large mean error in the logits


def test_equalization_keeps_the_function_and_equalizes_ranges(calibration: torch.Tensor) -> None:
    for name in ("digits-cnn", "digits-resnet"):
        graph = capture(load_model(name).module, calibration[:1])
        before = graph.run(calibration)
        equalize(graph)
        after = graph.run(calibration)
        assert float((after - before).abs().max()) < 1e-5 * float(before.abs().max())
        for pair in equalizable_pairs(graph):
            channels = pair.first.weight.shape[0]
            r1 = pair.first.weight.abs().reshape(channels, -1).amax(dim=1)
            index = input_channel_index(pair.second, channels).reshape(-1)
            r2 = torch.zeros(channels).scatter_reduce(0, index, pair.second.weight.abs().reshape(-1), "amax")
            torch.testing.assert_close(r1, r2, rtol=1e-4, atol=0)


def test_equalization_pairs_cross_pools_and_flatten_not_residuals(calibration: torch.Tensor) -> None:
    cnn = capture(load_model("digits-cnn").module, calibration[:1])
    assert [(p.first.name, p.second.name) for p in equalizable_pairs(cnn)] == [
        ("conv1", "conv2"), ("conv2", "fc1"), ("fc1", "fc2")]  # through max-pools and the flatten
    resnet = capture(load_model("digits-resnet").module, calibration[:1])
    assert [(p.first.name, p.second.name) for p in equalizable_pairs(resnet)] == [
        (f"layer{i}.0.conv1", f"layer{i}.0.conv2") for i in (1, 2, 3)]  # block outputs also feed the adds


def test_equalization_lowers_per_tensor_weight_error(calibration: torch.Tensor) -> None:
    """Per-tensor weight scales are where ranges that differ across channels hurt (Nagel et al. 2019, fig. 2)."""

    def weight_errors(graph) -> dict[str, float]:
        inputs: dict[str, torch.Tensor] = {}
        graph.run(calibration, lambda name, y: inputs.__setitem__(name, y.double()))
        errors = {}
        for node in (n for n in graph.nodes if OPS[n.op].weighted):
            scale = weight_scale(node.weight, 4, False, "minmax")
            rounded = quantize_weight(node.weight, scale, 4).double() * scale.double()
            x = inputs[node.inputs[0]]
            y = OPS[node.op].reference(node.attrs, [x], node.weight.double(), None)
            error = y - OPS[node.op].reference(node.attrs, [x], rounded, None)
            errors[node.name] = float(error.pow(2).mean() / y.pow(2).mean())
        return errors

    graph = capture(load_model("digits-resnet").module, calibration[:1])
    plain = weight_errors(graph)
    equalize(graph)
    equalized = weight_errors(graph)
    paired = {n for p in equalizable_pairs(graph) for n in (p.first.name, p.second.name)}
    assert all(equalized[name] < plain[name] for name in paired), (plain, equalized)


def test_auto_picks_the_candidate_closest_to_float_without_labels(calibration: torch.Tensor) -> None:
    model = load_model("digits-cnn").module
    qm = quantize(model, calibration, {"w_bits": 3, "a_bits": 3, "ptq": "auto"})  # images only: no labels given
    selection = qm.provenance["ptq_selection"]
    assert list(selection["candidates"]) == [label(c) for c in CANDIDATES + RECONSTRUCTION_CANDIDATES]  # 3 bits
    chosen = selection["candidates"][selection["chosen"]]
    assert all(chosen["kl"] <= score["kl"] for score in selection["candidates"].values())
    assert qm.provenance["quant_spec"]["ptq"] == [n for n in selection["chosen"].split(",") if n != "none"]
    again = quantize(model, calibration, QuantSpec.model_validate(qm.provenance["quant_spec"]))
    assert all(torch.equal(again.tensors[k], t) for k, t in qm.tensors.items())  # the recorded spec reproduces it
    plain = quantize(model, calibration, {"w_bits": 3, "a_bits": 3})
    reference = model(calibration).detach()
    error = {key: float((fake_quant_forward(m, calibration) - reference).pow(2).mean())
             for key, m in (("auto", qm), ("plain", plain))}
    assert error["auto"] < 0.5 * error["plain"]


def test_algorithm_names_are_checked() -> None:
    assert QuantSpec(ptq="equalize, gptq,bias_correction").ptq == ["equalize", "gptq", "bias_correction"]
    assert QuantSpec(ptq="none").ptq == [] and QuantSpec().ptq == []
    for bad, words in [("gptq,gpfq", "pick one"), ("auto,gptq", "alone"), ("gptq,gptq", "twice"),
                       ("optq", "unknown PTQ algorithm")]:
        with pytest.raises(PhotosimError, match=words):
            quantize(load_model("digits-cnn").module, torch.rand(4, 1, 8, 8), {"ptq": bad})


def test_registry_refuses_a_second_algorithm_of_one_name() -> None:
    for name in ("gptq", "auto"):
        with pytest.raises(ValueError, match="already registered"):
            register_algorithm(type(ALGORITHMS["gptq"])(name, "", ALGORITHMS["gptq"].round))
