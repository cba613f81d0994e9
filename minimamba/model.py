"""The Mamba2 language model: embedding → n_layer × (RMSNorm → Mamba2 mixer → add) → RMSNorm → tied head.

Symbols follow the glossary in `minimamba/ssd.py`; sizes are named like the config fields:
D = d_model, E = d_inner = expand·D, H = nheads, P = headdim, N = d_state, G = ngroups, K = d_conv,
conv_dim = E + 2·G·N (the channels [x | B | C] of the convolution), V = vocab_size, Vp = the vocabulary
padded to a multiple of `pad_vocab_size_multiple`. Shapes are written (batch, seqlen, ...) = (b, l, ...).
In shapes D is d_model; the glossary's skip connection D (H,) is the parameter `Mamba2Mixer.D`.

One deviation in arrangement (not in arithmetic) from mamba_ssm: its Block computes "add → norm → mixer"
and carries the residual separately so it can fuse the add into the norm kernel; here each block is the
textbook pre-norm residual `residual = residual + mixer(norm(residual))`, which is the same function.
As in mamba_ssm, the residual stream is kept in float32 (`residual_in_fp32`) and both RMSNorms compute
in float32.

Two ways to run the model:
  * `model(input_ids)` runs every token in parallel with the chunked SSD scan (training, scoring, prefill);
  * `model.step(token_ids, cache)` runs one token with the recurrence, O(1) time and memory per token.
`generate` prefills the prompt with the first and decodes with the second.
"""

import logging
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minimamba.config import Mamba2Config
from minimamba.ssd import ssd_chunked, ssd_step

log = logging.getLogger("minimamba")

BACKENDS = ("auto", "torch", "triton")
DECODE_BACKENDS = ("auto", "torch", "c")


def gpu_too_old(device):
    """Why an NVIDIA GPU `device` is older than what Triton supports and what computes in bfloat16 (compute
    capability 8.0: Ampere, Hopper and later; a T4 or V100 is older, and there Triton's bfloat16 dots fail to
    compile), or None for a newer GPU and for any other device (a CPU, an AMD GPU under ROCm, whose "capability"
    is its gfx architecture, or "cuda" where torch has no CUDA: nothing to run there)."""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return None
    return (f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; Triton and bfloat16 "
            "arithmetic need 8.0 or newer")


class OneOf:
    """An attribute that takes only one of `choices`: a typo (model.backend = "torhc") is an error that says
    so, not a backend of that name run and logged."""

    def __init__(self, choices, what):
        self.choices, self.what = choices, what

    def __set_name__(self, owner, name):
        self.stored = "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.stored)

    def __set__(self, obj, value):
        if value not in self.choices:
            raise ValueError(f"unknown {self.what} {value!r}; choose one of {self.choices}")
        object.__setattr__(obj, self.stored, value)  # (a plain attribute: not a parameter, buffer or module)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · w, computed in float32, returned in `out_dtype` (default: x's)."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))  # (d,): (D,) in the model's norms

    def forward(self, x, out_dtype=None):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(out_dtype or x.dtype)


class GatedRMSNorm(nn.Module):
    """y = RMSNorm(y · silu(z)) · w, normalised over groups of `group_size` channels (E/G), in float32.

    This is mamba_ssm's RMSNormGated with norm_before_gate=False: the gate is applied *before* the norm.
    """

    def __init__(self, d, group_size, eps=1e-5):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(d))  # (d,): (E,) in the mixer

    def forward(self, y, z):
        dtype = y.dtype
        y = y.float() * F.silu(z.float())  # (..., E)
        y = y.unflatten(-1, (-1, self.group_size))  # (..., G, E/G)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        y = y.flatten(-2)  # (..., E)
        return (y * self.weight.float()).to(dtype)


@dataclass
class InferenceCache:
    """The whole memory of a Mamba2 LM during generation; its size does not grow with the context."""

    conv: torch.Tensor  # (n_layer, b, K-1, conv_dim): the last K-1 inputs of each causal conv (pre-conv xBC)
    ssm: torch.Tensor  # (n_layer, b, H, P, N) float32 (float64 for a float64 model): the SSM state h of every head
    seqlen_offset: int = 0  # tokens consumed so far

    def nbytes(self):
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()


def decode_linear(x, layer: nn.Linear, blocks=8):
    """layer(x) for the few rows x (b, in) of a decoding step, where reading the weights is the whole cost.

    On a CPU, BLAS's matrix-vector product runs on one core, which reads memory at ~60% of what all cores
    read together; so the output rows are cut into `blocks` groups computed as one batched product, which
    PyTorch spreads over its intra-op threads (~1.7× faster at 2 threads on the benchmark machine, the same
    speed at 1 thread; see the README's decode row). Elsewhere, or when the rows do not split evenly, it is
    plain `layer(x)`. Each output is the same dot product either way (up to the summation order).
    """
    w = layer.weight  # (out, in)
    if x.device.type != "cpu" or w.shape[0] % blocks or torch.get_num_threads() == 1:
        return layer(x)
    w = w.view(blocks, w.shape[0] // blocks, w.shape[1]).transpose(1, 2)  # (k, in, out/k), k = blocks
    y = torch.bmm(x.expand(blocks, *x.shape), w)  # (k, b, out/k)
    y = y.transpose(0, 1).reshape(x.shape[0], layer.weight.shape[0])  # (b, out)
    return y if layer.bias is None else y + layer.bias


def causal_conv1d(x, history, weight, bias=None):
    """Depthwise causal convolution over time, channel-last.

    x (b, l, conv_dim) the new inputs, history (b, K-1, conv_dim) the K-1 inputs before them (zeros at the
    start), weight (conv_dim, 1, K), bias (conv_dim,). out[t] = bias + Σ_k weight[:, 0, k] · xpad[t + k] with
    xpad = [history, x]. Returns out (b, l, conv_dim) and the new history (b, K-1, conv_dim). Written as K
    shifted multiply-adds: for the tiny K = 4 this is much faster on a CPU than a grouped convolution,
    forward and backward.
    """
    l, K = x.shape[1], weight.shape[-1]
    xpad = torch.cat([history, x], dim=1)  # (b, K-1+l, conv_dim)
    w = weight[:, 0].to(x.dtype)  # (conv_dim, K)
    # the k = 0 term, (b, l, conv_dim); the loop adds the others
    out = xpad[:, 0:l] * w[:, 0] if bias is None else torch.addcmul(bias.to(x.dtype), xpad[:, 0:l], w[:, 0])
    for k in range(1, K):
        out = torch.addcmul(out, xpad[:, k:k + l], w[:, k])  # (b, l, conv_dim)
    return out, xpad[:, l:]  # (b, l, conv_dim), the new history (b, K-1, conv_dim)


class Mamba2Mixer(nn.Module):
    """The Mamba2 mixer: in_proj → conv+SiLU on [x|B|C] → SSD → gated RMSNorm → out_proj."""

    def __init__(self, cfg: Mamba2Config, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        E, H, G, N = cfg.d_inner, cfg.nheads, cfg.ngroups, cfg.d_state
        self.in_proj = nn.Linear(cfg.d_model, cfg.in_proj_dim, bias=cfg.bias)  # rows [z | x | B | C | dt]
        # a depthwise Conv1d holds the weights, (conv_dim, 1, K) in mamba_ssm's layout; `causal_conv1d` applies them
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(H))  # (H,)
        self.A_log = nn.Parameter(torch.zeros(H))  # (H,): A = -exp(A_log) < 0
        self.D = nn.Parameter(torch.ones(H))  # (H,): the skip connection y += D·x
        self.norm = GatedRMSNorm(E, group_size=E // G, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(E, cfg.d_model, bias=cfg.bias)
        self.split_sizes = [E, cfg.conv_dim, H]  # z, xBC, dt
        self.xBC_sizes = [E, G * N, G * N]  # x, B, C

    def forward(self, u, scan, conv_state=None, ssm_state=None):
        """u (b, l, D) -> (b, l, D). With a cache (conv_state, ssm_state), start from it and update it."""
        cfg = self.cfg
        b, l, _ = u.shape
        H, P, G, N, K = cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state, cfg.d_conv
        z, xBC, dt = self.in_proj(u).split(self.split_sizes, dim=-1)  # (b,l,E), (b,l,conv_dim), (b,l,H)

        # history (b, K-1, conv_dim): the conv's last K-1 inputs, zeros without a cache
        history = xBC.new_zeros(b, K - 1, cfg.conv_dim) if conv_state is None else conv_state.to(xBC.dtype)
        xBC, history = causal_conv1d(xBC, history, self.conv1d.weight, self.conv1d.bias)  # (b, l, conv_dim)
        if conv_state is not None:
            conv_state.copy_(history)
        x, B, C = F.silu(xBC).split(self.xBC_sizes, dim=-1)  # (b,l,E), (b,l,G·N), (b,l,G·N)

        dt = F.softplus(dt.float() + self.dt_bias.float())  # (b, l, H), positive
        A = -torch.exp(self.A_log.float())  # (H,), negative; in float32 so fp16 weights cannot make it -inf
        # the scan's contract (minimamba/ssd.py): x (b, l, H, P), dt (b, l, H), A (H,), B and C (b, l, G, N)
        y, final_state = scan(
            x.reshape(b, l, H, P), dt, A, B.reshape(b, l, G, N), C.reshape(b, l, G, N),
            D=self.D, initial_state=ssm_state,
        )  # (b, l, H, P), (b, H, P, N)
        if ssm_state is not None:
            ssm_state.copy_(final_state)
        y = self.norm(y.reshape(b, l, H * P), z)  # (b, l, E)
        return self.out_proj(y)  # (b, l, D)

    def step(self, u, conv_state, ssm_state):
        """One token: u (b, D) -> (b, D), updating conv_state (b, K-1, conv_dim) and ssm_state (b, H, P, N)."""
        cfg = self.cfg
        H, P, G, N = cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
        z, xBC, dt = decode_linear(u, self.in_proj).split(self.split_sizes, dim=-1)  # (b,E), (b,conv_dim), (b,H)

        xBC, history = causal_conv1d(xBC[:, None].to(conv_state.dtype), conv_state, self.conv1d.weight,
                                     self.conv1d.bias)  # (b, 1, conv_dim)
        conv_state.copy_(history)
        x, B, C = F.silu(xBC[:, 0]).to(u.dtype).split(self.xBC_sizes, dim=-1)  # (b,E), (b,G·N), (b,G·N)

        dt = F.softplus(dt.float() + self.dt_bias.float())  # (b, H)
        A = -torch.exp(self.A_log.float())  # (H,)
        # ssd_step's contract: x (b, H, P), dt (b, H), A (H,), B and C (b, G, N)
        y, _ = ssd_step(ssm_state, x.view(-1, H, P), dt, A, B.view(-1, G, N), C.view(-1, G, N), D=self.D,
                        out=ssm_state)  # (b, H, P); ssm_state (b, H, P, N) updated in place
        y = self.norm(y.reshape(-1, H * P), z)  # (b, E)
        return decode_linear(y, self.out_proj)  # (b, D)


class Block(nn.Module):
    """Pre-norm residual block: residual + mixer(RMSNorm(residual))."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg, layer_idx)


class Mamba2LM(nn.Module):
    """Mamba2 language model. `backend` picks the SSD scan used by `forward`:

    "torch"  the chunked PyTorch reference (`minimamba.ssd.ssd_chunked`), any device;
    "triton" the hand-written Triton kernel (`kernels.ssd_chunk_scan`), CUDA (or CPU under TRITON_INTERPRET=1);
    "auto"   "triton" for CUDA tensors (on a GPU of compute capability 8.0 or newer, which Triton supports:
             `gpu_too_old`), "torch" otherwise. The choice and its reason are logged and `scan_backend()` reports
             it; a missing Triton on CUDA is an error, never a silent fallback.

    `decode_backend` picks the one-token step used by `step` and `generate`:
    "torch"  `_step_torch`, the PyTorch reference, any device and dtype;
    "c"      the fused C step (`kernels/decode_cpu.c`), float32 weights on a CPU, built with the system compiler;
    "auto"   "c" where it can run, "torch" otherwise, saying why (`decoder` logs the choice).
    """

    backend = OneOf(BACKENDS, "scan backend")  # what `backend=` asked for (the constructor's, or set later)
    decode_backend = OneOf(DECODE_BACKENDS, "decode backend")

    def __init__(self, config: Mamba2Config, backend="auto", decode_backend="auto"):
        super().__init__()
        self.config, self.backend, self.decode_backend = config, backend, decode_backend  # (checked by OneOf)
        self.decode_backend_used = None  # (name, why) of the last `decoder`, logged when it changes
        # The chunk length of the scan is a free parameter (the result does not depend on it): None means the
        # checkpoint's (256), except 64 for the torch scan on a CPU, where it measured fastest (`scan_chunk`)
        self.scan_chunk_size = None
        self.gradient_checkpointing = False
        self._logged_backend = None
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.reset_parameters()

    # initialisation (mamba_ssm's, for training from scratch) ---------------------------------------
    @torch.no_grad()
    def reset_parameters(self, seed=None):
        cfg = self.config
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        nn.init.normal_(self.embedding.weight, std=cfg.initializer_range, generator=gen)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=cfg.initializer_range, generator=gen)
        for block in self.layers:
            m = block.mixer
            for lin in (m.in_proj, m.out_proj):  # PyTorch's Linear default: U(±1/sqrt(fan_in))
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=gen)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            bound = 1 / math.sqrt(cfg.d_conv)  # PyTorch's Conv1d default, fan_in = 1·K
            nn.init.uniform_(m.conv1d.weight, -bound, bound, generator=gen)
            if m.conv1d.bias is not None:
                nn.init.uniform_(m.conv1d.bias, -bound, bound, generator=gen)
            # dt = softplus(dt_bias) log-uniform in [dt_min, dt_max]: dt_bias = softplus⁻¹(dt) = dt + log(1 - e^-dt)
            u = torch.rand(cfg.nheads, generator=gen)  # (H,)
            dt = torch.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))  # (H,)
            dt = dt.clamp(min=cfg.dt_init_floor)
            m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            # (H,), positive: this A is minus the glossary's, which the mixer computes as -exp(A_log)
            A = torch.empty(cfg.nheads).uniform_(cfg.A_init_min, cfg.A_init_max, generator=gen)
            m.A_log.copy_(torch.log(A))
            m.D.fill_(1.0)
            m.norm.weight.fill_(1.0)
            block.norm.weight.fill_(1.0)
            # out_proj writes into the residual stream: scale by 1/sqrt(n_layer) (GPT-2's rule)
            m.out_proj.weight /= math.sqrt(cfg.n_layer)
        self.norm_f.weight.fill_(1.0)

    # the scan backend -----------------------------------------------------------------------------
    def scan_backend(self, device=None):
        """The backend `forward` uses for tensors on `device` (default: the model's device)."""
        device = torch.device(device) if device is not None else self.embedding.weight.device
        if self.backend != "auto":
            return self.backend
        return "triton" if device.type == "cuda" and not gpu_too_old(device) else "torch"

    def scan_chunk(self, device=None):
        """The chunk length the scan uses on `device`: `scan_chunk_size` if set, else 64 for the torch scan on
        a CPU (where it measured fastest, bench.py) and the checkpoint's (256) elsewhere."""
        device = torch.device(device) if device is not None else self.embedding.weight.device
        if self.scan_chunk_size is not None:  # (the scans refuse one that is no positive integer)
            return self.scan_chunk_size
        return 64 if self.scan_backend(device) == "torch" and device.type == "cpu" else self.config.chunk_size

    def _scan(self, device):
        name = self.scan_backend(device)
        Q = self.scan_chunk(device)
        if name == "torch":
            scan = lambda *a, **kw: ssd_chunked(*a, **kw, chunk_size=Q)  # noqa: E731
        else:
            try:
                from kernels import ssd_chunk_scan, ssd_triton
            except ImportError as e:
                raise RuntimeError(
                    f"the 'triton' scan backend needs Triton ({e}). Install it (pip install triton) "
                    "or build the model with backend='torch'."
                ) from e

            def scan(x, dt, A, B, C, D=None, initial_state=None):
                return ssd_chunk_scan(x, dt, A, B, C, Q, D=D, initial_state=initial_state, return_final_state=True)
        if name != self._logged_backend:  # (said once, not at every forward)
            why = "requested" if self.backend != "auto" else f"auto on {device.type}"
            too_old = gpu_too_old(device)
            if too_old:
                why += f"; {too_old}" + (": Triton may fail there" if name == "triton" else "")
            if name == "triton":
                why += "; launches: " + ("direct after the first" if ssd_triton.DIRECT_LAUNCH else "all through Triton "
                                         f"({ssd_triton.DIRECT_LAUNCH_OFF_BECAUSE or 'DIRECT_LAUNCH set to False'})")
            level = logging.WARNING if name == "triton" and too_old else logging.INFO
            log.log(level, "minimamba: SSD scan backend = %s (%s)", name, why)
            self._logged_backend = name
        return scan

    # forward, step, generate ---------------------------------------------------------------------
    def forward(self, input_ids, cache: InferenceCache = None, num_last_tokens=0):
        """input_ids (b, l) -> logits (b, l, Vp) (only the last `num_last_tokens` positions if > 0).

        With `cache`, the scan starts from the cached state and leaves the new state in it (prefill).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seqlen), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError(f"input_ids holds no tokens (shape {tuple(input_ids.shape)}): the model predicts from "
                             f"at least one token. {_FROM_NOTHING}")
        check_ids_have_rows(input_ids, self.embedding.num_embeddings, "input_ids")
        if cache is not None:
            self.check_cache(cache, input_ids.shape[0])
        scan = self._scan(input_ids.device)
        residual = self.embedding(input_ids)  # (b, l, D)
        dtype = residual.dtype
        if self.config.residual_in_fp32:
            residual = residual.float()
        for i, block in enumerate(self.layers):
            # layer i's cache: conv_state (b, K-1, conv_dim), ssm_state (b, H, P, N), updated in place
            states = (cache.conv[i], cache.ssm[i]) if cache is not None else (None, None)
            if self.gradient_checkpointing and self.training and cache is None:
                out = checkpoint(self._block, block, residual, dtype, scan, use_reentrant=False)
            else:
                out = self._block(block, residual, dtype, scan, *states)
            residual = residual + out.to(residual.dtype)  # (b, l, D)
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        if num_last_tokens > 0:
            residual = residual[:, -num_last_tokens:]  # (b, num_last_tokens, D)
        return self.lm_head(self.norm_f(residual, out_dtype=dtype))  # (b, l or num_last_tokens, Vp)

    @staticmethod
    def _block(block, residual, dtype, scan, conv_state=None, ssm_state=None):
        return block.mixer(block.norm(residual, out_dtype=dtype), scan, conv_state, ssm_state)

    @property
    def ssm_dtype(self):
        """The dtype of the SSM state, the one the scan computes in: float32, or float64 for a float64 model."""
        return torch.promote_types(torch.float32, self.embedding.weight.dtype)

    def _cache_shapes(self, batch_size):
        """{field: (names of the dimensions, sizes)} of a cache for `batch_size` sequences."""
        cfg = self.config
        return {"conv": (("n_layer", "batch", "d_conv-1", "conv_dim"),
                         (cfg.n_layer, batch_size, cfg.d_conv - 1, cfg.conv_dim)),
                "ssm": (("n_layer", "batch", "nheads", "headdim", "d_state"),
                        (cfg.n_layer, batch_size, cfg.nheads, cfg.headdim, cfg.d_state))}

    def allocate_cache(self, batch_size, device=None, dtype=None):
        """An empty (all-zero) inference cache for `batch_size` sequences. `dtype` is the conv history's
        (default: the weights'); the SSM state is in `ssm_dtype`."""
        shapes = self._cache_shapes(batch_size)
        device = device or self.embedding.weight.device
        dtype = dtype or self.embedding.weight.dtype
        conv = torch.zeros(shapes["conv"][1], device=device, dtype=dtype)  # (n_layer, b, K-1, conv_dim)
        ssm = torch.zeros(shapes["ssm"][1], device=device, dtype=self.ssm_dtype)  # (n_layer, b, H, P, N)
        return InferenceCache(conv, ssm)

    def check_cache(self, cache: InferenceCache, batch_size):
        """Raise ValueError, naming the difference, unless `cache` fits this model and `batch_size` sequences:
        the shapes, the device and the dtypes that `allocate_cache` gives. (A cache of another model would
        otherwise be read and written out of bounds by the C step.)"""
        fix = f"take a cache for this model from model.allocate_cache({batch_size})"
        device = self.embedding.weight.device
        for field, (names, want) in self._cache_shapes(batch_size).items():
            t = getattr(cache, field)
            if tuple(t.shape) != want:
                # each size that differs, beside what it must be: "batch" the number of sequences of this call
                # (its token ids, or the decoder's batch_size), the others the model's config
                diff = ", ".join(f"{n} {have} (this call: {w} sequence{'s' * (w != 1)})" if n == "batch" else
                                 f"{n} {have} (this model: {w})" for n, have, w in zip(names, t.shape, want)
                                 if have != w) or f"{t.dim()} dimensions (this model: {len(want)})"
                raise ValueError(f"cache.{field} has shape {tuple(t.shape)}, not ({', '.join(names)}) = {want}: "
                                 f"{diff} (a cache of another model or batch size?); {fix}")
            if t.device != device:
                raise ValueError(f"cache.{field} is on {t.device} and the model on {device}: {fix}")
        if not cache.conv.is_floating_point():
            raise ValueError(f"cache.conv must be floating point, got {cache.conv.dtype}: {fix}")
        if cache.ssm.dtype != self.ssm_dtype:
            raise ValueError(f"cache.ssm is {cache.ssm.dtype}, and this model's SSM state is {self.ssm_dtype}: {fix}")

    def step(self, token_ids, cache: InferenceCache):
        """One decoding step: token_ids (b,) -> logits (b, Vp), advancing `cache` by one token.

        Picks the backend on every call (3 ms at 130m on a 2-core VM, a sixth of a C step); a loop of steps
        should call `decoder` once.
        """
        check_step_ids(token_ids)
        return self.decoder(token_ids.shape[0])(token_ids, cache)

    def decoder(self, batch_size):
        """The one-token step for caches of `batch_size` sequences: a function (token_ids, cache) -> logits
        that advances the cache, computed by the decode backend (see the class docstring)."""
        if self.decode_backend == "torch":
            return self._use_decoder("torch", "requested", self._step_torch)
        from kernels import decode_cpu

        try:
            c_step = decode_cpu.DecodeStep(self, batch_size)
        except decode_cpu.UnsupportedModel as e:  # not float32 on the CPU
            if self.decode_backend == "c":
                raise ValueError(f"decode_backend='c' cannot run this model: {e.why}. Use decode_backend='torch' "
                                 "or 'auto'.") from None
            return self._use_decoder("torch", f"auto: {e.why}", self._step_torch)
        except RuntimeError as e:  # no working C compiler
            if self.decode_backend == "c":
                raise
            return self._use_decoder("torch", f"auto, and the C step failed to build: {e}", self._step_torch,
                                     level=logging.WARNING)
        huge = f"{c_step.huge_bytes / 2**20:.0f} MiB of weights on 2 MiB pages"
        huge += f" ({c_step.huge_why})" if c_step.huge_why else ""
        return self._use_decoder("c", f"{self.decode_backend}; {huge}", c_step)

    def _use_decoder(self, name, why, impl, level=logging.INFO):
        if (name, why) != self.decode_backend_used:
            log.log(level, "minimamba: decode step = %s (%s)", name, why)
            self.decode_backend_used = (name, why)

        def step(token_ids, cache):
            logits = impl(token_ids, cache)  # (b, Vp)
            cache.seqlen_offset += 1
            return logits

        return step

    @torch.no_grad()
    def _step_torch(self, token_ids, cache: InferenceCache):
        """The decode step in PyTorch (the reference of the C step): token_ids (b,) -> logits (b, Vp)."""
        check_step_ids(token_ids)
        check_ids_have_rows(token_ids, self.embedding.num_embeddings, "token_ids")
        self.check_cache(cache, token_ids.shape[0])
        residual = self.embedding(token_ids)  # (b, D)
        dtype = residual.dtype
        if self.config.residual_in_fp32:
            residual = residual.float()
        for i, block in enumerate(self.layers):  # layer i's cache: (b, K-1, conv_dim) and (b, H, P, N)
            out = block.mixer.step(block.norm(residual, out_dtype=dtype), cache.conv[i], cache.ssm[i])
            residual = residual + out.to(residual.dtype)  # (b, D)
        return decode_linear(self.norm_f(residual, out_dtype=dtype), self.lm_head)  # (b, Vp)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                 eos_token_id=None, seed=None, attention_mask=None):
        """Prefill the prompts, then decode `max_new_tokens` tokens for all of them, one step at a time.

        input_ids is either
          * a tensor (b, l) -> (b, l + new) ids: b prompts of l tokens each, taken as they are. There is no
            padding: every row is a whole prompt, and a pad token in a row is read as text, changing what
            follows. For prompts of different lengths pass a list:
          * a list of prompts of any lengths (each a list of ids or a 1-D tensor) -> a list of 1-D tensors,
            each prompt followed by its new tokens, up to and including its first `eos_token_id`. Each prompt
            is prefilled alone (exact: no padding), then all are decoded as one batch; prompt i gets what
            `generate(prompt_i[None], ..., seed=row_seed(seed, i))` gives it alone.
        The ids keep the prompt's integer dtype (torch.long or torch.int; a prompt given as a list: torch.long).
        `attention_mask` is refused: a recurrent state cannot skip pad tokens (pass a list instead).

        Greedy when temperature == 0, else sampling with `sample`'s top_k / top_p (numbers, or 0-dim tensors).
        With `seed` (an integer), row i draws from its own generator seeded `row_seed(seed, i)` (row 0: `seed`
        itself), so its tokens do not depend on the other rows, nor repeat a row of a call with another seed;
        such a batch samples row by row, one torch.multinomial per row and token, which a large batch pays
        for (both ways draw b * vocab random numbers, but one call can spread them over threads). Without
        `seed`, all rows are sampled in one call from torch's global generator. Sampling
        only ever picks real tokens (ids < vocab_size), never the padding rows of the embedding. After a row
        emits `eos_token_id` it is padded with it; generation stops early once every row has.
        """
        temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                                 or not -2**63 <= seed < 2**64):
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**64), got {seed!r}")
        V = self.config.vocab_size
        if attention_mask is not None:
            raise ValueError("generate takes no attention_mask: a Mamba2 state cannot skip pad tokens, so a padded "
                             "batch would generate wrong tokens. Pass the prompts unpadded, as a list of lists of "
                             "ids or of 1-D tensors of any lengths.")
        if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if eos_token_id is not None and not (isinstance(eos_token_id, numbers.Integral) and 0 <= eos_token_id < V):
            raise ValueError(f"eos_token_id must be an id in [0, {V}), got {eos_token_id!r}")
        ragged = isinstance(input_ids, (list, tuple))
        if ragged:
            if not input_ids:
                raise ValueError("generate got an empty list of prompts")
            device = self.embedding.weight.device
            prompts = [torch.as_tensor(p, device=device) for p in input_ids]  # b prompts, prompt i (l_i,)
            for i, p in enumerate(prompts):
                if p.dim() != 1:
                    raise ValueError(f"prompt {i} must be a list of ids or a 1-D tensor, got shape {tuple(p.shape)}")
                check_prompt(p[None], V, f"prompt {i}")  # p[None]: (1, l_i)
            # each prompt prefilled alone, then the caches and the last logits stacked into one batch
            caches = [self.allocate_cache(1) for _ in prompts]  # b caches of batch 1
            logits = torch.cat([self(p[None], cache=c, num_last_tokens=1)[:, -1]
                                for p, c in zip(prompts, caches)])  # (b, Vp)
            cache = InferenceCache(torch.cat([c.conv for c in caches], dim=1),  # (n_layer, b, K-1, conv_dim)
                                   torch.cat([c.ssm for c in caches], dim=1),  # (n_layer, b, H, P, N)
                                   seqlen_offset=max(len(p) for p in prompts))  # (the rows differ: the longest)
        else:
            check_prompt(input_ids, V, "input_ids")
            device = input_ids.device
            cache = self.allocate_cache(input_ids.shape[0], device=device)
            logits = self(input_ids, cache=cache, num_last_tokens=1)[:, -1]  # (b, Vp)

        b = logits.shape[0]
        step = self.decoder(b)
        gens = None if seed is None else [torch.Generator(device=device).manual_seed(row_seed(int(seed), i))
                                          for i in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=device)  # (b,)
        new = []
        for i in range(max_new_tokens):
            logits = logits[:, :V]  # (b, V): never a padding row
            tok = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gens)  # (b,)
            if eos_token_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
                done |= tok == eos_token_id
            new.append(tok[:, None])  # (b, 1)
            if (eos_token_id is not None and bool(done.all())) or i == max_new_tokens - 1:
                break
            logits = step(tok, cache)
        new = torch.cat(new, dim=1) if new else torch.zeros(b, 0, dtype=torch.long, device=device)  # (b, new)
        if not ragged:
            return torch.cat([input_ids, new.to(input_ids.dtype)], dim=1)  # (b, l + new)
        out = []
        for p, row in zip(prompts, new):  # p (l_i,), row (new,)
            if eos_token_id is not None and bool((row == eos_token_id).any()):
                row = row[: int((row == eos_token_id).nonzero()[0]) + 1]  # (new_i,): up to its first EOS
            out.append(torch.cat([p, row.to(p.dtype)]))  # (l_i + new_i,)
        return out

    def save_pretrained(self, directory):
        """Write config.json + pytorch_model.bin in the state-spaces layout (see `minimamba.hub`)."""
        from minimamba.hub import save_pretrained

        return save_pretrained(self, directory)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())  # a tied head is counted once
        return n - self.embedding.weight.numel() if non_embedding else n


_FROM_NOTHING = ("To generate from nothing, start from the EOS id (0, <|endoftext|>, for the GPT-NeoX tokenizer "
                 "of the public checkpoints).")


def check_step_ids(token_ids):
    """A decoding step takes one integer id per sequence: token_ids (b,)."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1:
        shape = tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise ValueError(f"token_ids must be a 1-D tensor (batch,): one id per sequence, got {shape}; "
                         "for ids (batch, 1) pass ids[:, 0]")
    check_id_values(token_ids, "token_ids", read=False)


def check_id_values(ids, what, below=None, within="", hint="", read=True):
    """`ids` hold integer ids (torch.long or torch.int), and, where `read`, each in [0, below) (`within` names that
    range, `hint` says what may have gone wrong; reading the ids waits for a GPU)."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what} must be integer ids (torch.long or torch.int), got {ids.dtype}")
    if read and ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= below:
            raise ValueError(f"{what} holds token id {lo if lo < 0 else hi}, outside the {within} [0, {below}): {hint}")


def check_ids_have_rows(ids, rows, what):
    """Ids for the embedding: integers, and on a CPU each in [0, rows) (the padding rows included). On a GPU the
    range is not read (that would wait for the GPU at every call; an id out of range is a device-side assert)."""
    check_id_values(ids, what, rows, "embedding's rows", "were the ids made by another tokenizer, or for a model "
                    "of another vocabulary?", read=ids.device.type == "cpu")


def check_prompt(ids, vocab_size, what):
    """A prompt for `generate`: a tensor (b, l) of integer ids in [0, vocab_size), l >= 1 (one host sync)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{what} must be a (batch, seqlen) tensor of ids, got {shape}. Pass one prompt as "
                         "ids[None], and prompts of different lengths as a list of lists or of 1-D tensors")
    if ids.shape[1] == 0:
        raise ValueError(f"{what} is empty: the model needs at least one token to predict from. {_FROM_NOTHING}")
    check_id_values(ids, what, vocab_size, "vocabulary", "were the ids made by another tokenizer?")


def row_seed(seed, i):
    """The seed of row i of `generate(..., seed=seed)`: `seed` itself for row 0 (one prompt with seed s samples as
    seeded s), else a 64-bit integer mixed from (seed, i) by NumPy's SeedSequence (stable across NumPy versions).
    Row i of a batch gives what `generate(prompt_i[None], ..., seed=row_seed(seed, i))` gives, and calls with
    seeds 0, 1, 2, ... share no row (seed + i did: row 1 of seed 0 was row 0 of seed 1)."""
    if i == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**64, i]).generate_state(1, dtype=np.uint64)[0])


def _scalar(x):
    """A 0-dim tensor or array, or a NumPy scalar, as a Python number (its .item()); anything else as it is."""
    if isinstance(x, (torch.Tensor, np.ndarray, np.generic)) and x.ndim == 0:
        return x.item()
    return x


def check_sampling(temperature, top_k, top_p):
    """Return (temperature, top_k, top_p) as Python numbers (0-dim tensors and NumPy scalars are taken), or raise
    ValueError unless temperature is a finite number >= 0, top_k None or an integer >= 1, and top_p None or a
    number in (0, 1]. Checked whatever the temperature, so that a bad value is never ignored."""
    temperature, top_k, top_p = _scalar(temperature), _scalar(top_k), _scalar(top_p)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    return temperature, top_k, top_p


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Pick one id per row of logits (b, V). temperature 0 = argmax; top_k / top_p restrict the support
    to the k most likely ids (and any tied with the k-th) / the smallest set whose probability reaches top_p,
    before sampling (top_p = 1 keeps every id). `generator`: a torch.Generator (or None: torch's global one),
    all rows drawn in one torch.multinomial; or a list of one generator per row, each row drawn alone from its own."""
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)  # (b,)
    logits = logits.float()  # (b, V)
    # shifted so that each row's largest is 0 (softmax does not change): a tiny temperature then sends the
    # others to -inf (probability 0), where logits / temperature alone would overflow to inf and give NaNs;
    # one so small that float32 rounds it to 0 (below ~1.4e-45) would make the largest 0/0 = NaN: it is raised to
    # float32's smallest normal number
    temperature = max(temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:  # (at 1 the float32 cumsum can pass 1 and would drop tail ids)
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (b, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the ids ranked above
        drop_sorted = mass_before >= top_p  # keep ids until the kept mass reaches top_p (always the top one)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (b, V), in the ids' order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (b, V)
    if isinstance(generator, (list, tuple)):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {probs.shape[0]} rows of logits")
        picks = [torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)]  # b × (1,)
        return torch.cat(picks) if picks else probs.new_zeros(0, dtype=torch.long)  # (b,)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (b,)
