"""Compute kernels; the bottom layer, importing nothing else from this project.

``kernels.rglru_scan(x, a, h0, *, implementation=None, ...)`` is the RG-LRU scan
(see ``kernels.rglru_scan.api``). It imports on CPU-only machines: accelerator kernels
load on first use.
"""

from kernels.rglru_scan import api as rglru_scan_api
from kernels.rglru_scan import block_sizes as rglru_scan_block_sizes

# The model calls ``kernels.rglru_scan(...)``, so this name is the function. It shadows
# the subpackage attribute on purpose. Import submodules with the ``from`` form
# (``from kernels.rglru_scan import api``), which resolves through sys.modules; the
# ``import kernels.rglru_scan.api as m`` form and dotted ``mock.patch`` targets walk
# attributes and hit the function instead.
rglru_scan = rglru_scan_api.rglru_scan

__all__ = ["rglru_scan", "rglru_scan_api", "rglru_scan_block_sizes"]
