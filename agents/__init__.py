"""Search agents of autoprune (installed as ``autoprune.agents``).

Every searcher shares one interface::

    from autoprune.agents import search
    result = search("ddpg", task, "flops=0.25", seed=0, evaluations=300)
    result.best.accuracy, result.best_ratios, len(result.history)

Each searcher declares its options once, as one typed model (``DDPGSearcher.options_type`` is
:class:`~autoprune.agents.ddpg.DDPGOptions`); ``options_model(name)`` is that model as a config's
``search.options.<name>`` takes it.
"""

from autoprune.agents import baselines, ddpg, evolution, netadapt
from autoprune.agents.base import Record, Searcher, SearchError, SearchResult
from autoprune.agents.options import SearchOptions
from autoprune.agents.registry import SEARCHERS, get_searcher, options_model, register, search

__all__ = [
    "SEARCHERS",
    "Record",
    "SearchError",
    "SearchOptions",
    "SearchResult",
    "Searcher",
    "baselines",
    "ddpg",
    "evolution",
    "get_searcher",
    "netadapt",
    "options_model",
    "register",
    "search",
]
