"""Runtime: the stage table, stage backends, schedulers, the pipeline and the ``kvt`` CLI."""
