"""The fused CPU decoding step (`decode_cpu.c`): build it, check a model fits it, call it.

`Mamba2LM.step` and `generate` use it for float32 models on a CPU (`decode_backend="c"`, or "auto" when a C
compiler is found); its PyTorch reference is `Mamba2LM._step_torch`, and tests/test_decode_cpu.py checks they agree.

The C source is compiled once per machine with the system compiler (`$CC`, default `cc`) into
`$MINIMAMBA_BUILD_DIR` (default `~/.cache/minimamba/build`), named by a hash of the source, the compiler
command and the CPU, and loaded with ctypes: no build step at install time and no Python headers needed.
"""

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from minimamba.model import check_step_ids

SOURCE = Path(__file__).with_name("decode_cpu.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]


class Dims(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in
                ("n_layer", "d_model", "d_inner", "nheads", "headdim", "ngroups", "d_state", "d_conv", "vocab")]
    _fields_ += [("eps", ctypes.c_float)]


_LAYER_FIELDS = ("norm_w", "in_w", "in_b", "conv_w", "conv_b", "dt_bias", "A_log", "D", "gnorm_w", "out_w", "out_b")


class Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in _LAYER_FIELDS]


def build_dir() -> Path:
    return Path(os.environ.get("MINIMAMBA_BUILD_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache")
                / "minimamba" / "build").expanduser()


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


_lib = None


def library_path(cc) -> Path:
    """Where the library built by `cc` lives: named by a hash of the source, the flags, the compiler (the
    file `cc` resolves to and its --version, so that another or an upgraded compiler builds anew) and the CPU."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _compiler_id(cc).encode()
                         + _cpu_id().encode())
    return build_dir() / f"decode_cpu-{key.hexdigest()[:16]}.so"


def _compiler_id(cc) -> str:
    program, *args = shlex.split(cc)  # (CC may carry a wrapper or options: "ccache gcc", "gcc -m64")
    path = shutil.which(program) or program
    try:
        version = subprocess.run([path, *args, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    return f"{os.path.realpath(path)} {' '.join(args)}\n{version}"


def _compile(cc, lib_path):
    """Compile SOURCE into lib_path: into a temporary file beside it, then renamed (atomic)."""
    try:
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib_path.parent)
        os.close(fd)
    except OSError as e:
        raise RuntimeError(f"cannot write the C decode step's library to {lib_path.parent} ({e}): set "
                           "MINIMAMBA_BUILD_DIR to a writable folder, or use decode_backend='torch'") from e
    try:
        try:
            done = subprocess.run([*shlex.split(cc), *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True,
                                  text=True)
        except OSError as e:  # (CC names a file that cannot be run: not executable, not a program)
            raise RuntimeError(f"cannot run the C compiler CC={cc!r} ({e}): set CC to a working C compiler, or use "
                               "decode_backend='torch'") from e
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} with {cc} failed:\n{done.stderr.strip()}\n"
                               "Fix the compiler (it needs OpenMP: -fopenmp) or use decode_backend='torch'.")
        os.chmod(tmp, 0o755)  # as `cc -o` makes it: mkstemp's 0600 left other users unable to load it
        os.replace(tmp, lib_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _whole(path) -> bool:
    """False for an ELF library (Linux) that ends before its section header table, which the linker writes
    last: a file cut short (a full disk, a partial copy). Other formats are taken as whole."""
    with open(path, "rb") as f:
        head = f.read(64)  # the ELF64 header
    if not head.startswith(b"\x7fELF"):
        return True
    if len(head) < 64:
        return False
    if head[4:6] != b"\x02\x01":  # (read only in ELF64, little-endian: the x86-64 and arm64 Linux libraries)
        return True
    table = struct.unpack_from("<Q", head, 0x28)[0]  # e_shoff: where the section header table starts
    entry_size, entries = struct.unpack_from("<HH", head, 0x3A)  # e_shentsize, e_shnum
    return os.path.getsize(path) >= table + entry_size * entries


def load():
    """The compiled library (built on first use). Raises RuntimeError saying what to do if it cannot be built."""
    global _lib
    if _lib is not None:
        return _lib
    cc = os.environ.get("CC") or "cc"  # a command line: "gcc", "ccache gcc", "clang -march=x86-64-v3"
    try:
        program = shlex.split(cc)[0]
    except (ValueError, IndexError):  # (unbalanced quotes; only spaces)
        program = None
    if program is None or shutil.which(program) is None:
        raise RuntimeError(f"the C decode step needs a C compiler with OpenMP, and CC={cc!r} names none on PATH: "
                           "install one (e.g. apt-get install gcc) or set CC, or use decode_backend='torch'")
    lib_path = library_path(cc)
    if not lib_path.exists():
        _compile(cc, lib_path)
    try:
        if not _whole(lib_path):  # (loading a cut ELF file can kill the process with SIGBUS)
            raise OSError(f"{lib_path} is shorter than its ELF header says")
        lib = ctypes.CDLL(str(lib_path))
    except OSError:  # a damaged file in the build folder: build it again, once
        try:
            lib_path.unlink(missing_ok=True)  # (another process may have done so already)
        except OSError:  # a read-only folder: _compile says so, as a RuntimeError
            pass
        _compile(cc, lib_path)
        try:
            lib = ctypes.CDLL(str(lib_path))
        except OSError as e:
            raise RuntimeError(f"{lib_path}, just built with {cc}, cannot be loaded ({e}): is the build folder "
                               "on a noexec filesystem? Set MINIMAMBA_BUILD_DIR elsewhere, or use "
                               "decode_backend='torch'") from e
    lib.mamba2_step_workspace.restype = ctypes.c_size_t
    lib.mamba2_step_workspace.argtypes = [ctypes.POINTER(Dims), ctypes.c_int]
    lib.mamba2_step.restype = None
    lib.mamba2_step.argtypes = [ctypes.POINTER(Dims), ctypes.POINTER(Layer)] + [ctypes.c_void_p] * 4 + [
        ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int]
    _lib = lib
    return lib


class UnsupportedModel(ValueError):
    """The C step cannot run this model; `why` says what about it (device, dtype, layout)."""

    def __init__(self, why):
        super().__init__(f"the C decode step cannot run this model: {why}; use decode_backend='torch'")
        self.why = why


def unsupported(model) -> str | None:
    """Why `model` cannot use the C step, or None if it can."""
    params = list(model.parameters())
    if any(p.device.type != "cpu" for p in params):
        return "the model is not on the CPU"
    wrong = [(name, p.dtype) for name, p in model.named_parameters() if p.dtype != torch.float32]
    if wrong:  # all of them, or (a mixed model) the first one by name
        what = f"the weights are {wrong[0][1]}" if len(wrong) == len(params) else f"{wrong[0][0]} is {wrong[0][1]}"
        return f"the C step computes in float32 and {what}"
    if any(not p.is_contiguous() for p in params):
        return "some weights are not contiguous"
    return None


# 2 MiB pages -------------------------------------------------------------------------------------
# A decoding step streams every weight once, and with 4 KiB pages that is a TLB miss every 4 KiB. Linux can
# back a range with 2 MiB pages: madvise(MADV_HUGEPAGE) makes the range eligible, MADV_COLLAPSE (Linux 6.1+)
# moves the pages that are already there, keeping their contents. Streaming reads then run ~10-15% faster on
# the benchmark machine.
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25


def use_huge_pages(tensors) -> tuple[int, str | None]:
    """Back these tensors' memory with 2 MiB pages, in place (best effort; ~1 s per 500 MB the first time,
    well under 1 ms when they already are).

    A tensor rarely starts on a 2 MiB boundary, so the request covers the 2 MiB pages that hold any of its bytes;
    their other bytes belong to neighbouring allocations, whose contents the advice does not change either. Where
    that fails (a page that straddles two mappings), only the pages wholly inside the tensor are requested.
    Returns (bytes of the tensors now on 2 MiB pages, None), or (bytes, why not all). Off: MINIMAMBA_HUGE_PAGES=0.
    """
    if os.environ.get("MINIMAMBA_HUGE_PAGES", "1") == "0":
        return 0, "MINIMAMBA_HUGE_PAGES=0"
    if not sys.platform.startswith("linux"):
        return 0, "2 MiB pages are only requested on Linux"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def advise(start, end):
        return all(libc.madvise(start, end - start, advice) == 0 for advice in (_MADV_HUGEPAGE, _MADV_COLLAPSE))

    done, why = 0, None
    for t in tensors:
        first, last = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        if last - first < _HUGE_PAGE // 2:
            continue  # too small to matter
        around = (first // _HUGE_PAGE * _HUGE_PAGE, -(-last // _HUGE_PAGE) * _HUGE_PAGE)
        inside = (-(-first // _HUGE_PAGE) * _HUGE_PAGE, last // _HUGE_PAGE * _HUGE_PAGE)
        if advise(*around):
            done += last - first
        elif inside[1] > inside[0] and advise(*inside):
            done += inside[1] - inside[0]
        else:
            why = f"madvise: {os.strerror(ctypes.get_errno())}"
    return done, why


class DecodeStep:
    """`Mamba2LM.step` for one model and one batch size, in C. Built once per `generate` call (or per
    `model.step` call): it reads the weights' addresses when built, so build a new one after moving weights."""

    def __init__(self, model, batch_size):
        why = unsupported(model)
        if why:
            raise UnsupportedModel(why)
        self.lib, cfg = load(), model.config
        self.dims = Dims(cfg.n_layer, cfg.d_model, cfg.d_inner, cfg.nheads, cfg.headdim, cfg.ngroups,
                         cfg.d_state, cfg.d_conv, model.lm_head.weight.shape[0], cfg.norm_eps)
        # Detached tensors, not the Parameters: they hold the storage C reads, which a Parameter given new data
        # (`p.data = ...`, `model.half().float()`) would otherwise free while this step still has its address.
        layers, self.weights = [], tuple(p.detach() for p in model.parameters())
        for block in model.layers:
            mx = block.mixer
            w = (block.norm.weight, mx.in_proj.weight, mx.in_proj.bias, mx.conv1d.weight, mx.conv1d.bias,
                       mx.dt_bias, mx.A_log, mx.D, mx.norm.weight, mx.out_proj.weight, mx.out_proj.bias)
            layers.append(Layer(*(None if t is None else t.data_ptr() for t in w)))
        self.layers = (Layer * len(layers))(*layers)
        self.embedding, self.norm_f, self.head = (t.detach() for t in (model.embedding.weight, model.norm_f.weight,
                                                                       model.lm_head.weight))
        self.batch_size = batch_size
        self.check_cache = model.check_cache  # the shapes, device and dtypes of a cache for this model
        self.work = torch.empty(self.lib.mamba2_step_workspace(ctypes.byref(self.dims), batch_size),
                                dtype=torch.float32)  # (not torch's default dtype, which may be float64)
        self.huge_bytes, self.huge_why = use_huge_pages(self.weights)

    def __call__(self, token_ids, cache):
        """token_ids (b,) -> logits (b, Vp); cache.conv and cache.ssm advance by one token in place.

        Everything C will index is checked first: the ids, and every shape of the cache (a cache of another
        model or batch size would be read and written out of bounds)."""
        check_step_ids(token_ids)  # (b,) integer ids
        if token_ids.device.type != "cpu":  # (C would read a device address as host memory)
            raise ValueError(f"the C decode step runs on the CPU; the token ids are on {token_ids.device}: pass "
                             "token_ids.cpu()")
        b, vocab_rows = token_ids.shape[0], self.embedding.shape[0]
        if b != self.batch_size:
            raise ValueError(f"this step was built for {self.batch_size} sequences; got {b} token ids: take a step "
                             f"for this batch with model.decoder({b}) and a cache from model.allocate_cache({b})")
        self.check_cache(cache, b)  # shapes, device (the CPU) and the state's dtype (float32)
        if cache.conv.dtype != torch.float32 or not (cache.conv.is_contiguous() and cache.ssm.is_contiguous()):
            raise ValueError(f"the C decode step needs a contiguous float32 cache, got a conv history in "
                             f"{cache.conv.dtype}{'' if cache.conv.is_contiguous() else ', not contiguous'}"
                             f"{'' if cache.ssm.is_contiguous() else ', an SSM state not contiguous'}: "
                             f"model.allocate_cache({b}) gives one")
        tokens = token_ids.to(torch.int64).contiguous()  # (b,)
        if b and not (0 <= int(tokens.min()) and int(tokens.max()) < vocab_rows):
            raise IndexError(f"token ids must lie in [0, {vocab_rows}); got {tokens.tolist()}")
        logits = torch.empty(b, self.dims.vocab, dtype=torch.float32)  # (b, Vp): what C writes
        self.lib.mamba2_step(ctypes.byref(self.dims), self.layers, self.embedding.data_ptr(), self.norm_f.data_ptr(),
                             self.head.data_ptr(), tokens.data_ptr(), b, cache.conv.data_ptr(), cache.ssm.data_ptr(),
                             self.work.data_ptr(), logits.data_ptr(), torch.get_num_threads())
        return logits
