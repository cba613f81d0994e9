"""Mamba2LM against an independent implementation (HF transformers, test-only), the recurrent step
against the parallel forward, checkpoint I/O and its errors, and sampling."""

import dataclasses
import json
import os
import re
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimamba import Mamba2Config, Mamba2LM, from_pretrained
from minimamba.hub import CheckpointError
from minimamba.model import sample
from tests.conftest import randomize_, save_in_state_spaces_layout


def tiny_config(**kw):
    base = dict(d_model=64, n_layer=2, vocab_size=1000, d_state=16, headdim=16, ngroups=2, chunk_size=32)
    return Mamba2Config(**{**base, **kw})


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random HF Mamba2ForCausalLM and the same weights saved in the state-spaces layout (the tests
    that use it skip when HF transformers, the test-only oracle, is not installed; the others run)."""
    transformers = pytest.importorskip("transformers", reason="HF transformers is the test-only oracle for Mamba2")
    cfg = tiny_config()
    hf_cfg = transformers.Mamba2Config(**cfg.to_dict("hf"))
    torch.manual_seed(0)
    hf = randomize_(transformers.Mamba2ForCausalLM(hf_cfg)).eval()
    return hf, save_in_state_spaces_layout(hf, cfg, tmp_path_factory.mktemp("state_spaces_ckpt"))


def test_logits_equal_hf_transformers(hf_pair):
    hf, ckpt = hf_pair
    model = from_pretrained(ckpt).eval()
    assert model.scan_backend() == "torch"
    ids = torch.randint(0, 1000, (2, 77))  # 77 is not a multiple of the chunk size 32
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert out.shape == ref.shape == (2, 77, 1008)
    err = (out - ref).abs().max().item()
    # measured 1.3e-6 (logits up to 3.7); 1e-4 let a final norm with eps 1e-6 instead of 1e-5 pass (2.9e-5)
    assert err <= 1e-5, f"max |Δlogits| = {err:.3g}"


def test_hf_layout_directory_loads_too(hf_pair, tmp_path):
    hf, ckpt = hf_pair
    hf.save_pretrained(tmp_path)  # model.safetensors + HF config.json, embeddings key, maybe no lm_head
    model = from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 1000, (1, 40))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("decode_backend", ["torch", "c"])
def test_greedy_generation_equals_hf_token_for_token(hf_pair, decode_backend):
    hf, ckpt = hf_pair
    model = from_pretrained(ckpt).eval()
    model.decode_backend = decode_backend
    prompt = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(0))
    ours = model.generate(prompt, max_new_tokens=32)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32,
                          attention_mask=torch.ones_like(prompt))
    assert ours.shape == (2, 45)
    assert torch.equal(ours, ref), f"first difference at {(ours != ref).nonzero()[:1].tolist()}"


@pytest.mark.parametrize("decode_backend", ["torch", "c"])
@pytest.mark.parametrize("seed", range(6))
def test_each_greedy_token_is_the_argmax_of_hf_forward(hf_pair, decode_backend, seed):
    """Greedy decoding checked token by token against HF's parallel forward over the generated sequence.

    For some prompts (seeds 1 and 5 here, transformers 5.24) HF's own `generate` leaves the argmax of HF's
    own forward after 9-20 tokens, though the top-2 logits there are > 3e-3 apart, far above float32
    noise; this form of the check does not depend on HF's cached decoding path.
    """
    hf, ckpt = hf_pair
    model = from_pretrained(ckpt).eval()
    model.decode_backend = decode_backend
    prompt = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(seed))
    ours = model.generate(prompt, max_new_tokens=32)  # (2, 45)
    with torch.no_grad():
        logits = hf(ours).logits[:, 12:-1, :1000]  # (2, 32, V): the prediction for each generated token
    assert torch.equal(logits.argmax(-1), ours[:, 13:])


# Each draw builds a small HF Mamba2 (random weights) and loads it into ours: MINIMAMBA_HF_DRAWS=200 for a campaign.
HF_DRAWS = int(os.environ.get("MINIMAMBA_HF_DRAWS", "12"))


@st.composite
def small_configs(draw):
    """A Mamba2Config over every field the public checkpoints' config.json can set, at sizes a CPU test affords:
    P and H with E·D = H·P (so D = H·P / E), G dividing H, any K, N, Q, V and its padding multiple."""
    headdim, nheads, expand = draw(st.sampled_from([2, 4, 8, 16])), draw(st.integers(1, 6)), draw(st.sampled_from([1, 2]))
    if nheads * headdim % expand:
        nheads *= expand
    return Mamba2Config(
        d_model=nheads * headdim // expand, n_layer=draw(st.integers(1, 2)), expand=expand, headdim=headdim,
        ngroups=draw(st.sampled_from([g for g in range(1, nheads + 1) if nheads % g == 0])),
        d_state=draw(st.sampled_from([1, 2, 4, 8, 16])), d_conv=draw(st.integers(2, 4)),
        chunk_size=draw(st.sampled_from([4, 8, 16, 32])), vocab_size=draw(st.integers(2, 300)),
        pad_vocab_size_multiple=draw(st.sampled_from([1, 8, 16])), norm_eps=draw(st.sampled_from([1e-5, 1e-6, 1e-3])),
        tie_embeddings=draw(st.booleans()), conv_bias=draw(st.booleans()), bias=draw(st.booleans()))


@settings(max_examples=HF_DRAWS, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=small_configs(), batch=st.integers(1, 2), seqlen=st.integers(1, 40), split=st.integers(0, 40),
       seed=st.integers(0, 2**16))
def test_any_small_config_equals_hf_in_the_forward_each_decoding_step_and_the_gradients(cfg, batch, seqlen, split, seed):
    """The fixed-config tests above, over drawn configs: logits equal HF transformers' Mamba2 (same random
    weights, every bias set where the config has one, loaded through the state-spaces layout as a public
    checkpoint is), and a prefill of the first `split` tokens followed by one step per token (both decoding
    backends) gives HF's logits too, and every parameter's gradient is HF's. float32; tolerances relative to the
    largest value compared."""
    import tempfile

    transformers = pytest.importorskip("transformers", reason="HF transformers is the test-only oracle for Mamba2")
    torch.manual_seed(seed)
    hf = randomize_(transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**cfg.to_dict("hf"))), seed=seed,
                    biases=True).eval()
    with tempfile.TemporaryDirectory() as d:
        model = from_pretrained(save_in_state_spaces_layout(hf, cfg, d)).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(ids).logits  # (B, L, V padded)
        out = model(ids)
        assert out.shape == ref.shape
        scale = ref.abs().max().item()
        err = (out - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, scale), f"max |Δlogits| = {err:.3g} (largest logit {scale:.3g})"
        split = min(split, seqlen - 1)
        for backend in ("torch", "c"):
            model.decode_backend = backend
            cache = model.allocate_cache(batch)
            if split:
                model(ids[:, :split], cache=cache)
            steps = torch.stack([model.step(ids[:, t], cache) for t in range(split, seqlen)], dim=1)  # (B, L-split, V)
            assert model.decode_backend_used[0] == backend
            err = (steps - ref[:, split:]).abs().max().item()
            assert err <= 1e-4 * max(1.0, scale), f"{backend} step: max |Δlogits| = {err:.3g}"
    # the gradient of every parameter (what training follows): a loss that weighs each logit differently
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1))  # (B, L, V padded)
    (hf(ids).logits * w).sum().backward()
    (model(ids) * w).sum().backward()
    hf_grads = {k.removeprefix("backbone.").replace("embeddings.", "embedding."): p.grad
                for k, p in hf.named_parameters()}
    ours = dict(model.named_parameters())
    assert ours.keys() == hf_grads.keys()
    for name, p in ours.items():
        g_scale = hf_grads[name].abs().max().item()
        err = (p.grad - hf_grads[name]).abs().max().item()
        assert err <= 1e-4 * max(1.0, g_scale), f"∂L/∂{name}: max |Δ| = {err:.3g} (largest {g_scale:.3g})"


@pytest.mark.parametrize("decode_backend", ["torch", "c"])
def test_a_norm_eps_other_than_the_default_reaches_every_norm_and_both_steps(tmp_path, decode_backend):
    """HF's Mamba2 with layer_norm_epsilon 0.05 (its every RMSNorm's, the mixer's gated one too): the forward and
    the decoding step (torch's, C's) give its logits. (Every other test uses the default 1e-5: a norm built without
    the config's eps, or a C step given 1e-5, passed them all.)"""
    transformers = pytest.importorskip("transformers", reason="HF transformers is the test-only oracle for Mamba2")
    cfg = tiny_config(n_layer=1, norm_eps=0.05)
    torch.manual_seed(0)
    hf = randomize_(transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**cfg.to_dict("hf")))).eval()
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path).eval()
    assert model.config.norm_eps == 0.05
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits  # (2, 9, Vp)
        assert (model(ids) - ref).abs().max().item() <= 1e-5
    model.decode_backend = decode_backend
    cache = model.allocate_cache(2)
    with torch.no_grad():
        model(ids[:, :5], cache=cache)
    step = model.decoder(2)
    steps = torch.stack([step(ids[:, t], cache) for t in range(5, 9)], dim=1)  # (2, 4, Vp)
    assert (steps - ref[:, 5:]).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return randomize_(Mamba2LM(tiny_config(chunk_size=8)), seed=1).eval()


@pytest.mark.parametrize("decode_backend", ["torch", "c"])
def test_step_by_step_equals_full_forward(model, decode_backend):
    model.decode_backend = decode_backend
    ids = torch.randint(0, 1000, (2, 20))
    with torch.no_grad():
        full = model(ids)
    cache = model.allocate_cache(2)
    steps = torch.stack([model.step(ids[:, t], cache) for t in range(20)], dim=1)
    assert model.decode_backend_used[0] == decode_backend
    assert cache.seqlen_offset == 20
    assert (steps - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("decode_backend", ["torch", "c"])
@pytest.mark.parametrize("split", range(1, 20))
def test_prefill_then_step_equals_full_forward_at_every_split(model, split, decode_backend):
    model.decode_backend = decode_backend
    ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(split))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2)
        prefill = model(ids[:, :split], cache=cache)
    assert (prefill - full[:, :split]).abs().max().item() <= 1e-5
    steps = torch.stack([model.step(ids[:, t], cache) for t in range(split, 20)], dim=1)
    assert (steps - full[:, split:]).abs().max().item() <= 1e-4


def test_prefill_in_pieces_equals_one_prefill(model):
    ids = torch.randint(0, 1000, (1, 30))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(1)
        pieces = torch.cat([model(ids[:, a:b], cache=cache) for a, b in ((0, 2), (2, 17), (17, 30))], dim=1)
    assert (pieces - full).abs().max().item() <= 1e-4
    assert cache.seqlen_offset == 30  # (the tokens it has consumed: 2 + 15 + 13)


def test_cache_is_constant_size(model):
    cfg = model.config
    cache = model.allocate_cache(3)
    assert cache.conv.shape == (cfg.n_layer, 3, cfg.d_conv - 1, cfg.conv_dim)
    assert cache.ssm.shape == (cfg.n_layer, 3, cfg.nheads, cfg.headdim, cfg.d_state)


def test_save_then_load_gives_bit_identical_logits(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.embedding.weight
    ids = torch.randint(0, 1000, (2, 33))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)  # the state-spaces key names
    assert "backbone.embedding.weight" in sd and "lm_head.weight" in sd
    assert "backbone.layers.0.mixer.in_proj.weight" in sd


def test_from_pretrained_casts_dtype(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert from_pretrained(tmp_path, dtype=torch.bfloat16).embedding.weight.dtype == torch.bfloat16


def test_every_mismatch_is_listed_in_one_error(model, tmp_path):
    model.save_pretrained(tmp_path)
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    del sd["backbone.layers.1.mixer.D"]
    sd["backbone.layers.0.mixer.dt_bias"] = torch.zeros(5)
    sd["backbone.layers.7.mixer.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing key layers.1.mixer.D" in msg
    assert "wrong shape for layers.0.mixer.dt_bias: checkpoint (5,), config expects (8,)" in msg
    assert "unexpected key layers.7.mixer.extra" in msg


def test_corrupt_missing_and_unknown_inputs_fail_clearly(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated download
    with pytest.raises(CheckpointError, match="corrupt"):
        from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path)
    # a run's folder (train.py's --out) given instead of one of its checkpoints: the error names them
    model.save_pretrained(tmp_path / "step-000050")
    (tmp_path / "step-000020").mkdir()  # (no checkpoint: not named)
    with pytest.raises(FileNotFoundError) as err:
        from_pretrained(tmp_path)
    assert f"it is a run's folder, not a checkpoint; pass one of the checkpoints it holds (step-000050), e.g. " \
        f"{tmp_path / 'step-000050'}" in str(err.value)
    with pytest.raises(FileNotFoundError, match="neither an existing checkpoint directory"):
        from_pretrained(str(tmp_path / "nope" / "deeper" / "x"))
    with pytest.raises(ValueError, match="unknown scale '3b'"):
        Mamba2Config.from_scale("3b")
    with pytest.raises(ValueError, match="ngroups 3 does not divide nheads 8"):
        tiny_config(ngroups=3)
    with pytest.raises(ValueError, match="expand must be positive, got 0"):
        tiny_config(expand=0)
    with pytest.raises(ValueError, match="headdim must be positive, got 0"):
        tiny_config(headdim=0)


@pytest.mark.parametrize("decode_backend", ["torch", "c"])
def test_ids_the_embedding_has_no_row_for_or_that_are_not_integers_are_named(model, decode_backend):
    """The forward and both decoding steps name a bad id and the embedding's rows (1008 here) on a CPU; they
    failed with torch's "index out of range in self" (IndexError) or "Expected tensor for argument #1
    'indices' to have one of the following scalar types" (RuntimeError) from inside nn.Embedding."""
    model.decode_backend = decode_backend
    rows = r"outside the embedding's rows \[0, 1008\)"
    for ids, message in ((torch.tensor([[3, 1008]]), rf"input_ids holds token id 1008, {rows}"),
                         (torch.tensor([[-1, 3]]), rf"input_ids holds token id -1, {rows}"),
                         (torch.tensor([[3.0, 4.0]]), r"input_ids must be integer ids .*got torch.float32")):
        with pytest.raises(ValueError, match=message), torch.no_grad():
            model(ids)
    with torch.no_grad():
        assert model(torch.tensor([[0, 1007]])).shape == (1, 2, 1008)  # (the padding rows exist: not refused)
    cache = model.allocate_cache(2)
    for step in (model.step, model.decoder(2)):  # (the C step's own words: "token ids must lie in [0, 1008)")
        for bad, ids in ((1008, [5, 1008]), (-2, [-2, 5])):
            with pytest.raises((ValueError, IndexError),
                               match=rf"token id {bad}, outside the embedding's rows \[0, 1008\)|"
                                     rf"token ids must lie in \[0, 1008\); got \[.*{bad}.*\]"):
                step(torch.tensor(ids), cache)
    assert cache.seqlen_offset == 0 and not cache.ssm.any()  # nothing ran


def test_public_scale_shapes_match_the_checkpoints():
    # rows of in_proj and parameter counts of the public checkpoints (mamba2-130m … 2.7b)
    expected = {"130m": (3352, 128_989_632), "370m": (4384, 368_346_624), "780m": (6448, 780_161_280),
                "1.3b": (8512, 1_343_757_312), "2.7b": (10576, 2_702_599_680)}
    for scale, (rows, nparams) in expected.items():
        cfg = Mamba2Config.from_scale(scale)
        with torch.device("meta"):
            m = Mamba2LM(cfg)
        assert cfg.in_proj_dim == rows and cfg.padded_vocab_size == 50288
        assert m.num_params() == nparams, scale


def test_both_config_layouts_round_trip():
    cfg = tiny_config(d_conv=3, norm_eps=1e-6, expand=3, residual_in_fp32=False, conv_bias=False, bias=True,
                      A_init_min=2.0, A_init_max=8.0, dt_min=0.002, dt_max=0.2, dt_init_floor=2e-4,
                      tie_embeddings=False, initializer_range=0.01)  # (every field off its default)
    back = {layout: Mamba2Config.from_dict(json.loads(json.dumps(cfg.to_dict(layout)))) for layout in ("state-spaces", "hf")}
    # what each layout cannot hold: mamba_ssm's config has no init std (its models take 0.02); HF's has no
    # range for A's init (its models take A = -1..-H) and no vocab padding (its vocab_size is the padded size)
    assert back["state-spaces"] == dataclasses.replace(cfg, initializer_range=0.02)
    assert back["hf"] == dataclasses.replace(cfg, vocab_size=cfg.padded_vocab_size, pad_vocab_size_multiple=1,
                                             A_init_min=1.0, A_init_max=16.0)
    assert Mamba2Config.from_dict(cfg.to_dict()) == back["state-spaces"]  # (the default layout)
    # the public config.json: only d_model/n_layer/... and ssm_cfg {"layer": "Mamba2"}
    public = {"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
              "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
              "tie_embeddings": True}
    assert Mamba2Config.from_dict(public) == Mamba2Config.from_scale("130m")
    with pytest.raises(ValueError, match="neither a state-spaces"):
        Mamba2Config.from_dict({"foo": 1})
    with pytest.raises(ValueError, match="state-spaces Mamba2 config.json lacks 'n_layer'; add them"):
        Mamba2Config.from_dict({k: v for k, v in public.items() if k != "n_layer"})
    with pytest.raises(ValueError, match="time_step_limit=\\[0.0, 1.0\\]"):
        Mamba2Config.from_dict({**cfg.to_dict("hf"), "time_step_limit": [0.0, 1.0]})
    with pytest.raises(ValueError, match="HF transformers Mamba2 config.json lacks 'num_hidden_layers'"):
        Mamba2Config.from_dict({"model_type": "mamba2", "hidden_size": 64})


# the fields of mamba_ssm's MambaConfig (mamba_ssm/models/config_mamba.py), whose loader passes config.json
# to it as keyword arguments: any other key fails there
MAMBA_SSM_CONFIG_FIELDS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                           "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                           "tie_embeddings"}


def test_the_state_spaces_config_holds_only_what_mamba_ssm_reads_and_its_defaults_are_mamba_ssms():
    assert set(tiny_config().to_dict()) <= MAMBA_SSM_CONFIG_FIELDS  # (norm_epsilon: only off the default)
    assert tiny_config(norm_eps=1e-6).to_dict()["norm_epsilon"] == 1e-6
    bare = {"d_model": 64, "n_layer": 2, "vocab_size": 1001, "ssm_cfg": {"layer": "Mamba2"}}
    assert Mamba2Config.from_dict(bare).padded_vocab_size == 1008  # (mamba_ssm's default multiple is 8)
    with pytest.raises(ValueError, match="rms_norm=False: only RMSNorm Mamba2 models"):
        Mamba2Config.from_dict({**bare, "rms_norm": False})  # (mamba_ssm builds LayerNorms)
    for bad in (0, -16):  # (0 divided by zero; -16 gave an embedding smaller than the vocabulary)
        with pytest.raises(ValueError, match=f"pad_vocab_size_multiple must be positive, got {bad}"):
            Mamba2Config.from_dict({**bare, "pad_vocab_size_multiple": bad})


def test_an_hf_config_takes_transformers_defaults_for_what_it_leaves_out():
    transformers = pytest.importorskip("transformers", reason="HF transformers is the test-only oracle for Mamba2")
    given = {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "head_dim": 16, "num_heads": 8,
             "state_size": 16}
    ours, theirs = Mamba2Config.from_dict(given), transformers.Mamba2Config(**given)
    assert (ours.ngroups, ours.tie_embeddings, ours.padded_vocab_size, ours.initializer_range, ours.chunk_size) == \
           (theirs.n_groups, theirs.tie_word_embeddings, theirs.vocab_size, theirs.initializer_range, theirs.chunk_size)
    with pytest.raises(ValueError, match="hidden_act='gelu': Mamba2 blocks here use SiLU"):
        Mamba2Config.from_dict({**given, "hidden_act": "gelu"})
    assert Mamba2Config.from_dict({**given, "hidden_act": "swish"}) == ours


@pytest.mark.parametrize("in_fp32", [True, False])
def test_the_residual_stream_of_a_bf16_model_is_float32_where_the_config_says(in_fp32):
    """What every norm reads (the residual stream) in the forward and in the decoding step: float32 with
    residual_in_fp32 (as mamba_ssm keeps it), the model's dtype without; the logits are bf16 either way."""
    torch.manual_seed(0)
    m = randomize_(Mamba2LM(tiny_config(residual_in_fp32=in_fp32), decode_backend="torch")).eval().bfloat16()
    read = []
    norms = [block.norm for block in m.layers] + [m.norm_f]
    hooks = [norm.register_forward_pre_hook(lambda _, args: read.append(args[0].dtype)) for norm in norms]
    ids = torch.randint(0, 1000, (2, 9))
    want = [torch.float32 if in_fp32 else torch.bfloat16] * len(norms)
    with torch.no_grad():
        logits = m(ids)
        assert read == want, "forward"
        cache = m.allocate_cache(2)
        m(ids[:, :8], cache=cache)
        read.clear()
        step_logits = m.decoder(2)(ids[:, 8], cache)
        assert read == want, "step"
    for hook in hooks:
        hook.remove()
    assert logits.dtype == step_logits.dtype == torch.bfloat16


def test_a_bf16_model_decodes_with_a_float32_conv_history():
    """allocate_cache's dtype is the conv history's: a bf16 model may keep it in float32 (the forward and the step
    read it in the model's dtype); its logits follow those of the default bf16 history."""
    torch.manual_seed(0)
    m = randomize_(Mamba2LM(tiny_config(chunk_size=8), decode_backend="torch"), seed=3).eval().bfloat16()
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(3))
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        cache = m.allocate_cache(2, dtype=dtype)
        with torch.no_grad():
            m(ids[:, :6], cache=cache)
        step = m.decoder(2)
        out[dtype] = torch.stack([step(ids[:, t], cache) for t in range(6, 9)], dim=1)  # (2, 3, Vp)
        assert out[dtype].dtype == torch.bfloat16 and cache.conv.dtype == dtype
    # measured 0.004 (logits up to 0.6): the two histories differ by bf16 rounding only
    assert (out[torch.float32].float() - out[torch.bfloat16].float()).abs().max().item() <= 0.02


def test_config_json_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64}))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / 'config.json')) + ": .*lacks 'n_layer'"):
        Mamba2Config.load(tmp_path)


def test_tied_checkpoint_without_a_known_embedding_key_lists_it_missing(model, tmp_path):
    """A tied config, lm_head.weight present, the embedding under a name we do not know: the one
    mismatch error (not a TypeError from comparing the head with nothing)."""
    model.save_pretrained(tmp_path)
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    sd["backbone.word_embeddings.weight"] = sd.pop("backbone.embedding.weight")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path)
    assert "missing key embedding.weight" in str(e.value) and "unexpected key word_embeddings.weight" in str(e.value)


def test_initialisation_for_training_from_scratch_is_the_official_one():
    """Issue 2's init, read back from the weights: softplus(dt_bias) log-uniform in [1e-3, 1e-1], A = −exp(A_log)
    with −A ~ U(1, 16), D = 1, norms 1, in_proj ~ U(±1/√fan_in) (PyTorch's Linear) and out_proj the same
    divided by √n_layer; and `reset_parameters(seed)` draws the same weights again."""
    cfg = Mamba2Config(d_model=128, n_layer=4, vocab_size=100, d_state=16, headdim=4)  # 64 heads per layer
    m = Mamba2LM(cfg)
    m.reset_parameters(seed=0)
    mixers = [block.mixer for block in m.layers]
    dt = torch.cat([torch.nn.functional.softplus(x.dt_bias.double()) for x in mixers])  # (n_layer·H,) = (256,)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    # log-uniform: log10(dt) uniform in [-3, -1], so each of its two decades holds about half of the 256 draws
    assert 0.35 < (dt < 1e-2).double().mean() < 0.65 and dt.min() < 1.2e-3 and dt.max() > 0.08
    minus_A = torch.cat([x.A_log.exp() for x in mixers])  # (256,): −A
    assert minus_A.min() >= 1 - 1e-5 and minus_A.max() <= 16 * (1 + 1e-5)
    assert 0.35 < (minus_A < 8.5).double().mean() < 0.65 and minus_A.min() < 1.5 and minus_A.max() > 15
    for x in mixers:
        assert torch.equal(x.D, torch.ones_like(x.D)) and torch.equal(x.norm.weight, torch.ones_like(x.norm.weight))
        bound_in = 1 / cfg.d_model ** 0.5  # in_proj: fan_in d_model
        bound_out = 1 / cfg.d_inner ** 0.5 / cfg.n_layer ** 0.5  # out_proj: fan_in d_inner, then / √n_layer
        assert 0.95 * bound_in < x.in_proj.weight.abs().max() <= bound_in
        assert 0.95 * bound_out < x.out_proj.weight.abs().max() <= bound_out
    assert abs(m.embedding.weight.std().item() - cfg.initializer_range) < 0.002
    again = Mamba2LM(cfg)
    again.reset_parameters(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    """The same gradients with checkpointing on, and it is on: each block's forward runs again in the
    backward (without that check the test passed with checkpointing never applied)."""
    torch.manual_seed(2)
    m = randomize_(Mamba2LM(tiny_config(chunk_size=8)), seed=2)
    assert m.training
    ids = torch.randint(0, 1000, (2, 24))
    block_runs, run_block = [], m._block
    monkeypatch.setattr(m, "_block", lambda *a: block_runs.append(1) or run_block(*a))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        block_runs.clear()
        m(ids).logsumexp(-1).mean().backward()
        assert len(block_runs) == m.config.n_layer * (2 if ckpt else 1), (ckpt, len(block_runs))
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(g.abs().max() > 1e-3 for g in grads[0])


def test_auto_scan_backend_is_triton_on_cuda_torch_on_cpu_says_so_and_a_missing_triton_is_an_error(
        caplog, monkeypatch, fake_gpu):
    """Issue 4: the "triton" backend is the default on CUDA, the torch reference on a CPU unless asked otherwise,
    and the model says which; issue 2: a missing Triton is an error, never a silent fallback."""
    m = Mamba2LM(tiny_config())
    assert m.backend == "auto"
    fake_gpu((9, 0), "NVIDIA H100 80GB HBM3")
    assert m.scan_backend(torch.device("cuda")) == "triton" and m.scan_backend("cuda:1") == "triton"
    assert m.scan_backend() == m.scan_backend("cpu") == "torch"
    with caplog.at_level("INFO", logger="minimamba"), torch.no_grad():
        m(torch.zeros(1, 4, dtype=torch.long))
    assert "SSD scan backend = torch (auto on cpu)" in caplog.text
    m.backend = "triton"
    assert m.scan_backend("cpu") == "triton"
    monkeypatch.setitem(sys.modules, "kernels", None)  # as if Triton (and so `kernels`) could not be imported
    with pytest.raises(RuntimeError, match=r"the 'triton' scan backend needs Triton .*backend='torch'"), torch.no_grad():
        m(torch.zeros(1, 4, dtype=torch.long))



def test_a_gpu_older_than_triton_supports_gets_the_torch_scan_and_float32(caplog, fake_gpu, monkeypatch):
    """Below compute capability 8.0 (a T4, a V100) Triton is unsupported and its bfloat16 dots do not compile:
    "auto" picks the torch scan there and says why, "triton" asked for is kept but warned about; --dtype auto
    computes in float32 there, and --dtype bfloat16 is refused naming the GPU (8.0 and up: bfloat16, Triton)."""
    from minimamba.model import gpu_too_old
    from minimamba.training import SetupError, compute_text, resolve_autocast

    fake_gpu((7, 5), "Tesla T4")
    cuda = torch.device("cuda")
    assert gpu_too_old(cuda) == "Tesla T4 has compute capability 7.5; Triton and bfloat16 arithmetic need 8.0 or newer"
    assert gpu_too_old("cpu") is None
    m = Mamba2LM(tiny_config())
    assert m.scan_backend(cuda) == "torch" and m.scan_chunk(cuda) == m.config.chunk_size
    with caplog.at_level("INFO", logger="minimamba"):
        m._scan(cuda)
        m.backend = "triton"
        m._scan(cuda)
    [auto, asked] = caplog.records
    assert (auto.levelname, auto.getMessage()) == ("INFO", "minimamba: SSD scan backend = torch (auto on cuda; Tesla "
                                                   "T4 has compute capability 7.5; Triton and bfloat16 arithmetic "
                                                   "need 8.0 or newer)")
    assert asked.levelname == "WARNING" and "= triton (requested; Tesla T4 has compute capability 7.5; " \
        "Triton and bfloat16 arithmetic need 8.0 or newer: Triton may fail there; launches:" in asked.getMessage()
    assert resolve_autocast("auto", cuda) is None and resolve_autocast("float32", cuda) is None
    assert compute_text(None, cuda) == ("float32 with float32 master weights (Tesla T4 has compute capability 7.5; "
                                        "Triton and bfloat16 arithmetic need 8.0 or newer)")
    assert compute_text(None, "cpu") == "float32 with float32 master weights"
    with pytest.raises(SetupError, match=r"^--dtype bfloat16: Tesla T4 has compute capability 7\.5; Triton and "
                                         r"bfloat16 arithmetic need 8\.0 or newer\. Use --dtype float32"):
        resolve_autocast("bfloat16", cuda)
    fake_gpu((8, 0), "NVIDIA A100-SXM4-80GB")
    assert gpu_too_old(cuda) is None and resolve_autocast("auto", cuda) == resolve_autocast("bf16", cuda) == torch.bfloat16
    assert compute_text(torch.bfloat16, cuda) == "bfloat16 autocast with float32 master weights"
    monkeypatch.setattr(torch.version, "hip", "6.2")  # an AMD GPU: its "capability" is its gfx architecture
    fake_gpu((7, 5), "gfx75x")
    assert gpu_too_old(cuda) is None
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no CUDA in this torch: nothing runs there
    assert gpu_too_old(cuda) is None and Mamba2LM(tiny_config()).scan_backend(cuda) == "triton"
    assert Mamba2LM(tiny_config()).scan_backend(cuda) == "triton"

def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown scan backend 'cuda'"):
        Mamba2LM(tiny_config(), backend="cuda")
    m = Mamba2LM(tiny_config())  # set later, as the README shows: a typo ran (and logged) a backend of its name
    with pytest.raises(ValueError, match="unknown scan backend 'torhc'"):
        m.backend = "torhc"
    with pytest.raises(ValueError, match="unknown decode backend 'toch'"):
        m.decode_backend = "toch"
    m.backend, m.decode_backend = "torch", "torch"
    assert (m.scan_backend(), m.backend, m.decode_backend) == ("torch", "torch", "torch")
    m.scan_chunk_size = 0  # (was taken as "the default")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        m(torch.zeros(1, 4, dtype=torch.long))


# sampling ------------------------------------------------------------------------------------------
def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))


def test_seeded_sampling_reproduces(model):
    prompt = torch.randint(0, 1000, (2, 5))
    a = model.generate(prompt, 10, temperature=1.0, top_p=0.9, seed=7)
    b = model.generate(prompt, 10, temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(a, b)
    # and it is sampling: another seed, or greedy decoding, gives other tokens (a generate that ignored the
    # temperature would reproduce too)
    assert not torch.equal(a, model.generate(prompt, 10, temperature=1.0, top_p=0.9, seed=8))
    assert not torch.equal(a, model.generate(prompt, 10))


def test_top_k_and_top_p_supports():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = lambda temperature=1.0, **kw: {int(sample(logits, temperature=temperature, generator=g, **kw))
                                           for _ in range(300)}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.75) == {0, 1}  # 0.5 < 0.75 ≤ 0.5 + 0.3
    assert draws(top_p=0.5) == {0}
    assert draws(top_p=0.81) == {0, 1, 2}
    assert draws() == {0, 1, 2, 3}
    # top_p reads the distribution at the temperature (as HF's warpers run: temperature, then top-p); (a nucleus
    # taken before the temperature passed the checks above, all at temperature 1)
    # T = 2: p ∝ sqrt(0.5, 0.3, 0.15, 0.05) = (0.379, 0.294, 0.208, 0.120): 0.673 < 0.75 ≤ 0.880
    assert draws(temperature=2.0, top_p=0.75) == {0, 1, 2}
    # T = 0.5: p ∝ (0.5², 0.3², 0.15², 0.05²) = (0.685, 0.247, 0.062, 0.007): 0.6 ≤ 0.685
    assert draws(temperature=0.5, top_p=0.6) == {0}


def test_generation_never_picks_padding_rows(model):
    """Make the padding rows (ids ≥ vocab_size) the most likely: they must still never be picked.

    The 8 padding rows of the tied head are ±1000·u for 4 orthonormal directions u, so whatever the final
    hidden state h, one of them scores 1000·max|h·u|, far above every real row (checked below on the prompts:
    unmasked, the argmax is a padding row). (Before: 50 × the mean embedding row, which scored below the real
    rows for these prompts, so the test passed with the padding mask of `generate` removed.)"""
    m = Mamba2LM(tiny_config()).eval()
    m.load_state_dict(model.state_dict())
    assert m.lm_head.weight is m.embedding.weight
    with torch.no_grad():
        u = torch.linalg.qr(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))[0].T  # (4, D)
        m.embedding.weight[1000:] = 1000 * torch.cat([u, -u])
    prompts = [torch.randint(0, 1000, (2, 4), generator=torch.Generator().manual_seed(1)),
               torch.zeros(1, 3, dtype=torch.long)]
    with torch.no_grad():
        for prompt in prompts:  # the precondition: without the mask, a padding row would win
            assert bool((m(prompt)[:, -1].argmax(-1) >= 1000).all())
    for backend in ("torch", "c"):
        m.decode_backend = backend
        out = m.generate(prompts[0], 8, temperature=1.0, seed=0)
        assert out.shape == (2, 12) and out.max() < 1000, backend
        out = m.generate(prompts[1], 8)
        assert out.shape == (1, 11) and out.max() < 1000, backend


def test_generation_stops_at_eos(model):
    prompt = torch.randint(0, 1000, (2, 4))
    free = model.generate(prompt, 6)
    eos = int(free[0, 5])  # the 2nd generated token of row 0
    out = model.generate(prompt, 6, eos_token_id=eos)
    # by hand from the free run (greedy: the same tokens up to each row's first EOS): each row is padded with
    # EOS after its first one, and generation stops once every row has one (a stop at the first row's EOS,
    # or padding that began a token late, passed the old check, that row 0 ends in EOS)
    rows, firsts = free[:, 4:].clone(), []
    for row in rows:
        hits = (row == eos).nonzero()
        if len(hits):
            firsts.append(int(hits[0]))
            row[firsts[-1] + 1:] = eos
    n_new = max(firsts) + 1 if len(firsts) == len(rows) else 6
    assert firsts[0] <= 1 and torch.equal(out, torch.cat([prompt, rows[:, :n_new]], dim=1))


def test_from_pretrained_downloads_a_hub_checkpoint(model, tmp_path, server):
    """A Hub repo id is fetched from $HF_ENDPOINT (here a local server) into the cache, then loaded."""
    model.save_pretrained(tmp_path / "ckpt")
    for name in ("config.json", "pytorch_model.bin"):
        server.files[f"/state-spaces/mamba2-test/resolve/main/{name}"] = (tmp_path / "ckpt" / name).read_bytes()
    loaded = from_pretrained("state-spaces/mamba2-test").eval()
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    n_requests = len(server.requests)
    from_pretrained("state-spaces/mamba2-test")  # the second time comes from the cache
    assert len(server.requests) == n_requests


def test_from_pretrained_hub_weights_fallback_to_safetensors(hf_pair, tmp_path, server):
    hf, _ = hf_pair
    hf.save_pretrained(tmp_path / "hf")  # an HF-layout repo: config.json + model.safetensors, no .bin
    for name in ("config.json", "model.safetensors"):
        server.files[f"/someone/mamba2-hf/resolve/main/{name}"] = (tmp_path / "hf" / name).read_bytes()
    model = from_pretrained("someone/mamba2-hf").eval()
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_unreachable_hub_fails_fast_with_advice(monkeypatch, tmp_path):
    import time

    from minimamba.download import DownloadError

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setenv("MINIMAMBA_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(DownloadError) as e:
        from_pretrained("state-spaces/mamba2-370m")
    assert time.monotonic() - start < 30
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("out_features,bias", [(48, False), (40, True), (44, False)], ids=["blocked", "blocked_bias", "uneven"])
def test_decode_linear_equals_the_layer(out_features, bias):
    """The decoding step's blocked matrix-vector product (used with > 1 thread) is the layer itself."""
    from minimamba.model import decode_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(24, out_features, bias=bias)
    x = torch.randn(3, 24)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.testing.assert_close(decode_linear(x, layer), layer(x), rtol=1e-6, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_config_refusals_name_the_option_and_what_is_accepted_reads():
    """Each refusal of config.py on its own (an option minimamba does not implement must not load as if it
    were absent), and the values next to them that do read; the padded vocabulary by a plain loop."""
    bare = {"d_model": 64, "n_layer": 2, "vocab_size": 1000, "ssm_cfg": {"layer": "Mamba2"}}
    refused = [
        ({**bare, "d_intermediate": 128}, "configs with MLP blocks (d_intermediate > 0) or attention layers"),
        ({**bare, "attn_layer_idx": [1]}, "configs with MLP blocks (d_intermediate > 0) or attention layers"),
        ({**bare, "ssm_cfg": {"layer": "Mamba2", "norm_before_gate": True}},
         "unsupported Mamba2 options in ssm_cfg: {'norm_before_gate': True}"),
        ({**bare, "ssm_cfg": {"layer": "Mamba2", "dt_limit": [0.0, 0.1]}},
         "unsupported Mamba2 options in ssm_cfg: {'dt_limit': [0.0, 0.1]}"),
        ({**bare, "ssm_cfg": {"layer": "Mamba2", "D_has_hdim": True}}, "unsupported Mamba2 options in ssm_cfg"),
        ({**bare, "ssm_cfg": ["Mamba2"]}, "ssm_cfg must be a JSON object, got ['Mamba2']"),
        ({**bare, "ssm_cfg": {"layer": "Mamba3"}}, "ssm_cfg.layer is 'Mamba3'; minimamba implements Mamba2 only"),
    ]
    hf = {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "head_dim": 16, "state_size": 16}
    refused += [
        ({**hf, "num_heads": 7}, "HF config num_heads=7 disagrees with expand·hidden_size/head_dim = 8"),
        ({**hf, "norm_before_gate": True}, "only rms_norm=True, norm_before_gate=False Mamba2 configs"),
        ({**hf, "rms_norm": False}, "only rms_norm=True, norm_before_gate=False Mamba2 configs"),
        ({**hf, "time_step_limit": [0.0, {"__float__": "1e3"}]}, "unsupported Mamba2 option time_step_limit"),
        ({**hf, "time_step_limit": [0.001, {"__float__": "Infinity"}]}, "unsupported Mamba2 option time_step_limit"),
    ]
    for d, message in refused:
        with pytest.raises(ValueError, match=re.escape(message)):
            Mamba2Config.from_dict(d)
    base = Mamba2Config.from_dict(bare)
    for same in ({**bare, "ssm_cfg": {"layer": "Mamba2", "dt_limit": [0.0, float("inf")], "d_ssm": None}},
                 {**bare, "d_intermediate": 0, "attn_layer_idx": []}):
        assert Mamba2Config.from_dict(same) == base
    ours = Mamba2Config.from_dict({**hf, "num_heads": 8})
    # transformers >= 5 writes inf as {"__float__": "Infinity"}; null means no limit too
    for limit in ([0.0, {"__float__": "Infinity"}], None, [0, float("inf")]):
        assert Mamba2Config.from_dict({**hf, "time_step_limit": limit}) == ours

    for kw, message in [(dict(d_model=True), "d_model must be an integer, got True"),
                        (dict(n_layer=2.0), "n_layer must be an integer, got 2.0"),
                        (dict(tie_embeddings=1), "tie_embeddings must be true or false, got 1"),
                        (dict(norm_eps="1e-5"), "norm_eps must be a number, got '1e-5'"),
                        (dict(norm_eps=0.0), "norm_eps must be a positive finite number, got 0.0"),
                        (dict(norm_eps=float("nan")), "norm_eps must be a positive finite number, got nan"),
                        (dict(dt_init_floor=-1e-4), "dt_init_floor must be a non-negative finite number, got -0.0001"),
                        (dict(dt_max=1e-4), "dt_max must be finite and at least dt_min = 0.001, got 0.0001"),
                        (dict(A_init_max=float("inf")), "A_init_max must be finite and at least A_init_min = 1.0, got inf"),
                        (dict(headdim=48), "d_inner = expand·d_model = 128 is not a multiple of headdim 48")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            tiny_config(**kw)
    assert tiny_config(norm_eps=1).norm_eps == 1  # (an int is a number)
    for vocab, multiple in [(1000, 16), (1008, 16), (1009, 16), (1, 8), (50277, 16), (50277, 1)]:
        padded = next(n for n in range(vocab, vocab + multiple) if n % multiple == 0)  # the least multiple >= V
        assert tiny_config(vocab_size=vocab, pad_vocab_size_multiple=multiple).padded_vocab_size == padded
    with pytest.raises(ValueError, match=re.escape("unknown Mamba2Config fields: ['dmodel']")):
        tiny_config().replace(dmodel=8)
