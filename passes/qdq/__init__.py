"""``qdq``: the pass (:mod:`.qdq`) and its private library: where quantize/dequantize pairs go
(:mod:`.placement`), the rewrites from float to fake-quant to integer form (:mod:`.rewrite`)
and cross-layer equalization (:mod:`.equalize`)."""

from .qdq import QDQ, QDQOptions

__all__ = ["QDQ", "QDQOptions"]
