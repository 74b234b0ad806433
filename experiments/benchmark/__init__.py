"""Speed and memory benchmark: ``python -m experiments.benchmark`` (see ``__main__``)."""
