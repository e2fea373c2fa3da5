"""The photonic dot product of one layer: tiles of length L, weight error, analog noise, per-tile ADC,
finite accumulator. The engine sends a conv/linear here instead of the exact integer matmul when the
layer's hardware settings are not ideal (model and its sources: docs/hardware.md).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from photosim._imports import load_object
from photosim.engine import kernels, onednn
from photosim.errors import PhotosimError
from photosim.frontend.observers import ActivationObserver
from photosim.hardware import fused_triton, rng
from photosim.hardware.accumulator import accumulate
from photosim.hardware.adc import adc_step, digitize
from photosim.hardware.config import LayerHardware
from photosim.hardware.noise import TILE_NOISE, WEIGHT_NOISE
from photosim.ir.ranges import max_int, max_magnitude

# Upper bound on the bytes of the per-tile tensors of one sub-batch (tile values, noise, codes).
TILE_BYTES = 1 << 24
FLOAT32_EXACT = 1 << 24  # float32 holds every integer below this


def tile_length(k: int, tile: int | None) -> int:
    """L, the products one optical core sums: the ``tile`` setting, at most K (None: one tile of K)."""
    return min(tile or k, k)


def exact_weights(hw: LayerHardware) -> bool:
    """No weight error: the tile sums are the exact integer ones."""
    return not (hw.noise.weight_static.sigma or hw.noise.weight_read.sigma)


def tile_plan(k: int, hw: LayerHardware, x_range: kernels.IntPair, w_bits: int, device: torch.device
              ) -> kernels.MatmulPlan:
    """How a layer forms its tile sums. Integer weights: int8 operands (int32 sums, exact) where the operands fit
    int8, with an offset if need be, and int8 GEMMs are faster: on CPUs where torch._int_mm beats float32 (VNNI,
    AMX: 8x faster here), and on CUDA, where photosim.hardware.fused_triton's kernel takes int8 operands of any
    tile length (float ones only below 2^24). Else float32 where the sums are exact there (full scale below 2^24).
    Otherwise float64 (exact for tile sums of up to 16-bit codes, and the path of weights with error)."""
    if not exact_weights(hw):
        return kernels.MatmulPlan("float64", chunk=k)
    plan = kernels.plan_matmul(tile_length(k, hw.tile), x_range, w_bits, device=device)
    if plan.path == "int_mm":
        return kernels.MatmulPlan("int_mm", chunk=k, offset=plan.offset)
    x_max, w_max = max(-x_range[0], x_range[1]), max_magnitude(w_bits)
    exact32 = tile_length(k, hw.tile) * x_max * w_max < FLOAT32_EXACT
    return kernels.MatmulPlan("float32" if exact32 else "float64", chunk=k)


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

    def add(self, other: LayerStats) -> None:
        """Accumulate another batch's counts into this one."""
        for name in self.__dataclass_fields__:
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, max(mine, theirs) if name == "max_abs_acc" else mine + theirs)


@dataclass
class AnalogLayer:
    """One conv/linear on the photonic engine: its settings, weights, random streams and diagnostics."""

    name: str
    index: int  # position in the graph: keys this layer's random streams
    hw: LayerHardware
    weights: kernels.IntegerWeights  # in tile_plan's plan (its matrix: see the ``matrix`` property)
    bias: torch.Tensor | None  # (G, O/G) int64 in product units; None when the requant mode adds a float bias
    x_max: int  # largest |x - z_in| the input clamp range allows
    w_max: int  # largest |weight code|: 2^(w_bits-1)
    seed: int = 0
    repeat: int = 0
    adc_range: float | None = None  # +-range in product units (None: full scale)
    calibration: ActivationObserver | None = None  # set: record |tile values| for a calibrated ADC range
    diagnostics: bool = True  # also compute the SNR against the exact accumulator (one more matmul)
    conv: onednn.OneDNNConv | None = None  # the layer's exact fast conv (a single exact tile uses it)
    stats: LayerStats = field(default_factory=LayerStats)

    @property
    def tile(self) -> int:
        """L, the dot-product length of one optical core (at most K)."""
        return tile_length(self.weights.k, self.hw.tile)

    @property
    def tiles(self) -> int:
        """T = ceil(K / L)."""
        return math.ceil(self.weights.k / self.tile)

    @property
    def full_scale(self) -> float:
        """FS = L * Xmax * Wmax: the largest |tile value| the codes allow."""
        return float(self.tile * self.x_max * self.w_max)

    @property
    def adc_bits(self) -> int | None:
        """ADC bits in use (None: ideal readout, also while calibrating)."""
        return None if self.calibration is not None else self.hw.adc.bits

    @property
    def step(self) -> float:
        """ADC step in product units (1 for the ideal readout)."""
        if self.adc_bits is None:
            return 1.0
        return adc_step(self.full_scale if self.adc_range is None else self.adc_range, self.adc_bits)

    @property
    def _sigmas(self) -> dict[str, float]:
        return {"output": self.hw.noise.output.resolved_sigma, "shot": self.hw.noise.shot.sigma}

    @property
    def tile_dtype(self) -> torch.dtype:
        """float32 under output / shot noise (whose std swamps the float32 rounding of the noisy values) when every
        tile value is an integer below 2^24 (exact weights, FS < 2^24), so exact in float32; else float64 (custom
        noise functions get float64, as documented). It depends on the settings only, never on the matmul path a
        machine picks, so every CPU and GPU computes the same numbers."""
        noisy = any(self._sigmas.values()) and not self.hw.noise.custom.function
        exact32 = exact_weights(self.hw) and self.full_scale < FLOAT32_EXACT
        return torch.float32 if noisy and exact32 else torch.float64

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

    def conv_acc(self, x: torch.Tensor, z_in: int, attrs: dict, sample_ids: torch.Tensor) -> torch.Tensor:
        """Codes (N, C, H, W) -> accumulators (N, O, OH, OW) int64 in ADC steps, bias included."""
        groups = attrs["groups"]
        if self.conv is not None and self.tiles == 1 and groups == 1 and exact_weights(self.hw):
            exact = onednn.conv_acc(x, z_in, self.conv)  # (N, O, OH, OW) float64, channels_last
            if exact is not None:  # one tile: the tile values are the exact accumulators, (N*OH*OW, O) in memory
                n, o, oh, ow = exact.shape
                acc = self._readout(exact.permute(0, 2, 3, 1).reshape(1, 1, n * oh * ow, o), sample_ids)
                return acc.view(n, oh, ow, o).permute(0, 3, 1, 2)  # (N, O, OH, OW), channels_last
        kernel, stride, padding, dilation = (kernels.pair(attrs[k]) for k in ("kernel", "stride", "padding",
                                                                               "dilation"))
        n, _, h, w = x.shape
        oh, ow = (kernels.conv_output_size(*args) for args in zip((h, w), kernel, stride, padding, dilation))
        tile_values, operands = self.tiles * self.weights.out_per_group, self.weights.k
        operand_bytes = operands * self.weights.matrix.element_size()
        budget = TILE_BYTES
        if self._triton_applies(x.device):  # the operands and the accumulators: no tile values are stored
            budget = kernels.PATCH_BYTES
            per_sample = oh * ow * groups * (operand_bytes + self.weights.out_per_group * 16)
        elif self._fused_applies(x.device):  # the tile values (int32 / float32 / float64) and the operands
            value_bytes = 8 if self.weights.plan.path == "float64" else 4
            per_sample = oh * ow * groups * (tile_values * value_bytes + operand_bytes)
        else:  # float64 values and their temporaries
            per_sample = oh * ow * groups * (tile_values + operands) * 8 * 3
        step = max(1, budget // max(per_sample, 1))
        outs = []
        for start in range(0, max(n, 1), step):  # an empty batch still gives an (0, O, OH, OW) result
            patches = kernels.conv2d_patches(x[start:start + step], z_in, self.weights.plan, kernel, stride, padding,
                                             dilation, groups)  # (G, n*OH*OW, K) in the plan's dtype
            acc = self.dot(patches, sample_ids[start:start + step])  # (G, n*OH*OW, O/G)
            acc = acc.view(groups, -1, oh, ow, acc.shape[-1]).permute(1, 0, 4, 2, 3)  # (n, G, O/G, OH, OW)
            outs.append(acc.reshape(acc.shape[0], groups * acc.shape[2], oh, ow))
        return torch.cat(outs)

    def linear_acc(self, x: torch.Tensor, z_in: int, sample_ids: torch.Tensor) -> torch.Tensor:
        """Codes (N, K) -> accumulators (N, O) int64 in ADC steps, bias included."""
        return self.dot(kernels.centred(x, z_in, self.weights.plan).unsqueeze(0), sample_ids)[0]

    def dot(self, a: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """Operands a (G, M, K) = x - z_in - offset (the plan's), rows sample-major -> accumulators (G, M, O/G) in
        ADC steps."""
        if self._triton_applies(a.device):
            return self.dot_triton(a, sample_ids)
        if self.weights.plan.path == "int_mm":
            return self._readout(_tile_sums_int8(a, self.matrix, self.tile), sample_ids, None, self.tile_shift)
        weights = self._perturbed_weights(sample_ids)
        p = _tile_sums(a, weights, self.tile, len(sample_ids))  # (G, T, M, O) analog tile values
        exact = None
        if self.diagnostics and not exact_weights(self.hw):
            exact = torch.matmul(a.double(), self.matrix.double())  # (G, M, O): exact below 2^53
        return self._readout(p, sample_ids, exact)

    def _readout(self, p: torch.Tensor, sample_ids: torch.Tensor, exact: torch.Tensor | None = None,
                 shift: torch.Tensor | None = None) -> torch.Tensor:
        """Tile values p (G, T, M, O) + shift (G, T, O) -> analog noise, ADC, accumulator -> (G, M, O) int64 in ADC
        steps.

        ``exact`` (G, M, O) is the exact accumulator for the diagnostics; None: p's tiles sum to it. On the CPU the
        compiled one-pass kernel (fused_cpu) does it where it applies, else the torch path (the reference).
        """
        if self._fused_applies(p.device):
            return self._readout_fused(p, sample_ids, exact, shift)
        if shift is not None:
            p = p.to(torch.int64) + shift.unsqueeze(2)
        return self._readout_torch(p, sample_ids, exact)

    def _triton_applies(self, device: torch.device) -> bool:
        """The whole tile step runs as one Triton kernel (photosim.hardware.fused_triton) on a CUDA device with
        Triton, for exact weights whose operands give the kernel exact tile sums (int8 ones: int32 sums, float ones:
        float32 sums; fused_triton.operand_path), no custom noise and no ADC calibration."""
        if device.type != "cuda" or importlib.util.find_spec("triton") is None:
            return False
        dtype = self.weights.plan.dtype
        return (exact_weights(self.hw) and not self.hw.noise.custom.function and self.calibration is None
                and fused_triton.operand_path(dtype, dtype, self.full_scale) is not None)

    def dot_triton(self, a: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """dot by photosim.hardware.fused_triton's kernel: tile sums, noise, ADC and accumulator in one pass, the
        diagnostics from its exact sums. Used on CUDA (and by the tests under the Triton interpreter)."""
        step = self.step
        out = fused_triton.tile_step(a, self.matrix, sample_ids, fused_triton.Readout.of(self), self._bias_codes(step),
                                     exact=self.diagnostics, shift=self.tile_shift)
        self._record(out.acc, step, out.overflowed, out.clipped, self.tiles * out.acc.numel(), out.exact)
        return out.acc

    def _fused_applies(self, device: torch.device) -> bool:
        """The compiled CPU readout gives the torch path's bits: tile values on the CPU, no calibration observer, no
        custom noise, and no float64 shot noise (torch's float64 square root is not correctly rounded on the CPU)."""
        float64_shot = bool(self.hw.noise.shot.sigma) and self.tile_dtype == torch.float64
        return (device.type == "cpu" and self.calibration is None and not self.hw.noise.custom.function
                and not float64_shot)

    def _readout_fused(self, p: torch.Tensor, sample_ids: torch.Tensor, exact: torch.Tensor | None,
                       shift: torch.Tensor | None) -> torch.Tensor:
        """_readout by photosim.hardware.fused_cpu (imported here: numba loads only when a layer needs it)."""
        from photosim.hardware import fused_cpu

        fs, step, cfg = self.full_scale, self.step, self.hw.accumulator
        coefficients = {"output": self._sigmas["output"] * fs, "shot": self._sigmas["shot"]}
        noise = {name: (rng.key(self.seed, self.repeat, name, self.index), c) for name, c in coefficients.items() if c}
        acc, counts = fused_cpu.readout(p, sample_ids, self.tile_dtype, noise, fs, step, self.adc_bits,
                                        (cfg.bits, cfg.overflow, cfg.bias_at), self.bias, self._bias_codes(step),
                                        exact, self.diagnostics, shift)
        self.stats.add(LayerStats(outputs=acc.numel(), overflowed=counts.overflowed, tile_values=p.numel(),
                                  clipped=counts.clipped, signal_power=counts.signal_power,
                                  error_power=counts.error_power, max_abs_acc=counts.max_abs_acc))
        return acc

    def _readout_torch(self, p: torch.Tensor, sample_ids: torch.Tensor, exact: torch.Tensor | None) -> torch.Tensor:
        """_readout as torch tensor operations: any device, calibration, custom noise."""
        noise = self.hw.noise
        if self.calibration is not None:
            self.calibration.update(p.abs())
        if self.diagnostics and exact is None:
            exact = p.sum(dim=1, dtype=torch.float64)
        fs = self.full_scale
        p = p.to(self.tile_dtype)
        for name, sigma in self._sigmas.items():
            if sigma:
                p = TILE_NOISE[name](p, sigma, fs, self._normal_like(p, sample_ids, name))
        if noise.custom.function:
            context = {"layer": self.name, "full_scale": fs, "tile": self.tile, "sample_ids": sample_ids,
                       "normal": lambda: self._normal_like(p, sample_ids, "custom").double()}
            p = _custom_noise(noise.custom.function, self.name, p, context)
        step = self.step
        codes, clipped = digitize(p, step, self.adc_bits)  # (G, T, M, O) int64
        bias = self._bias_codes(step)
        acc, overflowed = self._accumulate(codes, None if bias is None else bias.unsqueeze(1))  # (G, M, O)
        clips = 0 if self.adc_bits is None else int(clipped.sum())  # the ideal readout never clips
        self._record(acc, step, overflowed, clips, clipped.numel(), exact)
        return acc

    def _bias_codes(self, step: float) -> torch.Tensor | None:
        """The bias (G, O) int64 in ADC steps (None: no integer bias)."""
        return None if self.bias is None else torch.round(self.bias.double() / step).to(torch.int64)

    def _accumulate(self, codes: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """ADC codes (G, T, M, O) and bias (G, 1, O) in tile order into the accumulator -> (G, M, O), overflows.

        A plain sum where no running sum can leave the range (|bias| + T * max |code| fits), else accumulate().
        """
        cfg = self.hw.accumulator
        largest = _largest_abs(codes) * codes.shape[1] + (0 if bias is None else _largest_abs(bias))
        if largest <= max_int(cfg.bits, signed=True):
            acc = codes[:, 0] if codes.shape[1] == 1 else codes.sum(dim=1)  # codes is ours to add the bias into
            return (acc if bias is None else acc.add_(bias)), 0
        acc, overflowed = accumulate(codes.permute(0, 2, 3, 1), bias, cfg.bits, cfg.overflow, cfg.bias_at)
        return acc, int(overflowed.sum())

    def _perturbed_weights(self, sample_ids: torch.Tensor) -> torch.Tensor:
        """Weights (G, K, O) in the plan's dtype, with chip error (float64); with read noise one copy per sample
        (N, G, K, O)."""
        noise, w = self.hw.noise, self.matrix
        if noise.weight_static.sigma:
            e = rng.normal(tuple(w.shape), self.seed, self.repeat, "weight_static", self.index, w.device).double()
            w = WEIGHT_NOISE[noise.weight_static.kind](w, noise.weight_static.sigma, self.w_max, e)
        if noise.weight_read.sigma:
            e = rng.normal_per_sample(tuple(w.shape), sample_ids, self.seed, self.repeat, "weight_read", self.index,
                                      w.device).double()
            w = WEIGHT_NOISE[noise.weight_read.kind](w.unsqueeze(0), noise.weight_read.sigma, self.w_max, e)
        return w

    def _normal_like(self, p: torch.Tensor, sample_ids: torch.Tensor, stream: str) -> torch.Tensor:
        """Standard normals shaped like p (G, T, N*P, O) in p's dtype: element (g, t, n*P + pos, o) is element
        ((g*T + t)*P + pos)*O + o of sample_ids[n]'s stream, so the numbers do not depend on the batch."""
        g, t, m, o = p.shape
        e = rng.normal_per_sample((g, t, m // max(len(sample_ids), 1), o), sample_ids, self.seed, self.repeat,
                                  stream, self.index, p.device)  # (N, G, T, P, O)
        return e.permute(1, 2, 0, 3, 4).reshape(g, t, m, o).to(p.dtype)

    def _record(self, acc: torch.Tensor, step: float, overflowed: int, clipped: int, tile_values: int,
                exact: torch.Tensor | None) -> None:
        """Add this batch's overflow, clip and (with diagnostics) SNR counts to the stats."""
        batch = LayerStats(outputs=acc.numel(), overflowed=overflowed, tile_values=tile_values, clipped=clipped,
                           max_abs_acc=_largest_abs(acc))
        if exact is not None:
            exact = exact.double()  # int64 exact sums would overflow when squared
            if self.bias is not None:
                exact = exact + self.bias.unsqueeze(1)
            batch.signal_power = float(exact.pow(2).sum())
            batch.error_power = float((acc.double() * step - exact).pow(2).sum())
        self.stats.add(batch)


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
