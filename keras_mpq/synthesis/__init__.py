"""keras_mpq.synthesis.generators."""
