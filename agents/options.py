"""Typed searcher options: the base model each searcher's options derive from, the two options
every searcher also takes in a config (``evaluations``, ``seeds``), and the error a cross-field
rule raises against the option it names.

Each searcher declares its options once, as one pydantic model: the defaults, the types and
bounds (``Field(ge=..., le=...)``), the rules between options (model validators) and no other
keys (``extra="forbid"``). The Python API, the CLI, YAML configs and the HTTP service all
validate against that model, so they refuse the same options with the same words.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model
from pydantic_core import InitErrorDetails, PydanticCustomError

CONFLICT = "option_conflict"  # the error type of a cross-field rule (see ``conflict``)


class SearchOptions(BaseModel):
    """The options of a searcher that has none; every searcher's options model derives from
    it. ``model_fields_set`` are the options given explicitly (the others keep their
    defaults)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=False)

    def settle(self, **values: Any) -> None:
        """Set options the searcher turns off by itself (a default that the given options rule
        out) without marking them as given: a config records only what its user asked for."""
        self.__dict__.update(values)


def conflict(model: SearchOptions, option: str, message: str) -> ValidationError:
    """The error of a cross-field rule, located at ``option``: raise it from a model validator
    (pydantic keeps its location, so configs report ``search.options.<searcher>.<option>``)."""
    details = InitErrorDetails(
        type=PydanticCustomError(CONFLICT, message),
        loc=(option,),
        input=getattr(model, option),
    )
    return ValidationError.from_exception_data(type(model).__name__, [details])


def _one_or_many(value: Any) -> Any:
    """One seed is a list of one."""
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


# Options every searcher takes in ``search.options.<name>`` of a config (not in the Python
# API, where they are arguments): its own evaluation budget and seeds.
Evaluations = Annotated[int, Field(ge=1, le=10_000_000)]
Seeds = Annotated[
    list[Annotated[int, Field(ge=0)]],
    BeforeValidator(_one_or_many),
    Field(min_length=1, max_length=1000),
]
CONFIG_ONLY = ("evaluations", "seeds")


@cache
def config_options(options: type[SearchOptions]) -> type[SearchOptions]:
    """The schema of ``search.options.<name>`` in a config: a searcher's options model plus
    ``evaluations`` and ``seeds``; its ``model_dump(exclude_unset=True)`` holds what was given."""
    name = options.__name__.removesuffix("Options") + "ConfigOptions"
    fields: dict[str, Any] = {
        # given or absent, never null: None only marks "not given" (the searcher's default)
        "evaluations": (Evaluations, None),
        "seeds": (Seeds, None),
    }
    return create_model(name, __base__=options, __module__=options.__module__, **fields)
