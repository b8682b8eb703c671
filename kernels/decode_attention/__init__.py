"""Decode attention over per-row ring lengths as a kernel package.

One query per row against that row's ring of keys and values, reading only the
row's first ``lengths[b]`` slots: a short row never pays for a long row's ring.
Entry point: ``decode_attention(q, keys, values, lengths, *, implementation=None)``
(``api.decode_attention``). It imports on CPU-only machines: accelerator kernels
load on first use. Modules:

* ``api``: validation, backend choice (``resolve_implementation``), dispatch.
* ``reference``: the masked dense formulation in plain JAX; the oracle, and what
  XLA runs where no kernel applies.
* ``pallas_tpu``, ``pallas_gpu``: Pallas kernels, imported on first use only.
"""

from griffin_batch.kernels.decode_attention import api, reference
from griffin_batch.kernels.decode_attention.api import decode_attention

__all__ = ["api", "decode_attention", "reference"]
