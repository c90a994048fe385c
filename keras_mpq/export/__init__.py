"""keras_mpq.export.exporter."""
