"""The growth fuzzer: random MoE configs of every class `grow` has a rule for; its rules must agree with what
transformers computes.

For each drawn config (expert count, top-k, factor, renormalisation, scoring, expert groups and whether the router
rows are tied within them), `read_growth` accepts or refuses, and the block probe (transformers' own MoE block, built
from the original and the grown config, the grown one holding the original's weights repeated) says whether the
grown block computes the same. Accepted must mean equal; refused must mean different: a rule that lets a wrong
growth through fails, and so does one that refuses a growth transformers computes exactly.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st
from moe_models import MOES, moe_config

from upcycle.convert.grow.rules import RULES, limited_groups, read_growth
from upcycle.errors import UnsupportedModelError
from upcycle.hf.moe_block_probe import probe_grown_block

pytestmark = pytest.mark.slow


@st.composite
def growths(draw: st.DrawFn) -> tuple[dict, int, bool]:
    case = draw(st.sampled_from(sorted(MOES)))
    model_type = case.split()[0]
    rule = RULES[model_type]
    experts = draw(st.sampled_from([2, 3, 4, 6, 8]))
    overrides: dict = {key: experts for key in rule.experts_keys if key in MOES[case]}
    overrides[rule.top_k_key] = draw(st.integers(1, experts))
    if rule.norm_key:
        overrides[rule.norm_key] = draw(st.booleans())
    if rule.scoring_key:
        overrides[rule.scoring_key] = draw(st.sampled_from(["softmax", "sigmoid"]))
    if rule.grouped:
        groups = draw(st.sampled_from([g for g in (1, 2, 3, 4) if experts % g == 0]))
        overrides |= {"n_group": groups, "topk_group": draw(st.integers(1, groups))}
        if groups > 1 and overrides[rule.top_k_key] > overrides["topk_group"] * experts // groups:
            overrides[rule.top_k_key] = overrides["topk_group"] * experts // groups  # what the class accepts
    tied = rule.grouped and draw(st.booleans())
    return moe_config(case, **overrides).to_dict(), draw(st.integers(2, 4)), tied


@pytest.mark.filterwarnings("ignore")
@given(growths())
def test_the_rules_agree_with_transformers(case):
    config, factor, tied = case
    rule = RULES[config["model_type"]]
    groups = limited_groups(config, rule) if tied else 0
    try:
        growth = read_growth(config, factor, tied_groups=tied)
        accepted, grown = True, growth.grown_config(config)
    except UnsupportedModelError:
        accepted, grown = False, _grown_anyway(config, factor)
    probe = probe_grown_block(config, grown, factor, groups)
    assume(not probe.problem.startswith("transformers cannot run the original"))  # a config its class rejects
    assert not probe.problem, probe.problem
    event(f"{config['model_type']}: {'accepted' if accepted else 'refused'}")
    assert probe.equivalent == accepted, (config["model_type"], accepted, probe.relative_difference)


def _grown_anyway(config: dict, factor: int) -> dict:
    """What a growth would write if the rules did not refuse it."""
    rule = RULES[config["model_type"]]
    grown = dict(config)
    for key in rule.experts_keys:
        if key in grown:
            grown[key] = grown[key] * factor
    grown[rule.top_k_key] = config[rule.top_k_key] * factor
    return grown
