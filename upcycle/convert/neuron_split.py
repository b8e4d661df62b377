"""`--split activation`: the G shards of a copy group neurons that fire together, not neurons that sit together.

Each neuron of a layer's MLP is described by its activation magnitudes over the calibration tokens (the input of
the down projection, act(gate x) * up x). A spherical k-means finds G directions; neurons are then assigned to them
greedily, most certain first, with room for exactly F / G each (the shards of a copy must be equal). The result is
a permutation of the neurons: shard g is the g-th block of F / G. A permutation of an FFN's neurons (rows of gate
and up, columns of down) computes the same function, so the split is exact by construction.
"""

from __future__ import annotations

import torch

from upcycle.errors import SourceError


def balanced_order(features_FN: torch.Tensor, groups: int, seed: int) -> torch.Tensor:
    """A permutation of the F neurons: group 0's neurons first (each group in index order), then group 1's ..."""
    from upcycle.convert.calibration import spherical_kmeans

    neurons = features_FN.shape[0]
    if neurons % groups:
        raise SourceError(f"{neurons} neurons do not split into {groups} equal shards.", "choose another -g.")
    unit = torch.nn.functional.normalize(features_FN.float(), dim=-1)
    centres = spherical_kmeans(unit, groups, seed)
    affinity_FG = unit @ centres.T
    room = [neurons // groups] * groups
    members: list[list[int]] = [[] for _ in range(groups)]
    ranked = affinity_FG.sort(dim=1, descending=True)
    margin = ranked.values[:, 0] - (ranked.values[:, 1] if groups > 1 else 0)
    for neuron in margin.argsort(descending=True, stable=True).tolist():  # the most certain neurons choose first
        for group in ranked.indices[neuron].tolist():
            if room[group]:
                members[group].append(neuron)
                room[group] -= 1
                break
    return torch.tensor([n for group in members for n in sorted(group)], dtype=torch.long)
