"""Execution backends: every way of running a conv/linear registers here and says what it supports.

The engine asks the registry once per layer (:func:`choose`): of the backends that serve the layer's kind (ideal:
exact accumulators; analog: the tile step of its readout), the first in order of preference whose
``supports(plan, device)`` gives no reason runs it, and the reasons of the faster ones that declined are kept
with the choice (``Engine.backends``; shown by ``photosim inspect --hw`` and ``run --layer-report``). Nothing
falls back silently: a user may require backends by name (``--backend``), and a layer they cannot serve is an
error that names the layer and their reasons. ``torch`` is the reference: it serves every plan but the one whose
semantics only another backend has (FBGEMM's saturating pair sums), and every other backend must compute its
codes bit for bit (tests/test_backends.py).

To add a backend: a class with ``name``, ``kinds``, ``priority``, ``supports`` and ``prepare`` (returning an object
with ``conv2d(x, sample_ids)`` and ``linear(x, sample_ids)``: input codes -> output codes), decorated with
:func:`register`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from photosim.engine import fbgemm, fused_triton, kernels, onednn
from photosim.engine.analog import AnalogLayer
from photosim.engine.plan import Kind, LayerPlan
from photosim.engine.requant import INT32_MAX, channel_view
from photosim.errors import PhotosimError
from photosim.hardware.noise import SIGNAL_NOISE_VARIANCE
from photosim.ir.ops import conv_output_size

SIGNAL_EFFECTS = frozenset(SIGNAL_NOISE_VARIANCE)  # photocurrent, rin: drawn in torch before any readout
KERNEL_TILE_NOISE = frozenset({"output", "shot"})  # the tile-noise effects the fused kernels draw in-kernel


class LayerRunner(Protocol):
    """A layer prepared by a backend on one device."""

    def conv2d(self, x: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """Input codes (N, C, H, W) -> output codes (N, O, OH, OW)."""
        ...

    def linear(self, x: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """Input codes (N, K) -> output codes (N, O)."""
        ...


class Backend:
    """One way of running a layer: its name, the layer kinds it serves, its preference, what it supports."""

    name: ClassVar[str]
    kinds: ClassVar[tuple[Kind, ...]]
    priority: ClassVar[int]  # lower is preferred where several backends support a layer
    on_request: ClassVar[tuple[str, ...]] = ()  # device types where it runs only when required by name

    def supports(self, plan: LayerPlan, device: torch.device) -> str | None:
        """None when this backend computes ``plan`` on ``device`` exactly as the reference does, else why not."""
        raise NotImplementedError

    def prepare(self, plan: LayerPlan, device: torch.device, *, diagnostics: bool = True) -> LayerRunner:
        """The layer ready to run (``diagnostics``: analog layers also measure their SNR)."""
        raise NotImplementedError


BACKENDS: dict[str, Backend] = {}  # name -> backend, in order of preference


def register(cls: type[Backend]) -> type[Backend]:
    """Add a backend to the registry (refused when its name is taken)."""
    if cls.name in BACKENDS:
        raise ValueError(f"backend {cls.name!r} is registered twice")
    BACKENDS[cls.name] = cls()
    ordered = sorted(BACKENDS.values(), key=lambda b: b.priority)
    BACKENDS.clear()
    BACKENDS.update((b.name, b) for b in ordered)
    return cls


@dataclass(frozen=True)
class Choice:
    """The backend chosen for a layer and why each preferred one declined it."""

    backend: str
    declined: dict[str, str] = field(default_factory=dict)  # backend -> reason, in order of preference

    def as_row(self) -> dict[str, str]:
        """The choice as report columns: ``backend`` and ``declined`` (``name: reason; ...``)."""
        return {"backend": self.backend, "declined": "; ".join(f"{n}: {why}" for n, why in self.declined.items())}


def check_names(names: Sequence[str]) -> None:
    """Refuse backend names that are not registered."""
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise PhotosimError(f"unknown backend(s) {', '.join(unknown)}; backends: {', '.join(BACKENDS)}.")


def choose(plan: LayerPlan, device: torch.device, required: Sequence[str] = ()) -> Choice:
    """The backend that runs ``plan`` on ``device``: the preferred one that supports it, among ``required`` where
    one of them serves the layer's kind (PhotosimError when none of those supports it)."""
    check_names(required)
    candidates = [b for b in BACKENDS.values() if plan.kind in b.kinds]
    forced = [b for b in candidates if b.name in required]
    declined = {}
    for backend in forced or candidates:
        reason = backend.supports(plan, device)
        if reason is None and not forced and device.type in backend.on_request:
            reason = f"runs on {device.type} only when required by name"
        if reason is None:
            return Choice(backend.name, declined)
        declined[backend.name] = reason
    reasons = "; ".join(f"{name}: {why}" for name, why in declined.items())
    if forced:
        raise PhotosimError(f"layer {plan.name!r} cannot run on the required backend ({reasons}); drop --backend, or "
                            "change the layer's hardware settings or the device.")
    raise PhotosimError(f"no backend runs layer {plan.name!r} ({reasons}).")


def requantize(acc: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """Exact accumulators of a conv/linear (int64, or float64 holding integers) -> output codes."""
    mode = plan.mode
    if mode.integer_bias:
        acc.add_(channel_view(plan.requant.bias, acc))  # acc is a fresh tensor
    if acc.is_floating_point() and not mode.float_accumulators:
        acc = acc.to(torch.int64)
    return mode.requantize(acc, plan.requant)


def _saturating_pairs(plan: LayerPlan) -> str | None:
    """The reason every backend but fbgemm gives for a layer whose PyTorch kernel saturates pair sums."""
    if plan.pair_saturation:
        return "PyTorch's FBGEMM kernel saturates this layer's pair sums in int16, which only fbgemm computes"
    return None


# -- ideal layers ------------------------------------------------------------------------------------------------


@dataclass
class ExactLayer:
    """An ideal layer on photosim.engine.kernels' exact matmuls (im2col for convs)."""

    plan: LayerPlan
    weights: kernels.IntegerWeights

    def conv_acc(self, x: torch.Tensor) -> torch.Tensor:
        kernel, stride, padding, dilation = self.plan.conv_geometry()
        return kernels.conv2d_acc(x, self.plan.z_in, self.weights, kernel, stride, padding, dilation,
                                  self.plan.groups)

    def conv2d(self, x: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        return requantize(self.conv_acc(x), self.plan)

    def linear(self, x: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        return requantize(kernels.linear_acc(x, self.plan.z_in, self.weights), self.plan)


def _exact_weights(plan: LayerPlan, device: torch.device) -> kernels.IntegerWeights:
    return kernels.prepare_weights(plan.weight, plan.groups, plan.matmul, device)


@register
class TorchBackend(Backend):
    """The reference: torch's exact integer matmuls; for analog layers the torch tile step (any device, every
    setting: weight error, custom noise, ADC calibration)."""

    name, kinds, priority = "torch", ("ideal", "analog"), 100

    def supports(self, plan: LayerPlan, device: torch.device) -> str | None:
        return _saturating_pairs(plan)

    def prepare(self, plan: LayerPlan, device: torch.device, *, diagnostics: bool = True) -> LayerRunner:
        if plan.readout is not None:
            return AnalogLayer.prepare(plan, device, "torch", diagnostics)
        return ExactLayer(plan, _exact_weights(plan, device))


@dataclass
class OneDNNLayer(ExactLayer):
    """A conv on oneDNN's int8 convolutions; a batch whose float32 sums reach 2^24 runs on the exact matmul
    (counted in ``exact_batches``)."""

    conv: onednn.OneDNNConv | None = None
    exact_batches: int = 0

    def conv_acc(self, x: torch.Tensor) -> torch.Tensor:
        acc = onednn.conv_acc(x, self.plan.z_in, self.conv)
        if acc is not None:
            return acc
        self.exact_batches += bool(len(x))
        return super().conv_acc(x)


@register
class OneDNNBackend(Backend):
    """Ideal convolutions on oneDNN's int8 kernels (x86 CPUs), exact by limbs (photosim.engine.onednn)."""

    name, kinds, priority = "onednn", ("ideal",), 30

    def supports(self, plan: LayerPlan, device: torch.device) -> str | None:
        if device.type != "cpu":
            return "runs on the CPU"
        if plan.node.op != "conv2d":
            return "runs convolutions only"
        return _saturating_pairs(plan) or onednn.unsupported(plan.weight, plan.x_range)

    def prepare(self, plan: LayerPlan, device: torch.device, *, diagnostics: bool = True) -> LayerRunner:
        _, stride, padding, dilation = plan.conv_geometry()
        conv = onednn.prepare_conv(plan.weight, plan.x_range, stride, padding, dilation, plan.groups)
        return OneDNNLayer(plan, _exact_weights(plan, device), conv)


@dataclass
class SaturatingLayer:
    """An ideal layer whose accumulators are FBGEMM's, saturated int16 pair sums included."""

    plan: LayerPlan
    weight: torch.Tensor  # the integer weight codes on the device

    def conv2d(self, x: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        plan, w = self.plan, self.weight
        (kh, kw), stride, padding, dilation = plan.conv_geometry()
        z_in, groups = plan.z_in, plan.groups
        if plan.requant.kernel == "fbgemm-depthwise":
            return requantize(fbgemm.depthwise_acc_saturating(x, w, z_in, stride, padding, dilation), plan)
        cols = fbgemm.im2col_codes(x, (kh, kw), z_in, stride, padding, dilation, groups)  # (G, N*OH*OW, K)
        w = w.view(groups, -1, w.shape[1], kh, kw).permute(0, 1, 3, 4, 2).reshape(groups, w.shape[0] // groups, -1)
        acc = torch.cat([fbgemm.gemm_acc_saturating(c, wg, z_in) for c, wg in zip(cols, w)], dim=1)  # (N*OH*OW, O)
        oh, ow = (conv_output_size(*args) for args in zip(x.shape[2:], (kh, kw), stride, padding, dilation))
        return requantize(acc.view(x.shape[0], oh, ow, -1).permute(0, 3, 1, 2), plan)

    def linear(self, x: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        return requantize(fbgemm.gemm_acc_saturating(x, self.weight, self.plan.z_in), self.plan)


@register
class FBGEMMBackend(Backend):
    """PyTorch's FBGEMM kernels as they compute on x86 (``pytorch`` requant): u8 x s8 pair sums saturated in int16
    where the CPU has no VNNI (and always in the depthwise kernel) (photosim.engine.fbgemm)."""

    name, kinds, priority = "fbgemm", ("ideal",), 10

    def supports(self, plan: LayerPlan, device: torch.device) -> str | None:
        if not plan.pair_saturation:
            return "only for layers whose PyTorch kernel saturates pair sums (none of this layer's can)"
        return None

    def prepare(self, plan: LayerPlan, device: torch.device, *, diagnostics: bool = True) -> LayerRunner:
        return SaturatingLayer(plan, plan.weight.to(device))


@dataclass
class CudaIdealLayer:
    """An ideal layer on CUDA: a cuda_ideal.FusedLayer (three kernels: patches, GEMM, requantization epilogue) or a
    triton_conv.ImplicitLayer (one kernel: implicit GEMM, or direct sums for depthwise layers, with the epilogue
    fused)."""

    plan: LayerPlan
    fused: object  # cuda_ideal.FusedLayer (its module imports Triton)

    def conv2d(self, x: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        return self.fused.conv(x, self.plan.z_in, *self.plan.conv_geometry())

    def linear(self, x: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        return self.fused.linear(x, self.plan.z_in)


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _int8_matmul(plan: LayerPlan) -> kernels.MatmulPlan | None:
    """The layer's int_mm plan (int8 operands ``x - z_in - offset``, whatever path it chose), or None when its
    operands do not fit int8."""
    try:
        return kernels.plan_matmul(plan.k, plan.x_range, plan.node.w_bits, force="int_mm")
    except ValueError:
        return None


def _implicit_kernel_problem(plan: LayerPlan) -> str | None:
    """Why photosim.engine.triton_conv's int8 kernels cannot compute this layer exactly, else None."""
    w_bits = plan.node.w_bits or 0
    if w_bits > 8:
        return f"needs int8 weights (this layer: {w_bits}-bit)"
    if plan.k * (-kernels.INT8_MIN) ** 2 >= 2**31:
        return f"K = {plan.k} terms of int8 products could overflow the int32 sums"
    if plan.k == 1:
        return "one-term dot products have no int8 weight layout (kernels.plan_matmul)"
    if _int8_matmul(plan) is None:
        return f"input codes x - z_in in {list(plan.x_range)} span more than the 256 values of int8"
    return None


def _implicit_layer(plan: LayerPlan, device: torch.device) -> CudaIdealLayer:
    """The layer on photosim.engine.triton_conv's kernels (int8 weights of each group, offset correction folded)."""
    from photosim.engine import triton_conv

    matmul = _int8_matmul(plan)
    assert matmul is not None  # supports() said so
    weights = kernels.prepare_weights(plan.weight, plan.groups, matmul, device)
    return CudaIdealLayer(plan, triton_conv.ImplicitLayer.prepare(weights, plan.requant, plan.mode.name))


def _epilogue_problem(plan: LayerPlan) -> str | None:
    """Why the CUDA kernels' requantization epilogue (triton_requant.layer_codes) cannot take this layer: a mode
    other than float and fixedpoint, or fixedpoint accumulators that might leave int32 (FixedPointRequant refuses
    those, which a kernel cannot do, so the bound sum |w| max|x - z_in| + |bias| must prove they fit)."""
    if plan.mode.name not in ("float", "fixedpoint"):
        return f"computes the float and fixedpoint requant modes only (this layer: {plan.mode.name})"
    if plan.mode.name == "float":
        return None
    x_max = max(abs(v) for v in plan.x_range)
    weight, bias = plan.weight.cpu().to(torch.int64), plan.requant.bias.cpu().to(torch.int64)
    bound = weight.abs().flatten(1).sum(1) * x_max + bias.abs()  # per output channel
    if bound.numel() and int(bound.max()) > INT32_MAX:
        return "fixedpoint: its accumulators could leave int32, which the torch path checks batch by batch"
    return None


@register
class CudaIdealBackend(Backend):
    """Ideal layers on CUDA with a fused requantization epilogue: ungrouped layers as patches, GEMM and epilogue
    (photosim.engine.cuda_ideal), grouped and depthwise ones on photosim.engine.triton_conv's grouped implicit-GEMM
    or direct kernel; ``float`` or ``fixedpoint`` requant."""

    name, kinds, priority = "cuda-ideal", ("ideal",), 20

    def supports(self, plan: LayerPlan, device: torch.device) -> str | None:
        matmul = plan.matmul
        if device.type != "cuda":
            return "runs on CUDA GPUs"
        if not _triton_installed():
            return "needs Triton"
        if problem := _epilogue_problem(plan):
            return problem
        if plan.groups != 1:
            problem = _implicit_kernel_problem(plan)
            return None if problem is None else f"grouped layers: {problem}"
        if not (matmul.path == "int_mm" or (matmul.path in ("float32", "float64") and matmul.chunk >= plan.k)):
            return f"needs int8 operands or one exact float chunk (this layer's matmul: {matmul.path})"
        return None

    def prepare(self, plan: LayerPlan, device: torch.device, *, diagnostics: bool = True) -> LayerRunner:
        if plan.groups != 1:
            return _implicit_layer(plan, device)
        from photosim.engine import cuda_ideal

        fused = cuda_ideal.FusedLayer.prepare(_exact_weights(plan, device), plan.requant, plan.mode.name)
        return CudaIdealLayer(plan, fused)


@register
class CudaImplicitBackend(Backend):
    """Ideal layers as one implicit-GEMM int8 kernel each (grouped ones too; depthwise ones as direct sums),
    requantization fused (photosim.engine.triton_conv): no im2col operands in memory. Opt-in until timed against
    cuda-ideal; on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1), for tests."""

    name, kinds, priority, on_request = "cuda-implicit", ("ideal",), 15, ("cuda", "cpu")

    def supports(self, plan: LayerPlan, device: torch.device) -> str | None:
        if not fused_triton.available(device):
            return "needs Triton and a CUDA device (on the CPU: TRITON_INTERPRET=1)"
        return _epilogue_problem(plan) or _implicit_kernel_problem(plan)

    def prepare(self, plan: LayerPlan, device: torch.device, *, diagnostics: bool = True) -> LayerRunner:
        return _implicit_layer(plan, device)


# -- analog layers -----------------------------------------------------------------------------------------------


def _kernel_effects(plan: LayerPlan, drawn_first: frozenset[str] = frozenset()) -> str | None:
    """Why a fused kernel cannot read out this layer: ADC calibration, custom noise, detector saturation, tile noise
    it does not draw (``drawn_first``: effects torch draws before the kernel takes over)."""
    readout = plan.readout
    assert readout is not None
    if readout.calibrating:
        return "the ADC range is being measured (the torch backend records the tile values)"
    if readout.custom:
        return "custom noise functions run in torch"
    if readout.saturation is not None:
        return "detector saturation runs in torch"
    missing = sorted(set(readout.tile_noise) - KERNEL_TILE_NOISE - drawn_first)
    return f"does not model {', '.join(missing)} noise" if missing else None


@register
class FusedTritonBackend(Backend):
    """The whole analog tile step as one Triton kernel on CUDA (photosim.engine.fused_triton), or its readout of
    torch's tile values (weight error, modulated inputs, signal-dependent noise); on CPU tensors under the Triton
    interpreter (TRITON_INTERPRET=1) when required by name, for tests."""

    name, kinds, priority, on_request = "fused-triton", ("analog",), 20, ("cpu",)

    def supports(self, plan: LayerPlan, device: torch.device) -> str | None:
        readout = plan.readout
        assert readout is not None
        if not fused_triton.available(device):
            return "needs Triton and a CUDA device (on the CPU: TRITON_INTERPRET=1)"
        forms_sums = readout.exact_weights and readout.exact_inputs and not readout.signal_effects
        if forms_sums and fused_triton.operand_path(plan.matmul.dtype, plan.matmul.dtype, readout.full_scale) is None:
            return f"no exact tile sums of {plan.matmul.path} operands at full scale {readout.full_scale:g}"
        # weight error, modulated inputs, signal-dependent noise: torch forms (and draws) the tile values first
        return _kernel_effects(plan, SIGNAL_EFFECTS)

    def prepare(self, plan: LayerPlan, device: torch.device, *, diagnostics: bool = True) -> LayerRunner:
        return AnalogLayer.prepare(plan, device, "fused-triton", diagnostics)


@functools.cache
def numba_problem() -> str | None:
    """Why numba cannot compile the CPU readout here (not installed, or its import fails: e.g. a numpy newer than
    it supports), else None; said once as a warning, the layers then run on the torch backend."""
    if importlib.util.find_spec("numba") is None:
        return "needs numba (pip install numba)"
    try:
        importlib.import_module("numba")
    except Exception as exc:  # numba raises ImportError, or others, on an unsupported numpy
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problem = f"numba cannot be imported ({first_line})"
        warnings.warn(f"{problem}: the analog readout runs on the torch backend (same numbers, slower).",
                      stacklevel=2)
        return problem
    return None


@register
class FusedCPUBackend(Backend):
    """The analog readout (noise, ADC, accumulator) as one compiled numba pass over torch's tile sums
    (photosim.engine.fused_cpu)."""

    name, kinds, priority = "fused-cpu", ("analog",), 30

    def supports(self, plan: LayerPlan, device: torch.device) -> str | None:
        readout = plan.readout
        assert readout is not None
        if device.type != "cpu":
            return "runs on the CPU"
        if (problem := numba_problem()) is not None:
            return problem
        return _kernel_effects(plan, SIGNAL_EFFECTS)  # torch draws them first (AnalogLayer._signal_noise)

    def prepare(self, plan: LayerPlan, device: torch.device, *, diagnostics: bool = True) -> LayerRunner:
        return AnalogLayer.prepare(plan, device, "fused-cpu", diagnostics)
