"""The bundle's Python package (``scripts`` is the model-zoo name for it).

Importing it makes CPU arithmetic flush denormal floats to zero, as TensorFlow and JAX do by default. On Intel CPUs
every operation on a denormal runs in slow microcode: HD-BET on a real head reaches them and one TCGA-LGG volume
took 400 s instead of 17 s on 2 Xeon cores. The flag belongs to each thread and a new thread inherits it, so it is
set here, before torch starts its worker threads, rather than around one call (a worker started earlier would stay
slow). Nothing a score depends on lives below 1e-38.
"""

import torch

torch.set_flush_denormal(True)
