"""torch-only build pipeline: model, tokenizer, train, distill, export, quantize, select."""
