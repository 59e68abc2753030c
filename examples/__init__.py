"""Examples that live in the repository, not in the wheel: the offline demo and its tiny world (``examples.demo``)."""
