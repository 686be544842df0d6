"""Search agents of autoprune (installed as ``autoprune.agents``).

Every searcher shares one interface::

    from autoprune.agents import search
    result = search("ddpg", task, "flops=0.25", seed=0, evaluations=300)
    result.best.accuracy, result.best_ratios, len(result.history)
"""

from autoprune.agents import baselines, ddpg, evolution, netadapt
from autoprune.agents.base import Record, Searcher, SearchError, SearchResult
from autoprune.agents.registry import SEARCHERS, get_searcher, register, search

__all__ = [
    "SEARCHERS",
    "Record",
    "SearchError",
    "SearchResult",
    "Searcher",
    "baselines",
    "ddpg",
    "evolution",
    "get_searcher",
    "netadapt",
    "register",
    "search",
]
