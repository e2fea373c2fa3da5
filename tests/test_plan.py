"""The hardware plan: each layer's settings resolved once and shared by the engine and the experiments."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_conv_net

from photosim.engine.executor import Engine
from photosim.errors import PhotosimError
from photosim.experiments.executors import gpus_used
from photosim.hardware.photonics import link_budget
from photosim.hardware.plan import HardwarePlan

HW = {"tile": 4, "layers": [{"match": "conv1", "noise": {"output": {"sigma": 0.01}}},
                            {"match": "grouped", "photonics": {"laser_power_mw": 2.0}}]}


def test_overrides_and_link_budget_are_resolved_once() -> None:
    model = make_conv_net()
    plan = HardwarePlan.resolve(model, HW)
    assert plan.layers["conv1"].noise.output.sigma == 0.01
    assert plan.layers["fc"].noise.output.sigma is None
    k = 4  # the grouped 1x1 conv: 4 input channels per group, so its tile of 4 is its whole dot product
    budget = link_budget(plan.layers["grouped"].photonics, k)
    assert plan.layers["grouped"].noise.output.sigma == pytest.approx(
        math.hypot(budget.sigma_shot_floor, budget.sigma_thermal))
    assert plan.layers["grouped"].noise.photocurrent.sigma == pytest.approx(budget.sigma_photocurrent)
    assert plan.is_random and plan.chips(5) == 5 and not plan.calibrated_adc
    engine = Engine(model, plan)
    assert engine.settings is plan.layers and engine.hw is plan.config
    assert HardwarePlan.resolve(model, plan) is plan


def test_ideal_plan_needs_one_chip() -> None:
    assert HardwarePlan.resolve(make_conv_net(), {"tile": 8}).chips(5) == 1


def test_a_plan_of_another_model_or_a_stray_override_is_refused() -> None:
    plan = HardwarePlan.resolve(make_conv_net(), HW)
    other = make_conv_net()
    other.nodes = other.nodes[:-1]
    with pytest.raises(PhotosimError, match="another model"):
        HardwarePlan.resolve(other, plan)
    with pytest.raises(PhotosimError, match=r"\['nope'\] match no layer"):
        HardwarePlan.resolve(make_conv_net(), {"layers": [{"match": "nope", "tile": 4}]})


def test_a_layer_whose_overrides_conflict_is_named() -> None:
    hw = {"noise": {"output": {"sigma": 0.01}}, "layers": [{"match": "fc", "photonics": {"laser_power_mw": 2.0}}]}
    with pytest.raises(PhotosimError, match="settings of layer 'fc'.*noise.output cannot be given beside photonics"):
        HardwarePlan.resolve(make_conv_net(), hw)


def test_first_sample_must_number_the_batch_within_32_bits() -> None:
    engine = Engine(make_conv_net(), HW)
    with pytest.raises(PhotosimError, match="first_sample -1 numbers"):
        engine.codes(torch.zeros(1, 3, 12, 12), first_sample=-1)
    with pytest.raises(PhotosimError, match=r"first_sample 4294967295 numbers this batch's 2 samples outside"):
        engine.codes(torch.zeros(2, 3, 12, 12), first_sample=2**32 - 1)
    assert engine.codes(torch.zeros(1, 3, 12, 12), first_sample=2**32 - 1).shape[0] == 1


def test_gpus_used_lists_the_cuda_devices_of_the_points() -> None:
    groups = [[(0, {"device": "cuda:1"}), (1, {"device": "cpu"})], [(2, {"device": "cuda"}), (3, {})]]
    assert gpus_used(groups) == ["cuda", "cuda:1"]
    assert gpus_used([[(0, {"device": "cpu"})]]) == []
