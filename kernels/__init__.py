"""Hand-written kernels of minimamba, each tested against its PyTorch reference:

- `ssd_chunk_scan`: the chunked SSD scan (forward and backward) in Triton, with the contract of
  `minimamba.ssd.ssd_chunked`; see `kernels/ssd_triton.py`, `kernels/bench.py` for its GPU benchmark, and
  `kernels/offline.py` to compile it for a GPU (and time its host side) on a machine without one;
- `kernels/decode_cpu.c` (loaded by `kernels/decode_cpu.py`): the fused one-token decoding step on a CPU,
  the reference being `Mamba2LM._step_torch`.

`ssd_chunk_scan` is imported lazily, on first use, so that `python -m kernels.bench --cpu-smoke` can set
TRITON_INTERPRET=1 before Triton is imported. Run `python -m kernels.bench` on a GPU for timings.
"""

__all__ = ["ssd_chunk_scan"]


def __getattr__(name):
    if name == "ssd_chunk_scan":
        from kernels.ssd_triton import ssd_chunk_scan

        return ssd_chunk_scan
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
