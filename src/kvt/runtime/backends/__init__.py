"""Stage backends: run a named stage of the stage table on a dict of tensors."""
