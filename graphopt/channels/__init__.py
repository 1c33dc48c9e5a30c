"""Channel dependencies and the surgery that removes channels.

:mod:`.analysis` couples every channel of every tensor to the channels it must be pruned with
(residual adds, concat, split, reshape, grouped conv, norms, attention heads) and groups them;
passes read the groups, never the analysis' internals.
"""

from .analysis import ChannelAnalysis, Group, Member, Rewrite, Space

__all__ = ["ChannelAnalysis", "Group", "Member", "Rewrite", "Space"]
