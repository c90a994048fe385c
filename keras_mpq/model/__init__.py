"""keras_mpq.model."""
