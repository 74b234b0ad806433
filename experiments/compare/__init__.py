"""The paper's comparison in one command: ``python -m experiments.compare`` (see ``__main__``)."""
