"""The RG-LRU linear scan h_t = a_t * h_{t-1} + x_t as a kernel package.

Entry point: ``api.rglru_scan`` (also ``kernels.rglru_scan``). Modules:

* ``api``: validation, backend choice (``resolve_implementation``), dispatch.
* ``block_sizes``: the frozen ``BlockSizes`` tiling and its helpers.
* ``reference``: the ``lax.scan`` oracle.
* ``sequential``, ``associative``: portable JAX implementations.
* ``pallas_tpu``, ``pallas_gpu``: Pallas kernels, imported on first use only (import
  them by full name; they are deliberately not imported here).
"""

from kernels.rglru_scan import api, associative, block_sizes, reference, sequential

__all__ = ["api", "associative", "block_sizes", "reference", "sequential"]
