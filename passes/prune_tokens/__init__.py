"""PruneTokens: a learned router lets the least important tokens skip decoder blocks (FTP, arXiv 2412.11494)."""

from fxpress.passes.prune_tokens.prune_tokens import PruneTokens
from fxpress.passes.prune_tokens.search import SearchSettings
from fxpress.passes.prune_tokens.training import RouterTraining

__all__ = ["PruneTokens", "RouterTraining", "SearchSettings"]
