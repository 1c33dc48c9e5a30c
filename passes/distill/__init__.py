"""``distill``: the pass (:mod:`.distill`) and its private library: the training loop
(:mod:`.loop`), the losses (:mod:`.losses`) and feature taps and pairing (:mod:`.features`)."""

from .distill import Distill

__all__ = ["Distill"]
