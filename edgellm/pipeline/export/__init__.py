"""Exporters: ONNX (with KV cache, int8) and GGUF (F32/F16 written with gguf-py, quantized by llama.cpp)."""
