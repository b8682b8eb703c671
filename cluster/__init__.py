"""Ray and hardware: accelerator detection, worker placement, fault outcomes, worker pools.

This package knows Ray and devices, never model internals.
"""

import lazy_loader

# Submodules import on first use, so importing one does not pay for the others (Ray, pandas,
# JAX's dtypes): the command line starts in a fraction of a second.
__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submodules=[
    "connect", "faults", "hardware", "pool",
])
