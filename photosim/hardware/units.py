"""Physical constants, unit factors and decibels: the SI arithmetic every optical law shares."""

from __future__ import annotations

Q_E = 1.602176634e-19  # elementary charge, C
K_B = 1.380649e-23  # Boltzmann constant, J/K
H_PLANCK = 6.62607015e-34  # Planck constant, J s
C_LIGHT = 299_792_458.0  # speed of light in vacuum, m/s
MW, NA, GHZ, PA = 1e-3, 1e-9, 1e9, 1e-12  # unit -> SI factors


def db_loss(db: float) -> float:
    """Power transmission of a loss in dB: 10^(-dB/10)."""
    return 10.0 ** (-db / 10.0)
