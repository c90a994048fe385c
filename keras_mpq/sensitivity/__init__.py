"""keras_mpq.sensitivity.metrics."""
