"""The FLOPs-budget search over heads and neurons (Kwon et al. 2022's split search)."""

import itertools

import pytest
import torch

from prune_attattr.prune.search import SearchError, lowest_fraction, search_units

# MiniLM-like costs per token at T = 25 (4*d*d_h + 2*T*d_h per head, 2*d per neuron, in multiply-adds)
L, H, I = 6, 12, 96
HEAD = [4 * 384 * 32 + 2 * 25 * 32] * L
NEURON = [2 * 384] * L
FIXED = 1e5


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(L, H, generator=g) ** 3, torch.rand(L, I, generator=g) ** 3 * 1e-2


@pytest.mark.parametrize("units", ["both", "heads", "neurons"])
@pytest.mark.parametrize("balance", ["cost", "none"])
def test_meets_the_budget_and_uses_it(units, balance):
    hs, ns = _scores()
    full = FIXED + H * sum(HEAD) + I * sum(NEURON)
    floor = lowest_fraction(HEAD, NEURON, FIXED, H, I, units)
    for budget in torch.linspace(0.2, 1.0, 17).tolist():
        if budget < floor:
            with pytest.raises(SearchError, match="lowest reachable"):
                search_units(hs, ns, HEAD, NEURON, FIXED, budget, units=units, balance=balance)
            continue
        r = search_units(hs, ns, HEAD, NEURON, FIXED, budget, units=units, balance=balance)
        assert r.fraction <= budget + 1e-12
        step = {"heads": HEAD[0], "neurons": NEURON[0], "both": NEURON[0]}[units]  # the smallest unit it could still add
        assert r.fraction > budget - step / full - 1e-12 or r.fraction > 1 - 1e-12
        kept_h = L * H - sum(len(v) for v in r.pruned_heads.values())
        kept_n = L * I - sum(len(v) for v in r.pruned_neurons.values())
        assert (kept_h, kept_n) == (r.heads_kept, r.neurons_kept)
        assert r.flops == pytest.approx(FIXED + kept_h * HEAD[0] + kept_n * NEURON[0])
        if units == "heads":
            assert r.pruned_neurons == {}
        if units == "neurons":
            assert r.pruned_heads == {}


def test_joint_keeps_more_than_either_kind_alone():
    # 2 layers x 2 heads (cost 2) and 2 x 4 neurons (cost 1): one good head, two good neurons
    hs = torch.tensor([[5.0, 0.1], [0.1, 0.1]])
    ns = torch.tensor([[3.0, 3.0, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]])
    args = (hs, ns, [2.0, 2.0], [1.0, 1.0], 0.0, 0.5)
    both = search_units(*args, units="both", balance="none")
    heads = search_units(*args, units="heads", balance="none")
    neurons = search_units(*args, units="neurons", balance="none")
    assert both.fraction == heads.fraction == neurons.fraction == 0.5
    assert heads.importance == pytest.approx(6.6) and neurons.importance == pytest.approx(5.3)
    assert both.importance == pytest.approx(11.4)  # the good head, both good neurons, 4 more neurons
    assert 0 not in both.pruned_heads.get(0, []) and not {0, 1} & set(both.pruned_neurons.get(0, []))


def test_equals_brute_force_with_uniform_costs():
    """With one cost per kind and non-negative scores, the split search is an exact knapsack."""
    g = torch.Generator().manual_seed(3)
    hs, ns = torch.rand(2, 2, generator=g), torch.rand(2, 3, generator=g)
    hc, nc, fixed = 3.0, 1.0, 1.0
    units = [(s, hc) for s in hs.flatten().tolist()] + [(s, nc) for s in ns.flatten().tolist()]
    full = fixed + 4 * hc + 6 * nc
    for budget in (0.3, 0.45, 0.6, 0.8, 0.95):
        best = max(
            sum(s for (s, _), k in zip(units, keep) if k)
            for keep in itertools.product((0, 1), repeat=len(units))
            if fixed + sum(c for (_, c), k in zip(units, keep) if k) <= budget * full
        )
        r = search_units(hs, ns, [hc] * 2, [nc] * 2, fixed, budget, balance="none")
        assert r.importance == pytest.approx(best)


@pytest.mark.parametrize("balance", ["cost", "none"])
def test_kept_importance_grows_with_the_budget(balance):
    hs, ns = _scores(1)
    values = [search_units(hs, ns, HEAD, NEURON, FIXED, b, balance=balance).importance for b in torch.linspace(0.15, 1.0, 35).tolist()]
    assert all(a <= b + 1e-9 for a, b in zip(values, values[1:]))
    assert values[-1] > values[0]


def test_cost_balance_ignores_a_scale_between_kinds_and_none_does_not():
    hs, ns = _scores(2)
    a = search_units(hs, ns, HEAD, NEURON, FIXED, 0.5, balance="cost")
    b = search_units(hs, 1000 * ns, HEAD, NEURON, FIXED, 0.5, balance="cost")
    assert (a.pruned_heads, a.pruned_neurons) == (b.pruned_heads, b.pruned_neurons)
    c = search_units(hs, ns, HEAD, NEURON, FIXED, 0.5, balance="none")
    d = search_units(hs, 1000 * ns, HEAD, NEURON, FIXED, 0.5, balance="none")
    assert c.heads_kept > d.heads_kept  # raw scores: neurons worth 1000x more take the heads' budget


def test_heads_only_keeps_the_top_heads():
    hs, ns = _scores(4)
    r = search_units(hs, ns, HEAD, NEURON, FIXED, 0.8, units="heads")
    kept = torch.ones(L, H, dtype=torch.bool)
    for layer, ids in r.pruned_heads.items():
        kept[layer, ids] = False
    assert hs[kept].min() >= hs[~kept].max()


def test_already_pruned_units_are_neither_kept_nor_counted():
    hs, ns = _scores(5)
    kept_heads = [list(range(H))] * L
    kept_heads[0] = [1, 2]  # layer 0 lost 10 heads before
    kept_neurons = [list(range(I))] * L
    kept_neurons[3] = list(range(10))
    hs = hs.clone()
    hs[0] = 100.0  # even top scores of pruned heads do not bring them back
    r = search_units(hs, ns, HEAD, NEURON, FIXED, 0.6, kept_heads=kept_heads, kept_neurons=kept_neurons)
    assert set(range(3, H)) | {0} <= set(r.pruned_heads[0])
    assert set(range(10, I)) <= set(r.pruned_neurons[3])
    present = FIXED + (L * H - 10) * HEAD[0] + (L * I - 86) * NEURON[0]
    full = FIXED + L * H * HEAD[0] + L * I * NEURON[0]
    whole = search_units(hs, ns, HEAD, NEURON, FIXED, 1.0, kept_heads=kept_heads, kept_neurons=kept_neurons)
    assert whole.flops == pytest.approx(present) and whole.fraction == pytest.approx(present / full)
    assert whole.heads_kept == L * H - 10 and whole.neurons_kept == L * I - 86


def test_bad_input_is_refused():
    hs, ns = _scores()
    with pytest.raises(SearchError, match="pruning.units"):
        search_units(hs, ns, HEAD, NEURON, FIXED, 0.5, units="layers")
    with pytest.raises(SearchError, match="fraction"):
        search_units(hs, ns, HEAD, NEURON, FIXED, 1.5)
    with pytest.raises(SearchError, match="layers"):
        search_units(hs[:3], ns, HEAD, NEURON, FIXED, 0.5)
    with pytest.raises(SearchError, match="positive"):
        search_units(hs, ns, [0.0] * L, NEURON, FIXED, 0.5)
    with pytest.raises(SearchError, match="lowest reachable"):
        search_units(hs, ns, HEAD, NEURON, FIXED, 0.5, units="neurons")
