"""keras_mpq.base."""
