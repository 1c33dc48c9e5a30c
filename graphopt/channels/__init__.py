"""Channel dependencies and the surgery that removes channels.

:mod:`.analysis` couples every channel of every tensor to the channels it must be pruned with
(residual adds, concat, split, reshape, grouped conv, norms, attention heads) and groups them,
with the rules in :mod:`.rules_modules`, :mod:`.rules_calls`, :mod:`.rules_shapes` and
:mod:`.rules_attention` over the element index of :mod:`.coupling`; :mod:`.surgery` removes
chosen units from the parameters and the graph's shape constants, and replays a saved plan. Passes read the groups and call the
surgery, never the analysis' internals.
"""

from .analysis import ChannelAnalysis
from .records import Group, Member, Rewrite, Space

__all__ = ["ChannelAnalysis", "Group", "Member", "Rewrite", "Space"]
