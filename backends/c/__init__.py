"""ONNX -> dependency-free C99 (static arena, const weights, float and int8 kernels)."""
