"""Triton kernels of minimamba: the chunked SSD scan (forward and backward) and its GPU benchmark.

`ssd_chunk_scan` has the contract of `minimamba.ssd.ssd_chunked`; see `kernels/ssd_triton.py`.
Importing this package imports Triton; run `python -m kernels.bench` on a GPU for timings.
"""

from kernels.ssd_triton import ssd_chunk_scan

__all__ = ["ssd_chunk_scan"]
