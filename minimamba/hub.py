"""Checkpoint I/O: load the public Mamba2 checkpoints (or our own), save in the same layout.

A checkpoint directory holds `config.json` and the weights. Two layouts are read:

    state-spaces (mamba_ssm, the public state-spaces/mamba2-* repos)   HF transformers (Mamba2ForCausalLM)
    config.json with d_model, n_layer, ssm_cfg, ...                    config.json with hidden_size, ...
    pytorch_model.bin                                                  model.safetensors or pytorch_model.bin
    backbone.embedding.weight                                          backbone.embeddings.weight

Every other key is the same in both: backbone.layers.{i}.norm.weight, backbone.layers.{i}.mixer.
{in_proj.weight, conv1d.weight, conv1d.bias, dt_bias, A_log, D, norm.weight, out_proj.weight},
backbone.norm_f.weight and lm_head.weight (absent from some tied exports: then it is tied).
We save the state-spaces layout, so mamba_ssm's own loader reads our checkpoints too.
"""

import re
from pathlib import Path

import torch

from minimamba.config import Mamba2Config
from minimamba.files import atomic_write
from minimamba.model import Mamba2LM

WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
_LISTED = 40  # the most problems a mismatch error lists (then: "and N more problems")


class CheckpointError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model its config describes."""


# mamba_ssm key  <->  minimamba module path
def _to_minimamba(key):
    key = re.sub(r"^model\.", "", key)  # some converted exports carry a "model." prefix
    key = key.replace("backbone.embeddings.", "backbone.embedding.")  # HF naming
    return key.replace("backbone.embedding.", "embedding.").replace("backbone.", "")


def _to_state_spaces(key):
    if key.startswith("lm_head."):
        return key
    return "backbone." + key


def resolve(name_or_path):
    """A local checkpoint directory for `name_or_path`: an existing path, or a Hub repo id downloaded
    (config.json + weights) into the cache."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_file():  # a config.json or a weights file: use its directory
            path = path.parent
        return path
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", str(name_or_path)):
        raise FileNotFoundError(
            f"{name_or_path!r} is neither an existing checkpoint directory nor a Hub repo id like "
            "'state-spaces/mamba2-130m'"
        )
    from minimamba.download import DownloadError, hub_file, hub_file_or_local

    config_path = hub_file_or_local(name_or_path, "config.json")
    errors = []
    for name in WEIGHT_FILES:
        try:
            hub_file(name_or_path, name)
            return config_path.parent
        except DownloadError as e:
            errors.append(str(e))
    raise DownloadError(f"could not download weights of {name_or_path} ({' / '.join(WEIGHT_FILES)}):\n"
                        + "\n".join(errors))


def load_state_dict(directory):
    """Read the weights of a checkpoint directory (safetensors or a weights_only torch pickle)."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                try:
                    from safetensors.torch import load_file
                except ImportError as e:
                    raise ImportError(f"{path} needs the safetensors package: pip install safetensors") from e
                return load_file(str(path))
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except ImportError:
            raise
        except Exception as e:  # truncated download, not a checkpoint, ...
            raise CheckpointError(
                f"could not read {path}: {type(e).__name__}: {e}. The file is corrupt or not a PyTorch "
                "state dict; delete it and download it again."
            ) from e
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
            raise CheckpointError(f"{path} does not hold a flat state dict of tensors (names -> tensors)")
        if meta := [k for k, v in sd.items() if v.is_meta]:
            raise CheckpointError(f"{path} holds tensors without data (on the meta device): {', '.join(meta[:8])}; "
                                  "save the weights after they are loaded or initialised")
        return sd
    raise FileNotFoundError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")


_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                "fp64": "float64", "double": "float64"}


# the dtypes the model computes in (float8 dtypes are floating point too, but its layers cannot run in them)
_MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _floating_dtype(dtype):
    """`dtype` (None: torch's default, a torch.dtype, or a name such as "bfloat16", "bf16", "float16",
    "fp16", "float32") as one of float16, bfloat16, float32, float64, or a ValueError saying what is accepted."""
    if dtype is None:
        return torch.get_default_dtype()
    given = dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        dtype = getattr(torch, _DTYPE_NAMES.get(name, name), None)
    if not isinstance(dtype, torch.dtype) or dtype not in _MODEL_DTYPES:
        raise ValueError(
            f"dtype={given!r} is not a floating-point dtype the model computes in; pass torch.float16, "
            "torch.bfloat16, torch.float32 or torch.float64, or a name: 'float32' ('fp32'), 'bfloat16' ('bf16'), "
            "'float16' ('fp16'), 'float64'"
        )
    return dtype


def from_pretrained(name_or_path, dtype=None, device=None, backend="auto"):
    """Build a Mamba2LM from a Hub repo id (e.g. 'state-spaces/mamba2-370m') or a local directory.

    The weights are cast to `dtype` (a torch.dtype or a name such as "bfloat16"/"bf16"; default: torch's
    default dtype, float32, whatever dtype the checkpoint was saved in) and moved to `device`.
    Any mismatch between the checkpoint and its config raises one CheckpointError listing the
    missing keys, unexpected keys, wrong shapes and weights given twice (the first _LISTED, then how
    many more; another number of blocks than n_layer is refused in one line, before the model is
    built); a checkpoint tensor that is not floating point (integer, bool, complex: quantized or
    corrupt) is a CheckpointError too.
    """
    dtype = _floating_dtype(dtype)  # (before any download)
    directory = resolve(name_or_path)
    config = Mamba2Config.load(directory)
    raw = load_state_dict(directory)
    not_float = [f"{k} ({v.dtype})" for k, v in raw.items() if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(
            f"checkpoint {directory} holds tensors that are not floating point: {', '.join(not_float[:8])}"
            + (f" and {len(not_float) - 8} more" if len(not_float) > 8 else "") + ". A Mamba2 "
            "checkpoint stores float32/float16/bfloat16 weights; quantized or corrupt files cannot be loaded. "
            "Re-export the weights in a floating-point dtype (or download the file again)"
        )
    sd, came_from = {}, {}  # our name -> tensor, and -> the checkpoint's name for it
    problems = []
    for key, value in raw.items():
        name = _to_minimamba(key)
        if name in sd:  # (two spellings of one weight, e.g. "model.backbone.x" and "backbone.x")
            problems.append(f"keys {came_from[name]} and {key} are both {name}: keep one")
        sd[name], came_from[name] = value, key
    blocks = {int(m[1]) for name in sd if (m := re.match(r"layers\.(\d+)\.", name))}
    if blocks and blocks == set(range(len(blocks))) and len(blocks) != config.n_layer:
        # (before the model is built: a config.json of another scale is a common mix-up, and its listing of
        # missing keys would be long; an absurd n_layer would also take minutes to build)
        raise CheckpointError(
            f"checkpoint {directory} has {len(blocks)} blocks (layers.0 to layers.{len(blocks) - 1}), but its "
            f"config.json says n_layer={config.n_layer}: the weights and the config come from different models "
            "(another scale?); put the config.json that came with these weights beside them")
    try:
        with torch.device("meta"):  # (shapes only: no memory yet)
            model = Mamba2LM(config, backend=backend)
    except RuntimeError as e:  # e.g. "Storage size calculation overflowed": sizes no machine could hold
        raise CheckpointError(f"{directory / 'config.json'} describes a model that cannot be built ({e}); check "
                              "its sizes (d_model, n_layer, vocab_size, d_state, ...)") from None
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        # (without an embedding there is nothing to compare: the listing below reports it missing; with two
        # spellings of one, the listing names them, not this)
        head, embedding = sd.get("lm_head.weight"), sd.get("embedding.weight")
        if not problems and head is not None and embedding is not None and not torch.equal(head, embedding):
            raise CheckpointError(f"{directory}: config ties the embeddings but lm_head.weight differs from "
                                  "the embedding; set tie_embeddings=false in config.json")
        sd.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    problems += [f"missing key {k} {tuple(s)}" for k, s in expected.items() if k not in sd]
    problems += [f"unexpected key {k} {tuple(v.shape)}" for k, v in sd.items() if k not in expected]
    problems += [
        f"wrong shape for {k}: checkpoint {tuple(sd[k].shape)}, config expects {tuple(s)}"
        for k, s in expected.items() if k in sd and sd[k].shape != s
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {directory} does not match its config.json "
            f"(d_model={config.d_model}, n_layer={config.n_layer}, d_state={config.d_state}, "
            f"headdim={config.headdim}, ngroups={config.ngroups}, vocab={config.padded_vocab_size}):\n  "
            + "\n  ".join(problems[:_LISTED])
            + (f"\n  and {len(problems) - _LISTED} more problems" if len(problems) > _LISTED else "")
        )
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embedding.weight
    return model.to(device) if device is not None else model


def save_pretrained(model, directory):
    """Write config.json and pytorch_model.bin in the state-spaces layout (each file atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {_to_state_spaces(k): v.detach().cpu() for k, v in model.state_dict().items()}
    # mamba_ssm's strict loader expects lm_head.weight even when tied; torch.save stores the shared tensor once
    sd.setdefault("lm_head.weight", sd["backbone.embedding.weight"])
    atomic_write(directory / "pytorch_model.bin", lambda tmp: torch.save(sd, tmp))
    atomic_write(directory / "config.json", lambda tmp: model.config.save(tmp))
    return directory
