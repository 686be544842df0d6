"""Searcher options: one typed model per searcher, the same refusals in the Python API and in
configs (an unknown option, a wrong type, an out-of-bounds value, a rule between options), each
naming the option."""

from __future__ import annotations

import pytest
from autoprune.agents import SEARCHERS, SearchError, get_searcher, search
from autoprune.agents.registry import options_model

from autoprune.config import ConfigError

BUDGET = "flops=0.5"
EVALUATIONS = {"ddpg": 6, "random": 6, "evolution": 6, "sensitivity": 60}
EXTRA = {"ddpg": {"warmup_episodes": 2}}  # a warm-up below the evaluation budget

# searcher -> (option, a value of the wrong type, a value out of bounds)
MALFORMED = {
    "ddpg": ("batch_size", "big", 0),
    "evolution": ("crossover", "half", 1.5),
    "netadapt": ("r0", "some", 0),
    "sensitivity": ("grid", "fine", [0.2, 1.5]),
    "global": ("bisection_steps", "many", 65),
}
WITH_OPTIONS = sorted(MALFORMED)


def _search(name: str, task, **options):
    return search(name, task, BUDGET, evaluations=EVALUATIONS.get(name),
                  **{**EXTRA.get(name, {}), **options})  # fmt: skip


def test_every_searcher_declares_its_options_once():
    """Each searcher's options are one model; the config schema is that model plus the two
    per-searcher config keys, with the same defaults."""
    assert set(SEARCHERS) >= {"ddpg", "evolution", "netadapt", "random", "sensitivity",
                              "uniform", "global"}  # fmt: skip
    assert set(MALFORMED) == {n for n, c in SEARCHERS.items() if c.options_type.model_fields}
    for name, cls in SEARCHERS.items():
        schema = options_model(name)
        assert issubclass(schema, cls.options_type)
        assert set(schema.model_fields) == set(cls.options_type.model_fields) | {
            "evaluations",
            "seeds",
        }
        defaults = schema().model_dump(exclude={"evaluations", "seeds"})
        assert defaults == cls.options_type().model_dump()


@pytest.mark.parametrize("name", sorted(SEARCHERS))
def test_an_unknown_option_is_refused(default_task, name):
    with pytest.raises(
        SearchError, match=rf"unknown option\(s\) \['colour'\] for searcher '{name}'"
    ):
        _search(name, default_task, colour="red")
    with pytest.raises(ConfigError, match=rf"search\.options\.{name}\.colour: Extra inputs"):
        _config({name: {"colour": "red"}}, name)


@pytest.mark.parametrize("name", WITH_OPTIONS)
def test_a_wrong_type_is_refused_naming_the_option(default_task, name):
    option, wrong, _ = MALFORMED[name]
    with pytest.raises(SearchError, match=rf"^{name} option {option}={wrong!r}: Input should be"):
        _search(name, default_task, **{option: wrong})
    with pytest.raises(ConfigError, match=rf"search\.options\.{name}\.{option}: Input should be"):
        _config({name: {option: wrong}}, name)


@pytest.mark.parametrize("name", WITH_OPTIONS)
def test_an_out_of_bounds_value_is_refused_naming_the_option(default_task, name):
    option, _, out = MALFORMED[name]
    where = f"{option}.1" if isinstance(out, list) else option  # a list names its item
    with pytest.raises(SearchError, match=rf"^{name} option {where}=[^:]*: Input should be"):
        _search(name, default_task, **{option: out})
    with pytest.raises(ConfigError, match=rf"search\.options\.{name}\.{where}: Input should be"):
        _config({name: {option: out}}, name)


@pytest.mark.parametrize(
    ("name", "options", "where", "words"),
    [
        ("evolution", {"population": 4, "parents": 5}, "parents",
         "parents (5) cannot exceed the population (4)"),
        ("ddpg", {"episode_credit": False, "fill_budget": True}, "fill_budget",
         "fill_budget needs episode_credit and store_applied"),
        ("ddpg", {"algo": "td3", "warmup_prior": "uniform"}, "warmup_prior",
         "warmup_prior 'uniform' needs algo ddpg"),
    ],
)  # fmt: skip
def test_a_rule_between_options_names_the_option(default_task, name, options, where, words):
    with pytest.raises(SearchError) as err:
        _search(name, default_task, **options)
    assert str(err.value).startswith(f"{name} option {where}: {words}")
    with pytest.raises(ConfigError) as err:
        _config({name: options}, name)
    assert str(err.value).startswith(f"search.options.{name}.{where}: {words}")


def test_a_config_records_only_the_options_it_was_given():
    """A default that the given options rule out steps aside without being recorded as given:
    the config keeps what its user wrote."""
    checked = options_model("ddpg").model_validate({"algo": "td3", "noise": "normal"})
    assert checked.warmup_prior == "random" and checked.fill_budget is True  # type: ignore[attr-defined]
    assert checked.model_dump(exclude_unset=True) == {"algo": "td3", "noise": "normal"}
    assert options_model("ddpg").model_validate({"seeds": 3}).model_dump(exclude_unset=True) == {
        "seeds": [3]
    }


def test_options_are_typed_on_the_searcher(default_task):
    searcher = get_searcher("evolution")(default_task, BUDGET, evaluations=6, population="8")
    assert searcher.options.population == 8  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        get_searcher("uniform")(default_task, BUDGET, 0)  # type: ignore[misc]


def _config(options: dict, name: str):
    from autoprune.runner.config import experiment_config

    return experiment_config({"search": {"searchers": [name], "options": options}})
