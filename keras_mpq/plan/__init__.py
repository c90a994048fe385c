"""keras_mpq.plan."""
