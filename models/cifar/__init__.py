"""The CIFAR architectures (32×32 input); importing this package registers every one of them in MODELS (each module
of it registers its family: adding one is adding a file)."""
from ctkd.registry import import_submodules

import_submodules(__name__, __path__)
