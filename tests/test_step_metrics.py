"""A step's metrics travel as one tensor (one all-reduce, one host read) and come back by name."""

from __future__ import annotations

import torch

from upcycle.train.distributed import Dist
from upcycle.train.step_metrics import StepMetrics, mean_over_ranks

CPU = Dist(0, 1, 0, torch.device("cpu"))


def moe_metrics(scale: float = 1.0, dropping: bool = True) -> StepMetrics:
    aux_L = torch.tensor([1.0, 2.0, 3.0]) * scale
    dropped_L = torch.tensor([0.125, 0.25, 0.5]) * scale if dropping else None
    dropped = dropped_L.mean() if dropped_L is not None else torch.tensor(0.0)
    return StepMetrics(torch.tensor(4.0) * scale, aux_L.sum(), torch.tensor(0.5) * scale, dropped, aux_L, dropped_L)


def test_the_packed_order_is_lm_aux_z_dropped_then_each_layer():
    packed = moe_metrics().pack()
    assert packed.dtype == torch.float32
    expected = [4.0, 6.0, 0.5, (0.125 + 0.25 + 0.5) / 3, 1.0, 2.0, 3.0, 0.125, 0.25, 0.5]
    assert packed.tolist() == torch.tensor(expected).tolist()
    dropless = moe_metrics(dropping=False).pack()  # no dropped per layer; a dropped fraction of 0
    assert dropless.tolist() == [*packed[:3].tolist(), 0.0, *packed[4:7].tolist()]


def test_unpack_gives_back_every_term_by_name():
    metrics = moe_metrics()
    back = metrics.unpack(metrics.pack().double())
    for name in ("lm", "aux", "z", "dropped", "aux_per_layer_L", "dropped_per_layer_L"):
        mine, theirs = getattr(metrics, name), getattr(back, name)
        assert theirs.shape == mine.shape and theirs.tolist() == mine.double().tolist(), name
    assert moe_metrics(dropping=False).unpack(moe_metrics(dropping=False).pack()).dropped_per_layer_L is None


def test_a_steps_sum_and_mean_are_term_by_term():
    first, second = moe_metrics(), moe_metrics(3.0)
    assert torch.equal((first + second).pack(), first.pack() + second.pack())
    means, norm = mean_over_ranks(first + second, 2, torch.tensor(1.5), CPU)
    assert torch.equal(means.pack(), (first.pack() + second.pack()).double() / 2)
    assert norm == 1.5


def test_the_record_has_per_layer_fields_only_for_moe_layers_and_dropping_only_with_capacity():
    assert moe_metrics().per_layer_record() == {
        "aux_loss_per_layer": [1.0, 2.0, 3.0],
        "dropped_fraction": moe_metrics().dropped.item(),
        "dropped_fraction_per_layer": [0.125, 0.25, 0.5],
    }
    assert moe_metrics(dropping=False).per_layer_record() == {"aux_loss_per_layer": [1.0, 2.0, 3.0]}
    zero = torch.tensor(0.0)
    dense = StepMetrics(torch.tensor(2.0), zero, zero, zero, torch.zeros(0), None)
    assert dense.pack().tolist() == [2.0, 0.0, 0.0, 0.0]
    assert dense.per_layer_record() == {}
