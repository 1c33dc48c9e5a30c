"""What a quantized graph holds: observers and the affine maths (:mod:`.observers`), the
fake-quant and int8 layers (:mod:`.modules`) and the dynamic int8 Linear (:mod:`.dynamic`).

The ``qdq`` pass (``graphopt.passes.qdq``) writes these; backends, cost and saved models read
them, so they live in the core.
"""
