"""The photonic dot product of one layer: tiles of length L, weight error, analog noise, per-tile ADC, finite
accumulator, as the layer's Readout (photosim.hardware.readout) describes them. The engine runs a conv/linear here
instead of the exact integer matmul when its hardware settings are not ideal (model and sources: docs/hardware.md).

One AnalogLayer runs its tile step on the backend the registry chose (photosim.engine.backends): ``torch`` (the
reference: torch tile sums, noise, ADC and accumulator below), ``fused-cpu`` (the readout as one compiled numba
pass, photosim.engine.fused_cpu) or ``fused-triton`` (the whole tile step as one kernel,
photosim.engine.fused_triton; with weight error, modulated inputs or signal-dependent noise torch forms the tile
values and the kernel reads them out).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from photosim._imports import load_object
from photosim.engine import fused_triton, kernels, onednn
from photosim.engine.plan import LayerPlan
from photosim.engine.requant import real_bias
from photosim.errors import PhotosimError
from photosim.hardware import drift, mesh, rng
from photosim.hardware.accumulator import accumulate
from photosim.hardware.adc import digitize
from photosim.hardware.config import NOISE_EFFECTS
from photosim.hardware.noise import (
    MODULATOR_TRANSFERS,
    SIGNAL_NOISE_VARIANCE,
    TILE_NOISE,
    WEIGHT_NOISE,
    dac_noise,
    detector_saturation,
)
from photosim.hardware.readout import Readout
from photosim.ir import ieee
from photosim.ir.observers import ActivationObserver
from photosim.ir.ranges import max_int

# How each weight model of LayerHardware.weight_models realises a layer's (O, K) codes on one chip.
WEIGHT_REALISATIONS = {"mesh": mesh.realised_weights, "drift": drift.realised_weights}
# Upper bound on the bytes of the per-tile tensors of one sub-batch (tile values, noise, codes).
TILE_BYTES = 1 << 24
TileStep = Literal["torch", "fused-cpu", "fused-triton"]


@dataclass
class LayerStats:
    """Diagnostics of one layer, summed over the batches of one pass."""

    outputs: int = 0
    overflowed: int = 0
    tile_values: int = 0
    clipped: int = 0
    signal_power: float = 0.0  # sum of exact accumulator^2 (product units)
    error_power: float = 0.0  # sum of (hardware - exact)^2
    max_abs_acc: int = 0  # largest |accumulator| seen, in accumulator units
    signal_noise_power: float = 0.0  # sum over tile values of the variance the signal-dependent effects inject
    # (their laws at the tiles' real light and signal; product units^2)
    saturated: int = 0  # tile values the detector clamped (detector.saturation; the ADC's clips are ``clipped``)

    def add(self, other: LayerStats) -> None:
        """Accumulate another batch's counts into this one."""
        for name in self.__dataclass_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, max(mine, theirs) if name == "max_abs_acc" else mine + theirs)


@dataclass
class AnalogLayer:
    """One conv/linear on the photonic engine: its plan, weights, tile-step backend, diagnostics."""

    plan: LayerPlan  # plan.readout describes the tile step
    weights: kernels.IntegerWeights  # in the plan's matmul plan (its matrix: see the ``matrix`` property)
    bias: torch.Tensor | None  # (G, O/G) int64 in product units; None when the requant mode adds a float bias
    tile_step: TileStep = "torch"  # the backend that forms and reads out the tile sums
    diagnostics: bool = True  # also compute the SNR against the exact accumulator (one more matmul)
    conv: onednn.OneDNNConv | None = None  # the layer's exact fast conv (a single exact tile uses it)
    calibration: ActivationObserver | None = None  # set while the readout is calibrating: records |tile values|
    _stats: LayerStats = field(default_factory=LayerStats, init=False, repr=False)
    _pending: list[torch.Tensor] = field(default_factory=list, init=False, repr=False)  # see _record

    @classmethod
    def prepare(cls, plan: LayerPlan, device: torch.device, tile_step: TileStep, diagnostics: bool = True
                ) -> AnalogLayer:
        """The layer of an analog plan on ``device``, its tile step run by ``tile_step``. On the CPU a conv of one
        exact tile forms its tile values on oneDNN (they are the exact accumulators)."""
        readout = plan.readout
        assert readout is not None
        weights = kernels.prepare_weights(plan.weight, plan.groups, plan.matmul, device)
        bias = plan.requant.bias.view(plan.groups, -1) if plan.mode.integer_bias else None
        conv = None
        if (tile_step != "fused-triton" and plan.node.op == "conv2d" and device.type == "cpu" and readout.tiles == 1
                and plan.groups == 1 and readout.exact_weights and readout.exact_inputs and not readout.tile_signals):
            _, stride, padding, dilation = plan.conv_geometry()
            conv = onednn.prepare_conv(plan.weight, plan.x_range, stride, padding, dilation, plan.groups)
        calibration = ActivationObserver(seed=plan.index) if readout.calibrating else None
        return cls(plan, weights, bias, tile_step, diagnostics, conv, calibration)

    @classmethod
    def for_matmul(cls, plan: LayerPlan, diagnostics: bool = True) -> AnalogLayer:
        """The tile step of a matmul of two activations: the second operand is loaded per sample as the weights
        (the plan's weight is empty; ``matmul_acc`` takes both operands)."""
        readout = plan.readout
        assert readout is not None
        if readout.weight_noise:
            raise PhotosimError(f"node {plan.name!r} (matmul): weight error is a property of programmed weights; a "
                                "matmul of two activations loads both per input. Set noise.weight_static and "
                                "noise.weight_read to 0 for it (a per-layer override).")
        calibration = ActivationObserver(seed=plan.index) if readout.calibrating else None
        empty = kernels.IntegerWeights(plan.matmul, torch.empty(0, 0, 0), None, readout.k, 0)
        return cls(plan, empty, None, "torch", diagnostics, None, calibration)

    def matmul_acc(self, a: torch.Tensor, b: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """Operands a - z_a (N, ..., M, K) and b - z_b (N, ..., K, P), int64 -> accumulators (N, ..., M, P) int64
        in ADC steps: each sample's b is that sample's weights, the leading dimensions its groups."""
        n, lead, (m, k), p = a.shape[0], a.shape[1:-2], a.shape[-2:], b.shape[-1]
        g = math.prod(lead)
        rows = a.reshape(n, g, m, k).permute(1, 0, 2, 3).reshape(g, n * m, k).double()  # (G, N*M, K) sample-major
        weights = b.reshape(n, g, k, p).double()
        x, exact = rows, None
        if not self.readout.exact_inputs:  # the first operand is modulated; the exact sums are one tile of K
            x = self._modulated(rows, sample_ids)
            exact = _tile_sums(rows, weights, k, n)[:, 0] if self.diagnostics else None  # (G, N*M, P)
        tiles = _tile_sums(x, weights, self.tile, n)  # (G, T, N*M, P)
        acc = self._readout(tiles, sample_ids, exact, signals=self._tile_signals(x, weights, n))  # (G, N*M, P)
        return acc.view(g, n, m, p).permute(1, 0, 2, 3).reshape(n, *lead, m, p)

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def kernel_forms_sums(self) -> bool:
        """Whether the fused-triton kernel forms the tile sums from the operands (exact weights and inputs, no
        signal-dependent noise); else torch forms the tile values and the kernel reads them out."""
        r = self.readout
        return self.tile_step == "fused-triton" and r.exact_weights and r.exact_inputs and not r.signal_effects

    @property
    def stats(self) -> LayerStats:
        """The diagnostics so far; the batches' counts that _record left on the device are read here, at once."""
        if self._pending:
            for overflowed, clipped, largest, signal, error in torch.stack(self._pending).tolist():
                self._stats.add(LayerStats(overflowed=int(overflowed), clipped=int(clipped), max_abs_acc=int(largest),
                                           signal_power=signal, error_power=error))
            self._pending.clear()
        return self._stats

    @property
    def readout(self) -> Readout:
        assert self.plan.readout is not None
        return self.plan.readout

    @property
    def tile(self) -> int:
        """L, the dot-product length of one optical core (at most K)."""
        return self.readout.tile

    @property
    def tiles(self) -> int:
        """T = ceil(K / L)."""
        return self.readout.tiles

    @property
    def full_scale(self) -> float:
        """FS = L * Xmax * Wmax: the largest |tile value| the codes allow."""
        return self.readout.full_scale

    @property
    def adc_bits(self) -> int | None:
        """ADC bits in use (None: ideal readout, also while calibrating)."""
        return self.readout.adc_bits

    @property
    def step(self) -> float:
        """ADC step in product units (1 for the ideal readout)."""
        return self.readout.step

    @property
    def matrix(self) -> torch.Tensor:
        """The weights (G, K, O/G) in the plan's dtype: a view without the zero rows and columns that
        kernels.prepare_weights pads int_mm weights with on CUDA (for torch._int_mm)."""
        return self.weights.matrix[:, :self.weights.k, :self.weights.out_per_group]

    @functools.cached_property
    def tile_shift(self) -> torch.Tensor | None:
        """(G, T, O) int64 to add to int8 GEMM tile sums: offset * the tile's weight sums (the int_mm plan shifts
        unsigned operands into int8, see kernels.MatmulPlan); None for the other plans."""
        plan, w = self.weights.plan, self.matrix
        if plan.path != "int_mm" or not plan.offset:
            return None
        g, k, o = w.shape
        padded = torch.nn.functional.pad(w.to(torch.int64), (0, 0, 0, self.tiles * self.tile - k))
        return plan.offset * padded.view(g, self.tiles, self.tile, o).sum(dim=2)

    def conv2d(self, x: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """Input codes (N, C, H, W) -> output codes (N, O, OH, OW)."""
        return self._requantize(self.conv_acc(x, sample_ids))

    def linear(self, x: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """Input codes (N, K) -> output codes (N, O)."""
        return self._requantize(self.linear_acc(x, sample_ids))

    def _requantize(self, acc: torch.Tensor) -> torch.Tensor:
        """Accumulators in ADC steps (bias included) -> codes: the multiplier absorbs the step.

        A mode that adds a real-valued bias after the accumulator (``pytorch``) gets it fixed before the step
        scales ``input_scale``: the integer bias is in units of the unscaled ``input_scale * weight_scale``, so
        deriving it from the scaled one would multiply the bias by the step."""
        params = self.plan.requant
        if not self.plan.mode.integer_bias and params.bias_float is None:
            params = replace(params, bias_float=real_bias(params))
        acc = acc if self.plan.mode.float_accumulators else acc.to(torch.int64)
        return self.plan.mode.requantize(acc, replace(params, input_scale=params.input_scale * self.step))

    def conv_acc(self, x: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """Codes (N, C, H, W) -> accumulators (N, O, OH, OW) int64 in ADC steps, bias included."""
        groups, z_in = self.plan.groups, self.plan.z_in
        if self.conv is not None:
            exact = onednn.conv_acc(x, z_in, self.conv)  # (N, O, OH, OW) float64, channels_last
            if exact is not None:  # one tile: the tile values are the exact accumulators, (N*OH*OW, O) in memory
                n, o, oh, ow = exact.shape
                acc = self._readout(exact.permute(0, 2, 3, 1).reshape(1, 1, n * oh * ow, o), sample_ids)
                return acc.view(n, oh, ow, o).permute(0, 3, 1, 2)  # (N, O, OH, OW), channels_last
        kernel, stride, padding, dilation = self.plan.conv_geometry()
        n, _, h, w = x.shape
        oh, ow = (kernels.conv_output_size(*args) for args in zip((h, w), kernel, stride, padding, dilation))
        tile_values, operands = self.tiles * self.weights.out_per_group, self.weights.k
        copies = 1 if self.readout.exact_inputs else 3  # inexact inputs: the modulated operands and their noise
        operand_bytes = operands * self.weights.matrix.element_size() * copies
        budget = TILE_BYTES
        if self.kernel_forms_sums:  # the int64 accumulators and exact sums: the kernel gathers the operands
            budget = kernels.PATCH_BYTES
            per_sample = oh * ow * groups * self.weights.out_per_group * (16 if self.diagnostics else 8)
        elif self.tile_step == "fused-cpu":  # the tile values (int32 / float32 / float64) and the operands
            value_bytes = 8 if self.weights.plan.path == "float64" else 4
            per_sample = oh * ow * groups * (tile_values * value_bytes + operand_bytes)
        else:  # float64 values and their temporaries, and the per-tile signals of signal-dependent noise
            temporaries = 3 + len(set(self.readout.tile_signals.values())) + copies - 1
            per_sample = oh * ow * groups * (tile_values + operands) * 8 * temporaries
        step = max(1, budget // max(per_sample, 1))
        outs = []
        for start in range(0, max(n, 1), step):  # an empty batch still gives an (0, O, OH, OW) result
            batch, ids = x[start:start + step], sample_ids[start:start + step]
            if self.kernel_forms_sums:  # the kernel gathers the operands from the input
                acc = self._recorded(fused_triton.conv_tile_step(
                    batch, z_in, self.weights.plan, kernel, stride, padding, dilation, self.matrix, ids, self.readout,
                    self._bias_codes(self.step), exact=self.diagnostics, shift=self.tile_shift))
            else:
                patches = kernels.conv2d_patches(batch, z_in, self.weights.plan, kernel, stride, padding, dilation,
                                                 groups)  # (G, n*OH*OW, K) in the plan's dtype
                acc = self.dot(patches, ids)  # (G, n*OH*OW, O/G)
            acc = acc.view(groups, -1, oh, ow, acc.shape[-1]).permute(1, 0, 4, 2, 3)  # (n, G, O/G, OH, OW)
            outs.append(acc.reshape(acc.shape[0], groups * acc.shape[2], oh, ow))
        return torch.cat(outs)

    def linear_acc(self, x: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """Codes (N, K) -> accumulators (N, O) int64 in ADC steps, bias included."""
        return self.dot(kernels.centred(x, self.plan.z_in, self.weights.plan).unsqueeze(0), sample_ids)[0]

    def dot(self, a: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """Operands a (G, M, K) = x - z_in - offset (the plan's), rows sample-major -> accumulators (G, M, O/G) in
        ADC steps."""
        if self.kernel_forms_sums:
            return self.dot_triton(a, sample_ids)
        offset, exact_inputs = self.weights.plan.offset, self.readout.exact_inputs
        if self.weights.plan.path == "int_mm" and exact_inputs:
            signals = self._tile_signals(a, self.matrix, 1, offset)
            return self._readout(_tile_sums_int8(a, self.matrix, self.tile), sample_ids, None, self.tile_shift,
                                 signals)
        weights, x = self._perturbed_weights(sample_ids), a
        if not exact_inputs:  # what the modulators send, float64 (the offset undone: the plan is float64 anyway)
            x, weights, offset = self._modulated(a.double() + offset, sample_ids), weights.double(), 0
        p = _tile_sums(x, weights, self.tile, len(sample_ids))  # (G, T, M, O) analog tile values
        exact = None
        if self.diagnostics and not (self.readout.exact_weights and exact_inputs):
            exact = torch.matmul(a.double() + self.weights.plan.offset, self.matrix.double())  # exact below 2^53
        return self._readout(p, sample_ids, exact, signals=self._tile_signals(x, weights, len(sample_ids), offset))

    def _modulated(self, x: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """Operands x (G, M, K) = x - z_in, float64, rows sample-major -> the values the modulators put on the
        light: the modulator's transfer, then the DAC noise, drawn per inference and per operand element (stream
        ``dac``: a conv input that enters several patches is converted anew for each). The ADC calibration pass
        measures noise-free tile values, so it gets the transfer only."""
        r = self.readout
        x = MODULATOR_TRANSFERS[r.dac_transfer](x, float(r.x_max))
        if r.dac_enob is None or r.calibrating:
            return x
        return dac_noise(x, r.dac_sigma, self._normal_like(x, sample_ids, "dac"))

    def _tile_signals(self, a: torch.Tensor, w: torch.Tensor, samples: int, offset: int = 0
                      ) -> dict[str, torch.Tensor]:
        """The per-tile optical quantities (G, T, M, O or 1) float64 the signal-dependent noise effects need
        (Readout.tile_signals), from operands a (G, M, K) shifted by ``offset`` (the int8 plan's) and the realised
        weights (G, K, O) or (N, G, K, O): the detected light sum |x| Wmax or sum |x w|, and the signal power
        sum (x w)^2."""
        wanted = set(self.readout.tile_signals.values())
        if not wanted:
            return {}
        x, w = a.double() + offset, w.double()  # int8 operands are shifted by the offset
        signals = {}
        if "input_light" in wanted:
            w_max = torch.full((x.shape[0], x.shape[-1], 1), float(self.readout.w_max), dtype=torch.float64,
                               device=x.device)
            signals["input_light"] = _tile_sums(x.abs(), w_max, self.tile, 1)
        if "product_light" in wanted:
            signals["product_light"] = _tile_sums(x.abs(), w.abs(), self.tile, samples)
        if "product_power" in wanted:
            signals["product_power"] = _tile_sums(x.square(), w.square(), self.tile, samples)
        return signals

    def _readout(self, p: torch.Tensor, sample_ids: torch.Tensor, exact: torch.Tensor | None = None,
                 shift: torch.Tensor | None = None, signals: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Tile values p (G, T, M, O) + shift (G, T, O) -> analog noise, ADC, accumulator -> (G, M, O) int64 in ADC
        steps, by the compiled CPU readout (``fused-cpu``), the Triton kernel (``fused-triton``) or the torch path
        (the reference).

        ``exact`` (G, M, O) is the exact accumulator for the diagnostics; None: p's tiles sum to it. ``signals``:
        the per-tile optical quantities of signal-dependent noise (``_tile_signals``): torch draws that noise first
        on every path, and the compiled readouts continue from the noisy values.
        """
        drawn_first = self.readout.signal_effects
        if shift is not None and (self.tile_step != "fused-cpu" or drawn_first):
            p, shift = p.to(torch.int64) + shift.unsqueeze(2), None
        if self.tile_step == "torch":
            return self._readout_torch(p, sample_ids, exact, signals)
        if self.diagnostics and exact is None and (drawn_first or self.tile_step == "fused-triton"):
            exact = p.sum(dim=1, dtype=torch.float64)  # the Triton kernel sums only the tiles it forms
        p = self._signal_noise(p, sample_ids, signals)
        if self.tile_step == "fused-triton":
            return self._recorded(fused_triton.readout_step(p, sample_ids, self.readout, self._bias_codes(self.step),
                                                            exact))
        return self._readout_fused(p, sample_ids, exact, shift)

    def dot_triton(self, a: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """dot by photosim.engine.fused_triton's kernel: tile sums, noise, ADC and accumulator in one pass, the
        diagnostics from its exact sums. Used on CUDA (and by the tests under the Triton interpreter)."""
        return self._recorded(fused_triton.tile_step(a, self.matrix, sample_ids, self.readout,
                                                     self._bias_codes(self.step), exact=self.diagnostics,
                                                     shift=self.tile_shift))

    def _recorded(self, out: fused_triton.TileStep) -> torch.Tensor:
        """The accumulators (G, M, O/G) of a fused_triton tile step, its counts and diagnostics added to the stats."""
        self._record(out.acc, self.step, out.counts[1], out.counts[0], self.tiles * out.acc.numel(), out.exact)
        return out.acc

    def _readout_fused(self, p: torch.Tensor, sample_ids: torch.Tensor, exact: torch.Tensor | None,
                       shift: torch.Tensor | None) -> torch.Tensor:
        """_readout by photosim.engine.fused_cpu (imported here: numba loads only when a layer needs it)."""
        from photosim.engine import fused_cpu

        step = self.step
        acc, counts = fused_cpu.readout(p, sample_ids, self.readout, self.bias, self._bias_codes(step), exact,
                                        self.diagnostics, shift)
        self.stats.add(LayerStats(outputs=acc.numel(), overflowed=counts.overflowed, tile_values=p.numel(),
                                  clipped=counts.clipped, signal_power=counts.signal_power,
                                  error_power=counts.error_power, max_abs_acc=counts.max_abs_acc))
        return acc

    def _readout_torch(self, p: torch.Tensor, sample_ids: torch.Tensor, exact: torch.Tensor | None,
                       signals: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """_readout as torch tensor operations: any device, calibration, custom and signal-dependent noise."""
        readout = self.readout
        if self.calibration is not None:
            self.calibration.update(p.abs())
        if self.diagnostics and exact is None:
            exact = p.sum(dim=1, dtype=torch.float64)
        fs = self.full_scale
        p = self._signal_noise(p.to(readout.dtype), sample_ids, signals)
        for name, sigma in readout.tile_noise.items():
            if name not in readout.signal_effects:
                p = TILE_NOISE[name](p, sigma, fs, self._normal_like(p, sample_ids, name))
        if readout.custom:
            context = {"layer": self.name, "full_scale": fs, "tile": self.tile, "sample_ids": sample_ids,
                       "normal": lambda: self._normal_like(p, sample_ids, "custom").double()}
            p = _custom_noise(readout.custom, self.name, p, context)
        if readout.saturation is not None:
            p, saturated = detector_saturation(p, readout.saturation * fs)
            self.stats.saturated += int(saturated.sum())
        step = self.step
        codes, clipped = digitize(p, step, self.adc_bits)  # (G, T, M, O) int64
        bias = self._bias_codes(step)
        acc, overflowed = self._accumulate(codes, None if bias is None else bias.unsqueeze(1))  # (G, M, O)
        clips = 0 if self.adc_bits is None else int(clipped.sum())  # the ideal readout never clips
        self._record(acc, step, overflowed, clips, clipped.numel(), exact)
        return acc

    def _signal_noise(self, p: torch.Tensor, sample_ids: torch.Tensor, signals: dict[str, torch.Tensor] | None
                      ) -> torch.Tensor:
        """p with the signal-dependent effects (photocurrent, rin) drawn, first of the tile noise and in torch on
        every path (float64: Readout.dtype with them on); their variance at the tiles' real light and signal goes
        into the stats for the link budget's predicted SNR."""
        readout, fs = self.readout, self.full_scale
        for name in readout.signal_effects:
            sigma = readout.tile_noise[name]
            signal = (signals or {})[readout.tile_signals[name]] if name in readout.tile_signals else None
            p = p.double()
            if self.diagnostics:
                variance = SIGNAL_NOISE_VARIANCE[name](p, sigma, fs, signal)
                self.stats.signal_noise_power += float(variance.sum()) * (p.numel() // variance.numel())
            p = TILE_NOISE[name](p, sigma, fs, self._normal_like(p, sample_ids, name), signal)
        return p

    def _bias_codes(self, step: float) -> torch.Tensor | None:
        """The bias (G, O) int64 in ADC steps (None: no integer bias)."""
        return None if self.bias is None else torch.round(ieee.divide(self.bias.double(), step)).to(torch.int64)

    def _accumulate(self, codes: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """ADC codes (G, T, M, O) and bias (G, 1, O) in tile order into the accumulator -> (G, M, O), overflows.

        A plain sum where no running sum can leave the range (|bias| + T * max |code| fits), else accumulate().
        """
        r = self.readout
        largest = _largest_abs(codes) * codes.shape[1] + (0 if bias is None else _largest_abs(bias))
        if largest <= max_int(r.acc_bits, signed=True):
            acc = codes[:, 0] if codes.shape[1] == 1 else codes.sum(dim=1)  # codes is ours to add the bias into
            return (acc if bias is None else acc.add_(bias)), 0
        acc, overflowed = accumulate(codes.permute(0, 2, 3, 1), bias, r.acc_bits, r.overflow, r.bias_at)
        return acc, int(overflowed.sum())

    @functools.cached_property
    def chip_matrix(self) -> torch.Tensor:
        """The weights (G, K, O) this chip realises: the codes through the readout's weight models (mesh, drift;
        float64, drawn once per chip and layer from their own streams), else the codes themselves."""
        r, w = self.readout, self.matrix
        if not r.weight_models:
            return w
        realised = w.double().transpose(1, 2).cpu()  # (G, O, K): the models take (O, K) codes
        for name, settings in r.weight_models.items():
            generator = rng.chip_generator(r.seed, r.repeat, name, r.layer)
            realised = torch.stack([WEIGHT_REALISATIONS[name](group, float(r.w_max), r.tile, settings, generator)
                                    for group in realised])
        return realised.transpose(1, 2).to(w.device)

    def _perturbed_weights(self, sample_ids: torch.Tensor) -> torch.Tensor:
        """Weights (G, K, O) in the plan's dtype, or float64 with the chip's weight models and chip error, and with
        per-inference weight error one copy per sample (N, G, K, O)."""
        r, w = self.readout, self.chip_matrix
        for name, (kind, sigma) in r.weight_noise.items():
            if NOISE_EFFECTS[name].per_chip:
                e = rng.normal(tuple(w.shape), r.seed, r.repeat, name, r.layer, w.device).double()
                w = WEIGHT_NOISE[kind](w, sigma, r.w_max, e)
            else:
                shape = tuple(w.shape[-3:])
                e = rng.normal_per_sample(shape, sample_ids, r.seed, r.repeat, name, r.layer, w.device).double()
                w = WEIGHT_NOISE[kind](w if w.dim() == 4 else w.unsqueeze(0), sigma, r.w_max, e)
        return w

    def _normal_like(self, p: torch.Tensor, sample_ids: torch.Tensor, stream: str) -> torch.Tensor:
        """Standard normals shaped like p (..., N*P, O) in p's dtype, its rows sample-major: tile values (G, T, N*P,
        O) or operands (G, N*P, K). Element (g, t, n*P + pos, o) is element ((g*T + t)*P + pos)*O + o of
        sample_ids[n]'s stream, so the numbers do not depend on the batch."""
        *lead, m, o = p.shape
        r = self.readout
        e = rng.normal_per_sample((*lead, m // max(len(sample_ids), 1), o), sample_ids, r.seed, r.repeat,
                                  stream, r.layer, p.device)  # (N, *lead, P, O)
        return e.movedim(0, len(lead)).reshape(p.shape).to(p.dtype)

    def _record(self, acc: torch.Tensor, step: float, overflowed: int | torch.Tensor, clipped: int | torch.Tensor,
                tile_values: int, exact: torch.Tensor | None) -> None:
        """Add this batch's overflow, clip and (with diagnostics) SNR counts to the stats. Those computed on the
        accumulators' device stay there as one float64 tensor (overflowed, clipped, largest |acc|, signal and error
        powers; counts exact below 2^53) until ``stats`` reads them: reading them per batch would make the host wait
        for a GPU at every layer."""
        self._stats.add(LayerStats(outputs=acc.numel(), tile_values=tile_values))
        zero = torch.zeros((), dtype=torch.float64, device=acc.device)
        signal = error = largest = zero
        if acc.numel():
            lo, hi = torch.aminmax(acc)
            largest = torch.maximum(-lo, hi).double()
        if exact is not None:
            exact = exact.double()  # int64 exact sums would overflow when squared
            if self.bias is not None:
                exact = exact + self.bias.unsqueeze(1)
            signal = exact.pow(2).sum()
            error = (acc.double() * step - exact).pow(2).sum()
        self._pending.append(torch.stack([zero + overflowed, zero + clipped, largest, signal, error]))


def _custom_noise(spec: str, layer: str, p: torch.Tensor, context: dict[str, Any]) -> torch.Tensor:
    """Call the user's ``noise.custom.function``; its failures and wrong results become one message naming it."""
    function = load_object(spec, "custom noise")
    try:
        noisy = function(p, context)
    except Exception as exc:
        raise PhotosimError(f"custom noise function {spec} raised {type(exc).__name__} on layer {layer!r} ({exc}); "
                            "fix the function (it gets the float64 tile values and a context dict).") from exc
    if not isinstance(noisy, torch.Tensor) or noisy.shape != p.shape:
        got = tuple(noisy.shape) if isinstance(noisy, torch.Tensor) else type(noisy).__name__
        raise PhotosimError(f"custom noise function {spec} returned {got} on layer {layer!r}; it must return a "
                            f"tensor of the tile values' shape {tuple(p.shape)}.")
    if noisy.is_floating_point() and not bool(torch.isfinite(noisy).all()):
        raise PhotosimError(f"custom noise function {spec} returned NaN or infinite tile values on layer {layer!r}; "
                            "it must return finite numbers (the readout rounds them to integers).")
    return noisy


def _largest_abs(t: torch.Tensor) -> int:
    """max |t| of an integer tensor (0 if empty), in one pass without temporaries."""
    if not t.numel():
        return 0
    lo, hi = torch.aminmax(t)
    return max(-int(lo), int(hi))


def _tile_sums_int8(a: torch.Tensor, w: torch.Tensor, tile: int) -> torch.Tensor:
    """Per-tile sums (G, T, M, O) int32 of int8 operands a (G, M, K) and weights (G, K, O): one int8 GEMM per tile
    on strided views (exact: L * 128 * 128 < 2^31); a one-term last tile is a product, which _int_mm misreads.
    Off the CPU (the CUDA tile step without the Triton kernel: ADC calibration, custom noise) by float64 GEMMs,
    as exact: CUDA's torch._int_mm takes only sizes that are multiples of 8."""
    if a.device.type != "cpu":
        return _tile_sums(a.double(), w.double(), tile, 1).to(torch.int32)
    g, m, k = a.shape
    t = math.ceil(k / tile)
    p = torch.empty(g, t, m, w.shape[-1], dtype=torch.int32, device=a.device)
    for j in range(g):
        for i, start in enumerate(range(0, k, tile)):
            if k - start == 1:
                torch.mul(a[j, :, start:].to(torch.int32), w[j, start:].to(torch.int32), out=p[j, i])
            else:
                torch._int_mm(a[j, :, start:start + tile], w[j, start:start + tile], out=p[j, i])
    return p


def _tile_sums(a: torch.Tensor, w: torch.Tensor, tile: int, samples: int) -> torch.Tensor:
    """Per-tile sums (G, T, M, O) of a (G, M, K) with weights (G, K, O), or per-sample weights (N, G, K, O).

    Shared weights: a batched matmul over the full tiles of a strided view of a, then the short last tile (its
    L' < L products: the zeros a padded tile would add change no sum); no padded or transposed copy of a."""
    g, m, k = a.shape
    t = math.ceil(k / tile)
    if w.dim() == 3:
        if t == 1:
            return torch.matmul(a, w).unsqueeze(1)
        p = torch.empty(g, t, m, w.shape[-1], dtype=torch.result_type(a, w), device=a.device)
        full = k // tile
        for j in range(g):
            if full:
                tiles = a[j, :, :full * tile].unflatten(1, (full, tile)).transpose(0, 1)  # (T', M, L) view
                torch.bmm(tiles, w[j, :full * tile].view(full, tile, -1), out=p[j, :full])
            if full < t:
                torch.mm(a[j, :, full * tile:], w[j, full * tile:], out=p[j, full])
        return p
    pad = t * tile - k
    if pad:
        a, w = torch.nn.functional.pad(a, (0, pad)), torch.nn.functional.pad(w, (0, 0, 0, pad))
    a = a.view(g, m, t, tile).transpose(1, 2)  # (G, T, M, L)
    w = w.view(samples, g, t, tile, -1)  # (N, G, T, L, O)
    a = a.unflatten(2, (samples, m // samples)).permute(2, 0, 1, 3, 4)  # (N, G, T, P, L)
    return torch.matmul(a, w).permute(1, 2, 0, 3, 4).reshape(g, t, m, -1)
