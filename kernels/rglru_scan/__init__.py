"""The RG-LRU linear scan h_t = a_t * h_{t-1} + x_t as a kernel package.

Entry point: ``rglru_scan(x, a, h0, *, implementation=None, ...)`` (``api.rglru_scan``). It
imports on CPU-only machines: accelerator kernels load on first use. Modules:

* ``api``: validation, backend choice (``resolve_implementation``), dispatch.
* ``block_sizes``: the frozen ``BlockSizes`` tiling and its helpers.
* ``reference``: the ``lax.scan`` oracle.
* ``sequential``, ``associative``: portable JAX implementations.
* ``pallas_tpu``, ``pallas_gpu``: Pallas kernels, imported on first use only (import
  them by full name; they are deliberately not imported here).

``griffin_batch.kernels`` itself is a namespace package (the ``kernels/`` folder has no
``__init__.py``): see the README's layout section for why.
"""

from griffin_batch.kernels.rglru_scan import api, associative, block_sizes, reference, sequential
from griffin_batch.kernels.rglru_scan.api import rglru_scan

__all__ = ["api", "associative", "block_sizes", "reference", "rglru_scan", "sequential"]
