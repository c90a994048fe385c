"""keras_mpq.quantization."""
