"""Triton kernels of minimamba: the chunked SSD scan (forward and backward) and its GPU benchmark.

`ssd_chunk_scan` has the contract of `minimamba.ssd.ssd_chunked`; see `kernels/ssd_triton.py`.
It is imported lazily, on first use, so that `python -m kernels.bench --cpu-smoke` can set
TRITON_INTERPRET=1 before Triton is imported. Run `python -m kernels.bench` on a GPU for timings.
"""

__all__ = ["ssd_chunk_scan"]


def __getattr__(name):
    if name == "ssd_chunk_scan":
        from kernels.ssd_triton import ssd_chunk_scan

        return ssd_chunk_scan
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
