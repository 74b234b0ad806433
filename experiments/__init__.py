"""Research tools outside the shipped bundle: the comparison, cross-validation summary and the benchmark."""
