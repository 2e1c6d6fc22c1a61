"""The registry and the contract every registered strategy keeps."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from oodguard.harvest import STRATEGIES, Pool, Strategy, get_strategy, select

ALL = sorted(STRATEGIES)


def test_registry_lists_every_strategy():
    assert set(STRATEGIES) == {"random", "entropy", "margin", "least-confidence", "coreset", "badge", "sisom",
                               "sisom-diverse", "aloe", "lfosa", "jsosal", "open-quota"}
    for name, cls in STRATEGIES.items():
        assert issubclass(cls, Strategy) and cls.name == name
        assert isinstance(get_strategy(name), cls)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError) as error:
        get_strategy("bald")
    assert "bald" in str(error.value) and all(name in str(error.value) for name in STRATEGIES)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("budget", [1, 7, 59, 60, 75])
def test_contract(name, budget, mixed_pool):
    pool, context = mixed_pool
    first = get_strategy(name).select(pool, budget, seed=3, context=context)
    assert len(first) == min(budget, len(pool))
    assert len(np.unique(first.indices)) == len(first.indices)
    assert first.indices.min() >= 0 and first.indices.max() < len(pool)
    assert len(first.reasons) == len(first) and all(isinstance(r, str) and r for r in first.reasons)
    again = select(name, pool, budget, seed=3, context=context)
    assert first.indices.tolist() == again.indices.tolist() and first.reasons == again.reasons


@pytest.mark.parametrize("name", ALL)
def test_empty_pool(name, mixed_pool):
    _, context = mixed_pool
    selection = get_strategy(name).select(Pool.empty(8, 5), 5, seed=0, context=context)
    assert len(selection) == 0 and selection.reasons == []


def test_harvest_imports_neither_torch_nor_sklearn():
    code = ("import sys, oodguard.harvest; "
            "assert 'torch' not in sys.modules and 'sklearn' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_parameter_the_strategy_does_not_read_is_refused_with_the_ones_it_does(mixed_pool):
    pool, context = mixed_pool
    aloe = dataclasses.replace(context, params={"tprr": 0.9})
    with pytest.raises(ValueError, match=r"strategy 'aloe' has no parameter\(s\) \['tprr'\]; its parameters: score"):
        get_strategy("aloe").select(pool, 5, context=aloe)
    with pytest.raises(ValueError, match=r"'random' has no parameter\(s\) \['k'\]; its parameters: none"):
        get_strategy("random").select(pool, 5, context=dataclasses.replace(context, params={"k": 2}))
    for name, cls in STRATEGIES.items():  # every declared parameter comes with its default
        assert all("default" in text for text in cls.params.values()), name
