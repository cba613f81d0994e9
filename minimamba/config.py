"""Mamba2Config: the shape of a Mamba2 language model, the named scales, and config.json I/O.

Two config.json layouts exist for the same model:
  * state-spaces (mamba_ssm): {"d_model", "n_layer", "vocab_size", "ssm_cfg": {"layer": "Mamba2", ...},
    "pad_vocab_size_multiple", "tie_embeddings", ...}; every Mamba2 field missing from ssm_cfg takes
    the Mamba2 class default (d_state 128, headdim 64, ...). This is what the public checkpoints use.
    A state-spaces config without ssm_cfg "layer" is Mamba-1 to mamba_ssm (state-spaces/mamba-*): refused.
  * HF transformers (model_type "mamba2"): {"hidden_size", "num_hidden_layers", "state_size",
    "head_dim", "n_groups", ...}; the embedding has exactly vocab_size rows (read with pad multiple 1).
`Mamba2Config.from_dict` recognises both; `to_dict(layout=...)` writes either.
"""

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from minimamba.files import parse_json

# The five public checkpoints differ only in width and depth (state-spaces/mamba2-<scale>).
PUBLIC_SCALES = {
    "130m": dict(d_model=768, n_layer=24),
    "370m": dict(d_model=1024, n_layer=48),
    "780m": dict(d_model=1536, n_layer=48),
    "1.3b": dict(d_model=2048, n_layer=48),
    "2.7b": dict(d_model=2560, n_layer=64),
}
# Small scales that train on a CPU (same vocabulary, so they can read the same token files).
CPU_SCALES = {
    "tiny": dict(d_model=64, n_layer=2, d_state=16, headdim=16, chunk_size=64),
    "micro": dict(d_model=128, n_layer=4, d_state=32, headdim=32, chunk_size=64),
    "mini": dict(d_model=256, n_layer=8, d_state=64, headdim=64, chunk_size=64),
}
SCALES = {**PUBLIC_SCALES, **CPU_SCALES}


def _json_float(v):
    """A number from config.json: transformers >= 5 writes inf as {"__float__": "Infinity"}."""
    return float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else float(v)


def _require(d, layout, keys):
    """The keys a config.json of this layout cannot do without, or a ValueError naming the missing ones."""
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"this {layout} Mamba2 config.json lacks {', '.join(map(repr, missing))}; "
                         f"add them (its keys are: {sorted(d)})")


# what a field of each annotation must hold (numbers.Integral: numpy's integers too); a float field takes an int
_KINDS = {int: numbers.Integral, float: numbers.Real, bool: bool}
_KIND_NAMES = {numbers.Integral: "an integer", numbers.Real: "a number", bool: "true or false"}


@dataclass
class Mamba2Config:
    d_model: int = 768  # D, the width of the residual stream
    n_layer: int = 24  # number of Mamba2 blocks
    vocab_size: int = 50277  # V, the tokenizer's vocabulary (GPT-NeoX-20B)
    pad_vocab_size_multiple: int = 16  # the embedding has V rounded up to this multiple (50288)
    d_state: int = 128  # N, the state size
    d_conv: int = 4  # K, width of the causal depthwise convolution
    expand: int = 2  # E = expand·D, the SSM width
    headdim: int = 64  # P, channels per head
    ngroups: int = 1  # G, groups of heads that share B and C
    chunk_size: int = 256  # Q, chunk length of the SSD scan (does not change the result)
    norm_eps: float = 1e-5  # epsilon of every RMSNorm
    tie_embeddings: bool = True  # the LM head is the embedding matrix
    residual_in_fp32: bool = True  # keep the residual stream in float32 whatever the compute dtype
    conv_bias: bool = True
    bias: bool = False  # bias in in_proj / out_proj
    # initialisation (used when training from scratch; loading a checkpoint overwrites them)
    A_init_min: float = 1.0  # A ~ -U(A_init_min, A_init_max)
    A_init_max: float = 16.0
    dt_min: float = 1e-3  # softplus(dt_bias) ~ log-uniform in [dt_min, dt_max] at init
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    initializer_range: float = 0.02  # std of the embedding init

    def __post_init__(self):
        problems = []
        for f in fields(self):  # (a config.json may hold "2" or 2.0 or null where a size goes)
            value, kind = getattr(self, f.name), _KINDS[f.type]
            if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
                problems.append(f"{f.name} must be {_KIND_NAMES[kind]}, got {value!r}")
        if problems:
            raise ValueError("invalid Mamba2Config: " + "; ".join(problems))
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "d_state", "d_conv", "expand",
                     "headdim", "ngroups", "chunk_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        # not sizes: an RMSNorm eps of 0 divides by 0 on a zero input; the others only draw the initial weights
        for name, least in (("norm_eps", "positive"), ("A_init_min", "positive"), ("dt_min", "positive"),
                            ("dt_init_floor", "non-negative"), ("initializer_range", "non-negative")):
            value = getattr(self, name)
            if not 0 <= value < math.inf or (value == 0 and least == "positive"):  # (NaN fails both comparisons)
                problems.append(f"{name} must be a {least} finite number, got {value}")
        for low, high in (("A_init_min", "A_init_max"), ("dt_min", "dt_max")):
            if not getattr(self, low) <= getattr(self, high) < math.inf:  # (False for a NaN too)
                problems.append(f"{high} must be finite and at least {low} = {getattr(self, low)}, "
                                f"got {getattr(self, high)}")
        if not problems:  # (the derived sizes need positive ones)
            if self.d_inner % self.headdim:
                problems.append(f"d_inner = expand·d_model = {self.d_inner} is not a multiple of headdim {self.headdim}")
            elif self.nheads % self.ngroups:
                problems.append(f"ngroups {self.ngroups} does not divide nheads {self.nheads}")
        if problems:
            raise ValueError("invalid Mamba2Config: " + "; ".join(problems))

    # derived sizes -------------------------------------------------------------------------------
    @property
    def d_inner(self):  # E
        return self.expand * self.d_model

    @property
    def nheads(self):  # H
        return self.d_inner // self.headdim

    @property
    def padded_vocab_size(self):  # Vp
        m = self.pad_vocab_size_multiple
        return math.ceil(self.vocab_size / m) * m

    @property
    def conv_dim(self):  # channels of the convolution: [x | B | C]
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def in_proj_dim(self):  # rows of in_proj: [z | x | B | C | dt]
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    # named scales --------------------------------------------------------------------------------
    @classmethod
    def from_scale(cls, name, **overrides):
        """The config of a public checkpoint ("130m" … "2.7b") or of a small CPU scale ("tiny", ...)."""
        if name not in SCALES:
            raise ValueError(f"unknown scale {name!r}; choose one of: {', '.join(SCALES)}")
        return cls(**{**SCALES[name], **overrides})

    # config.json ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d):
        """Read a config dict in the state-spaces or the HF transformers layout."""
        if not isinstance(d, dict):
            raise ValueError(f"a Mamba2 config.json is one JSON object ({{\"d_model\": ..., ...}}); this one is a "
                             f"JSON {type(d).__name__}")
        if not isinstance(d.get("ssm_cfg") or {}, dict):
            raise ValueError(f"ssm_cfg must be a JSON object, got {d['ssm_cfg']!r}")
        model_type = d.get("model_type")
        if model_type in ("mamba", "falcon_mamba"):
            raise ValueError(
                f"Mamba-1 checkpoints are not supported (this is Mamba2 only): config.json has model_type "
                f"{model_type!r}. Use a Mamba2 checkpoint (model_type 'mamba2', e.g. state-spaces/mamba2-130m), "
                "or load this one with transformers' MambaForCausalLM"
            )
        if model_type is not None and model_type != "mamba2":
            raise ValueError(f"config.json has model_type {model_type!r}, not 'mamba2': it is not a Mamba2 model")
        if model_type == "mamba2" or "hidden_size" in d:
            _require(d, "HF transformers", ("hidden_size", "num_hidden_layers"))
            return cls._from_hf(d)
        if "d_model" in d:
            _require(d, "state-spaces", ("d_model", "n_layer"))
            return cls._from_state_spaces(d)
        raise ValueError(
            "config.json is neither a state-spaces Mamba2 config (needs 'd_model') nor an HF transformers "
            f"Mamba2 config (needs 'hidden_size'); its keys are: {sorted(d)}"
        )

    @classmethod
    def _from_state_spaces(cls, d):
        ssm = dict(d.get("ssm_cfg") or {})
        # mamba_ssm builds Mamba-1 blocks when ssm_cfg has no "layer" (the state-spaces/mamba-* configs);
        # the state-spaces/mamba2-* configs all say {"layer": "Mamba2"}
        layer = ssm.pop("layer", None)
        if layer in (None, "Mamba1"):
            said = "has no 'layer'" if layer is None else "says 'layer': 'Mamba1'"
            raise ValueError(
                f"Mamba-1 checkpoints are not supported (this is Mamba2 only): ssm_cfg {said}, so mamba_ssm "
                "builds Mamba-1 blocks (as in the state-spaces/mamba-* checkpoints). Use a Mamba2 checkpoint "
                "(state-spaces/mamba2-*); if this one is Mamba2, add \"layer\": \"Mamba2\" to ssm_cfg in config.json"
            )
        if layer != "Mamba2":
            raise ValueError(f"ssm_cfg.layer is {layer!r}; minimamba implements Mamba2 only")
        if d.get("d_intermediate", 0) or d.get("attn_layer_idx"):
            raise ValueError("configs with MLP blocks (d_intermediate > 0) or attention layers are not supported")
        if d.get("rms_norm", True) is not True:  # (mamba_ssm then builds LayerNorms, with biases)
            raise ValueError(f"rms_norm={d['rms_norm']!r}: only RMSNorm Mamba2 models (rms_norm true) are supported")
        # options the public checkpoints leave at their defaults and minimamba does not implement
        only_default = {"d_ssm": None, "rmsnorm": True, "norm_before_gate": False, "D_has_hdim": False,
                        "dt_limit": [0.0, math.inf]}
        unsupported = {k: ssm[k] for k in only_default if k in ssm and ssm[k] != only_default[k]}
        if unsupported:
            raise ValueError(f"unsupported Mamba2 options in ssm_cfg: {unsupported}")
        kw = dict(
            d_model=d["d_model"],
            n_layer=d["n_layer"],
            vocab_size=d.get("vocab_size", 50277),
            pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 8),
            tie_embeddings=d.get("tie_embeddings", True),
            residual_in_fp32=d.get("residual_in_fp32", True),
        )
        for name in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "bias", "conv_bias",
                     "dt_min", "dt_max", "dt_init_floor"):
            if name in ssm:
                kw[name] = ssm[name]
        if "A_init_range" in ssm:
            if not isinstance(ssm["A_init_range"], list) or len(ssm["A_init_range"]) != 2:
                raise ValueError(f"ssm_cfg.A_init_range must be [min, max], got {ssm['A_init_range']!r}")
            kw["A_init_min"], kw["A_init_max"] = ssm["A_init_range"]
        if "norm_epsilon" in d:
            kw["norm_eps"] = d["norm_epsilon"]
        return cls(**kw)

    @classmethod
    def _from_hf(cls, d):
        """An HF-layout config, read as transformers reads it: a missing key takes transformers' default
        (Mamba2Config's: n_groups 8, tie_word_embeddings false, vocab_size 32768, initializer_range 0.1)."""
        if d.get("norm_before_gate", False) or not d.get("rms_norm", True):
            raise ValueError("only rms_norm=True, norm_before_gate=False Mamba2 configs are supported")
        if d.get("hidden_act", "silu") not in ("silu", "swish"):  # (the same function under two names)
            raise ValueError(f"hidden_act={d['hidden_act']!r}: Mamba2 blocks here use SiLU ('silu') only")
        cfg = cls(
            d_model=d["hidden_size"],
            n_layer=d["num_hidden_layers"],
            # HF's embedding has exactly vocab_size rows (it pads nothing, whatever pad_vocab_size_multiple
            # says, and transformers >= 5 does not write that key): take vocab_size as the padded size
            vocab_size=d.get("vocab_size", 32768),
            pad_vocab_size_multiple=1,
            d_state=d.get("state_size", 128),
            d_conv=d.get("conv_kernel", 4),
            expand=d.get("expand", 2),
            headdim=d.get("head_dim", 64),
            ngroups=d.get("n_groups", 8),
            chunk_size=d.get("chunk_size", 256),
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=d.get("tie_word_embeddings", False),
            residual_in_fp32=d.get("residual_in_fp32", True),
            conv_bias=d.get("use_conv_bias", True),
            bias=d.get("use_bias", False),
            dt_min=d.get("time_step_min", 1e-3),
            dt_max=d.get("time_step_max", 1e-1),
            dt_init_floor=d.get("time_step_floor", 1e-4),
            initializer_range=d.get("initializer_range", 0.1),
        )
        limit = d.get("time_step_limit", [0.0, math.inf])  # (the state-spaces reader refuses a dt_limit too)
        try:
            unclamped = limit is None or [_json_float(v) for v in limit] == [0.0, math.inf]
        except (TypeError, ValueError, KeyError):  # not a list of numbers
            unclamped = False
        if not unclamped:
            raise ValueError(f"unsupported Mamba2 option time_step_limit={limit}: minimamba does not clamp dt")
        if "num_heads" in d and d["num_heads"] != cfg.nheads:
            raise ValueError(
                f"HF config num_heads={d['num_heads']!r} disagrees with expand·hidden_size/head_dim = {cfg.nheads}"
            )
        return cfg

    def to_dict(self, layout="state-spaces"):
        """The config as a dict in the "state-spaces" (default) or "hf" layout."""
        if layout == "state-spaces":
            return {
                "d_model": self.d_model,
                "d_intermediate": 0,
                "n_layer": self.n_layer,
                "vocab_size": self.vocab_size,
                "ssm_cfg": {
                    "layer": "Mamba2",
                    "d_state": self.d_state,
                    "d_conv": self.d_conv,
                    "expand": self.expand,
                    "headdim": self.headdim,
                    "ngroups": self.ngroups,
                    "chunk_size": self.chunk_size,
                    "bias": self.bias,
                    "conv_bias": self.conv_bias,
                    "A_init_range": [self.A_init_min, self.A_init_max],
                    "dt_min": self.dt_min,
                    "dt_max": self.dt_max,
                    "dt_init_floor": self.dt_init_floor,
                },
                "attn_layer_idx": [],
                "attn_cfg": {},
                "rms_norm": True,
                "residual_in_fp32": self.residual_in_fp32,
                "fused_add_norm": True,
                "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
                "tie_embeddings": self.tie_embeddings,
                # (mamba_ssm's MambaConfig has no such key, and its loader refuses unknown ones: written only
                # where the model needs it, which mamba_ssm's RMSNorm default of 1e-5 cannot express anyway)
                **({} if self.norm_eps == 1e-5 else {"norm_epsilon": self.norm_eps}),
            }
        if layout == "hf":
            return {
                "model_type": "mamba2",
                "architectures": ["Mamba2ForCausalLM"],
                "hidden_size": self.d_model,
                "num_hidden_layers": self.n_layer,
                "vocab_size": self.padded_vocab_size,
                "state_size": self.d_state,
                "conv_kernel": self.d_conv,
                "expand": self.expand,
                "head_dim": self.headdim,
                "num_heads": self.nheads,
                "n_groups": self.ngroups,
                "chunk_size": self.chunk_size,
                "layer_norm_epsilon": self.norm_eps,
                "tie_word_embeddings": self.tie_embeddings,
                "residual_in_fp32": self.residual_in_fp32,
                "use_conv_bias": self.conv_bias,
                "use_bias": self.bias,
                "time_step_min": self.dt_min,
                "time_step_max": self.dt_max,
                "time_step_floor": self.dt_init_floor,
                "time_step_limit": [0.0, float("inf")],
                "initializer_range": self.initializer_range,
                "rms_norm": True,
                "norm_before_gate": False,
                "bos_token_id": 0,
                "eos_token_id": 0,
                "pad_token_id": 0,
            }
        raise ValueError(f"unknown config layout {layout!r}; use 'state-spaces' or 'hf'")

    @classmethod
    def load(cls, path):
        """Read config.json (a file or a directory holding one), in either layout."""
        path = Path(path)
        if path.is_dir():
            # a run's folder (train.py's or sft.py's --out) holds checkpoints, not one: say which
            inside = [] if (path / "config.json").exists() else sorted(
                d.name for d in path.iterdir() if (d / "config.json").is_file())
            if inside:
                raise FileNotFoundError(f"no config.json in {path}: it is a run's folder, not a checkpoint; pass one "
                                        f"of the checkpoints it holds ({', '.join(inside)}), e.g. {path / inside[-1]}")
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}: a checkpoint directory needs one")
        try:
            d = parse_json(path.read_text(encoding="utf-8"))
        except ValueError as e:  # (not UTF-8, not JSON, nested too deeply)
            raise ValueError(f"{path} is not valid JSON ({e}); expected a Mamba2 config.json") from e
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        except (TypeError, KeyError, AttributeError) as e:  # (a value of a type no check above foresaw)
            raise ValueError(f"{path}: a value has an unexpected type ({type(e).__name__}: {e}); expected a "
                             "Mamba2 config.json") from None

    def save(self, path, layout="state-spaces"):
        """Write config.json (indent 4, like mamba_ssm's save_pretrained)."""
        Path(path).write_text(json.dumps(self.to_dict(layout), indent=4) + "\n", encoding="utf-8")

    def replace(self, **changes):
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown Mamba2Config fields: {sorted(unknown)}")
        return Mamba2Config(**{**asdict(self), **changes})
