"""The shot-noise limit of an optical dot product, reproduced with photosim's engine (docs/photonics.md, "The
standard quantum limit").

Wang et al., "An optical neural network using less than 1 photon per multiplication", Nat. Commun. 13, 123
(2022), Fig. 1c: the N element-wise products of a dot product are summed as light on one detector, so with
epsilon detected photons per multiplication the detector counts epsilon * N photons; shot noise (Poisson
counting) then gives the dot product a relative rms error of 1 / sqrt(epsilon * N), an SNR of epsilon * N. This
script builds one linear layer of N inputs on a shot-noise-limited incoherent core (no loss, no dark current, no
receiver noise, no RIN, a responsivity of one electron per photon), sets the laser power that puts epsilon
photons per multiplication on the detector, and measures the SNR the engine produces against the exact integer
dot product (run_hardware's layer report). Writes docs/img/published_limit.png::

    python experiments/published_limit.py
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from photosim.experiments.workflow import run_hardware
from photosim.hardware.photonic_config import quantum_limit_responsivity
from photosim.hardware.units import C_LIGHT, GHZ, H_PLANCK, MW
from photosim.ir.format import Node, QParams, QuantizedModel

WAVELENGTH_NM = 1550.0
CLOCK_GHZ = 1.0  # one symbol of 1 ns: the receiver integrates over it (noise bandwidth clock / 2)
X_MAX, W_MAX = 255, 128  # unsigned 8-bit inputs; signed 8-bit weights (Wmax = 2^7)
WEIGHT = 127  # the largest weight code: a weight device sends (1 + 127/128) / 2 of its channel to one photodiode
LENGTHS = (16, 64, 256)  # N, the products summed on one detector (one tile)
PHOTONS = (0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1000.0)  # detected photons per multiplication
OUTPUTS, SAMPLES = 64, 256  # independent readouts of the same dot product: 16,384 noise draws per point
FIGURE = Path(__file__).resolve().parent.parent / "docs" / "img" / "published_limit.png"


def photon_energy_j(wavelength_nm: float = WAVELENGTH_NM) -> float:
    """Energy of one photon, J: h c / lambda (1.2816e-19 J at 1550 nm)."""
    return H_PLANCK * C_LIGHT / (wavelength_nm * 1e-9)


def dot_product_input(length: int, seed: int = 0) -> torch.Tensor:
    """A fixed input vector of ``length`` codes in 1..Xmax (every channel carries some light)."""
    return torch.randint(1, X_MAX + 1, (length,), generator=torch.Generator().manual_seed(seed))


def dot_product_model(length: int) -> QuantizedModel:
    """One linear layer of ``length`` inputs and OUTPUTS identical rows of the weight WEIGHT: OUTPUTS independent
    readouts of the same non-negative dot product per sample, as in Wang et al.'s intensity dot product."""
    inputs = QParams(1.0, 0, 8, False, 0, X_MAX)  # the float input is its own code
    outputs = QParams(1.0, 0, 8, True, -128, 127)  # the requantized output is unused: the report reads accumulators
    node = Node("dot", "linear", ["x"], [inputs], outputs, {"in_features": length, "out_features": OUTPUTS},
                w_bits=8, bias_bits=32)
    tensors = {"dot.weight": torch.full((OUTPUTS, length), WEIGHT, dtype=torch.int8),
               "dot.bias": torch.zeros(OUTPUTS, dtype=torch.int32),
               "dot.weight_scale": torch.tensor(1.0)}
    return QuantizedModel("x", (length,), inputs, [node], tensors, "dot")


def product_light(x: torch.Tensor) -> float:
    """Mean light of one multiplication as a fraction of a full-scale channel: x w / (Xmax Wmax), the intensity
    each product puts on the detector."""
    return float(x.double().mean()) * WEIGHT / (X_MAX * W_MAX)


def laser_power_mw(photons: float, x: torch.Tensor) -> float:
    """Laser power per channel, mW, that puts ``photons`` detected photons per multiplication of ``x`` on the
    detector in one symbol: photons * (h c / lambda) * clock / product_light (no loss, unit quantum efficiency)."""
    return photons * photon_energy_j() * CLOCK_GHZ * GHZ / product_light(x) / MW


def shot_noise_limited_core(power_mw: float) -> dict:
    """An incoherent core with shot noise as its only noise: one tile per dot product, ideal readout, no loss,
    dark current, receiver noise, RIN or weight error; one electron per photon."""
    return {"tile": None, "photonics": {
        "architecture": "incoherent", "laser_power_mw": power_mw, "wavelength_nm": WAVELENGTH_NM,
        "responsivity_a_per_w": quantum_limit_responsivity(WAVELENGTH_NM), "clock_ghz": CLOCK_GHZ,
        "coupling_loss_db": 0.0, "waveguide_loss_db": 0.0, "device_loss_db": 0.0, "fan_out": 1,
        "splitter_excess_db": 0.0, "extinction_ratio_db": None, "dark_current_na": 0.0, "tia_noise_pa_rthz": 0.0}}


def published_snr(length: int, photons: float) -> float:
    """Wang et al. (2022), Fig. 1c: epsilon * N photons reach the detector; shot noise gives an SNR of epsilon * N."""
    return length * photons


def measured_snr(length: int, photons: float, samples: int = SAMPLES, seed: int = 0) -> float:
    """The SNR photosim's engine produces (mean exact accumulator^2 / mean squared error over samples * OUTPUTS
    readouts, noise drawn from ``seed``) for a dot product of ``length`` products at ``photons`` detected photons
    per multiplication."""
    x = dot_product_input(length)
    images = x.double().expand(samples, length).clone()
    test = (images, torch.zeros(samples, dtype=torch.int64))
    run = run_hardware(dot_product_model(length), test, shot_noise_limited_core(laser_power_mw(photons, x)), seed=seed)
    return 10.0 ** (float(run.layers["snr_db"].iloc[0]) / 10.0)


def plot(measured: dict[int, list[float]], path: Path = FIGURE) -> None:
    """Relative rms error against detected photons per multiplication: the published law as lines, photosim's
    measurements as points, one colour per N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    grid = [10 ** (e / 10) for e in range(-15, 36)]
    for (length, snrs), colour in zip(measured.items(), ("C0", "C1", "C2"), strict=True):
        ax.plot(grid, [1 / math.sqrt(published_snr(length, p)) for p in grid], color=colour,
                label=f"N = {length}: 1 / sqrt(N eps) (Wang et al. 2022)")
        ax.plot(PHOTONS, [1 / math.sqrt(s) for s in snrs], "o", color=colour, label=f"N = {length}: photosim")
    ax.set(xscale="log", yscale="log", xlabel="detected photons per multiplication, eps",
           ylabel="relative rms error of the dot product",
           title="Shot-noise limit of an optical dot product (1550 nm, 1 ns symbol)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    """Sweep N and the photons per multiplication, print measured against published SNR, write the figure."""
    measured: dict[int, list[float]] = {}
    print(f"{'N':>5} {'photons/mult':>12} {'laser mW':>10} {'published SNR':>13} {'photosim SNR':>12} {'ratio':>7}")
    for row, length in enumerate(LENGTHS):
        measured[length] = []
        for column, photons in enumerate(PHOTONS):
            snr = measured_snr(length, photons, seed=row * len(PHOTONS) + column)  # new noise draws at each point
            measured[length].append(snr)
            published = published_snr(length, photons)
            print(f"{length:5d} {photons:12g} {laser_power_mw(photons, dot_product_input(length)):10.3g} "
                  f"{published:13.4g} {snr:12.4g} {snr / published:7.4f}")
    plot(measured)
    print(f"wrote {FIGURE}")


if __name__ == "__main__":
    main()
