"""Data: readers and the one atomic write, the datalist, the data rules, MONAI transforms, the slice cache, phantoms."""
