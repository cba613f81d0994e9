"""Checkpoint loading edge cases: HF-layout vocabularies that are no multiple of 16, dtypes (of the
checkpoint's tensors and of `dtype=`), Mamba-1 configs, a mistyped local path, and the benchmark's
activation checkpointing of the HF model."""

import json

import pytest
import torch

from minimamba import Mamba2Config, Mamba2LM, from_pretrained
from minimamba.hub import CheckpointError
from tests.conftest import randomize_


def tiny_config(**kw):
    base = dict(d_model=64, n_layer=2, vocab_size=1000, d_state=16, headdim=16, chunk_size=32)
    return Mamba2Config(**{**base, **kw})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random model and its state-spaces checkpoint directory."""
    torch.manual_seed(3)
    model = randomize_(Mamba2LM(tiny_config()), seed=3).eval()
    d = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(d)
    return model, d


@pytest.mark.parametrize("vocab", [1000, 50277])
def test_hf_save_pretrained_loads_whatever_its_vocab_size(vocab, tmp_path):
    """HF pads nothing (and transformers 5 writes no pad_vocab_size_multiple): its vocab_size is the
    embedding's row count, which must not be padded again to a multiple of 16."""
    transformers = pytest.importorskip("transformers", reason="HF transformers is the test-only oracle for Mamba2")
    hf_cfg = transformers.Mamba2Config(hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=16, num_heads=8,
                                       expand=2, n_groups=1, chunk_size=32, vocab_size=vocab, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = randomize_(transformers.Mamba2ForCausalLM(hf_cfg)).eval()
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path).eval()
    assert model.embedding.weight.shape == (vocab, 64)
    ids = torch.randint(0, vocab, (1, 40))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def write_checkpoint(saved, directory, edit):
    """`saved`'s checkpoint, its state dict changed by `edit(sd)`, written to `directory`."""
    _, d = saved
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    edit(sd)
    torch.save(sd, directory / "pytorch_model.bin")
    (directory / "config.json").write_text((d / "config.json").read_text())
    return directory


@pytest.mark.parametrize("key,dtype", [("A_log", torch.int64), ("D", torch.bool), ("D", torch.complex64),
                                       ("in_proj.weight", torch.int8)])
def test_non_floating_checkpoint_tensors_are_refused_by_name(saved, tmp_path, key, dtype):
    name = f"backbone.layers.1.mixer.{key}"

    def quantize(sd):
        sd[name] = (sd[name] * 100).to(dtype)

    with pytest.raises(CheckpointError, match=f"not floating point: {name} \\({dtype}\\)"):
        from_pretrained(write_checkpoint(saved, tmp_path, quantize))


def test_keys_with_a_model_prefix_load_and_two_spellings_of_one_key_are_refused(saved, tmp_path):
    model, _ = saved
    ids = torch.randint(0, 1000, (1, 20))
    def prefix(sd):
        for key in list(sd):
            sd["model." + key] = sd.pop(key)

    prefixed = write_checkpoint(saved, tmp_path, prefix)
    with torch.no_grad():
        assert torch.equal(from_pretrained(prefixed).eval()(ids), model(ids))  # ("model." as some exports write)

    def twice(sd):  # the same weight under another spelling, with other values: neither may win silently
        sd["model.backbone.norm_f.weight"] = torch.full_like(sd["backbone.norm_f.weight"], 7.0)
        sd["backbone.embeddings.weight"] = torch.zeros_like(sd["backbone.embedding.weight"])

    with pytest.raises(CheckpointError) as err:
        from_pretrained(write_checkpoint(saved, tmp_path, twice))
    assert "keys backbone.norm_f.weight and model.backbone.norm_f.weight are both norm_f.weight: keep one" in str(err.value)
    assert "keys backbone.embedding.weight and backbone.embeddings.weight are both embedding.weight" in str(err.value)
    assert "tie_embeddings" not in str(err.value)  # (the tied head differs from one of them: not the cause)


def test_a_head_that_differs_from_the_embedding_it_is_tied_to_is_refused(saved, tmp_path):
    def untie(sd):
        sd["lm_head.weight"] = sd["lm_head.weight"] + 1  # (saved tied: the same tensor as the embedding)

    with pytest.raises(CheckpointError, match="config ties the embeddings but lm_head.weight differs from the "
                                              "embedding; set tie_embeddings=false in config.json"):
        from_pretrained(write_checkpoint(saved, tmp_path, untie))


def test_dtype_takes_names_and_refuses_non_floating(saved):
    _, d = saved
    for given, want in [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("torch.float16", torch.float16),
                        ("fp32", torch.float32), (torch.float64, torch.float64), (None, torch.float32)]:
        assert {p.dtype for p in from_pretrained(d, dtype=given).parameters()} == {want}, given
    # float8 is floating point, but it loaded and then the forward failed (NotImplementedError): refused up front
    float8 = [n for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
    float8 += [getattr(torch, n) for n in float8]  # by name and as a torch.dtype
    for bad in (torch.int64, "int8", "complex64", "cuda", "nonsense", 16, *float8):
        with pytest.raises(ValueError, match="is not a floating-point dtype the model computes in; pass "
                                             "torch.float16, torch.bfloat16, torch.float32 or torch.float64"):
            from_pretrained(d, dtype=bad)


def test_round_trip_in_the_saved_dtype_is_bit_identical(saved, tmp_path):
    model, d = saved
    ids = torch.randint(0, 1000, (2, 33))
    with torch.no_grad():
        assert torch.equal(model(ids), from_pretrained(d).eval()(ids))
        bf16 = Mamba2LM(model.config).eval()
        bf16.load_state_dict(model.state_dict())
        bf16.to(torch.bfloat16).save_pretrained(tmp_path)
        assert torch.equal(bf16(ids), from_pretrained(tmp_path, dtype="bf16").eval()(ids))
        # without dtype= it comes back float32 (as the README says)
        assert from_pretrained(tmp_path).embedding.weight.dtype == torch.float32


def test_mamba1_configs_are_refused_as_mamba1(tmp_path):
    # state-spaces/mamba-* (Mamba-1): no ssm_cfg "layer", which mamba_ssm reads as Mamba1
    mamba1 = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
    for cfg in (mamba1, {k: v for k, v in mamba1.items() if k != "ssm_cfg"},
                {**mamba1, "ssm_cfg": {"layer": "Mamba1"}},
                {"model_type": "mamba", "hidden_size": 768, "num_hidden_layers": 24, "state_size": 16}):
        with pytest.raises(ValueError, match="Mamba-1 checkpoints are not supported \\(this is Mamba2 only\\)"):
            Mamba2Config.from_dict(cfg)
    (tmp_path / "config.json").write_text(json.dumps(mamba1))
    with pytest.raises(ValueError, match="Mamba-1 checkpoints are not supported"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'llama', not 'mamba2'"):
        Mamba2Config.from_dict({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2})
    # the official state-spaces/mamba2-* config.json still reads (ssm_cfg {"layer": "Mamba2"})
    public = {**mamba1, "ssm_cfg": {"layer": "Mamba2"}, "d_intermediate": 0, "attn_layer_idx": [], "attn_cfg": {},
              "pad_vocab_size_multiple": 16, "tie_embeddings": True}
    assert Mamba2Config.from_dict(public) == Mamba2Config.from_scale("130m")


def test_a_mistyped_local_path_says_no_such_folder(server, tmp_path, monkeypatch):
    from minimamba.download import DownloadError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DownloadError, match="there is no local folder runs/step-100 .*could not be downloaded"):
        from_pretrained("runs/step-100")
    from minimamba import load_tokenizer

    with pytest.raises(DownloadError, match="there is no local folder data/tokenizr .*could not be downloaded"):
        load_tokenizer("data/tokenizr")  # (the tokenizer's name is read the same way)
    requests = len(server.requests)
    for path in ("runs/step-100/ckpt", "ckpt"):  # no repo id (owner/name) either: said so, nothing downloaded
        with pytest.raises(FileNotFoundError, match=f"'{path}' is neither an existing checkpoint directory nor a Hub "
                                                    "repo id like 'state-spaces/mamba2-130m'"):
            from_pretrained(path)
    assert len(server.requests) == requests


def test_a_hub_repo_without_weights_names_both_weight_files_and_why_each_failed(server):
    """config.json is there, neither weight file is: one error that says which files were tried, and each one's
    answer, so the user sees a missing file rather than a network problem."""
    from minimamba.download import DownloadError

    server.files["/org/no-weights/resolve/main/config.json"] = b"{}"  # (not read before the weights are there)
    with pytest.raises(DownloadError) as err:
        from_pretrained("org/no-weights")
    message = str(err.value)
    assert message.startswith("could not download weights of org/no-weights (pytorch_model.bin / model.safetensors):")
    for name in ("pytorch_model.bin", "model.safetensors"):
        assert f"{server.url}/org/no-weights/resolve/main/{name} failed: HTTP 404" in message
    assert [r[0] for r in server.requests] == [f"/org/no-weights/resolve/main/{name}"
                                               for name in ("config.json", "pytorch_model.bin", "model.safetensors")]


def test_bench_checkpointing_switches_on_hf_blocks_too():
    """With `--checkpointing` both sides' blocks run their mixers again in the backward (an attribute
    set on HF's blocks without HF's own enable method passed a check of the attribute, then crashed in
    the train row)."""
    transformers = pytest.importorskip("transformers", reason="HF transformers is the test-only oracle for Mamba2")
    from minimamba.bench import _set_checkpointing

    cfg = tiny_config()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    for impl, model in (("hf", transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**cfg.to_dict("hf")))),
                        ("minimamba", Mamba2LM(cfg))):
        runs = []
        for mixer in (m for m in model.modules() if type(m).__name__ == "Mamba2Mixer"):  # (both name it so)
            mixer.register_forward_pre_hook(lambda *a: runs.append(1))  # (a recompute may stop before the end)
        model.train()  # (checkpointing applies in training only)
        for ckpt in (False, True):  # (in this order: _set_checkpointing switches on, not off)
            _set_checkpointing(model, impl, ckpt)
            runs.clear()
            out = model(ids)
            (out if impl == "minimamba" else out.logits).logsumexp(-1).mean().backward()
            assert len(runs) == cfg.n_layer * (2 if ckpt else 1), (impl, ckpt, len(runs))


def test_an_untied_checkpoint_loads_its_own_head_and_a_config_file_path_names_its_folder(tmp_path):
    """tie_embeddings=false: lm_head.weight is its own tensor, loaded (not dropped as for a tied config,
    which left the head unloaded); and the path of the config.json, not only its folder, loads the same."""
    torch.manual_seed(4)
    model = randomize_(Mamba2LM(tiny_config(tie_embeddings=False)), seed=4).eval()
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 1000, (2, 17))
    for where in (tmp_path, tmp_path / "config.json"):
        loaded = from_pretrained(where).eval()
        assert loaded.lm_head.weight is not loaded.embedding.weight
        assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
        with torch.no_grad():
            assert torch.equal(loaded(ids), model(ids)), where


def test_a_tied_checkpoint_without_lm_head_weight_loads_with_the_head_tied(saved, tmp_path):
    """Issue 2: "ties the head when lm_head.weight is absent" (some tied exports leave it out), with the logits
    of the checkpoint that holds it."""
    model, _ = saved
    d = write_checkpoint(saved, tmp_path, lambda sd: sd.pop("lm_head.weight"))
    assert "lm_head.weight" not in torch.load(d / "pytorch_model.bin", weights_only=True)
    loaded = from_pretrained(d).eval()
    assert loaded.lm_head.weight is loaded.embedding.weight
    ids = torch.randint(0, 1000, (1, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_a_save_that_fails_midway_leaves_the_checkpoint_it_was_replacing(saved, tmp_path, monkeypatch):
    """Issue 2: save_pretrained writes atomically. A disk that fills up half-way through the weights (here
    torch.save writes 1,000 bytes, then raises) leaves the previous checkpoint loadable as it was, and no
    temporary file."""
    model, _ = saved
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = randomize_(Mamba2LM(tiny_config()), seed=4)

    def full_disk(obj, f, *a, **kw):
        with open(f, "wb") as out:
            out.write(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        other.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # (no .tmp left either)
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path).eval()(ids), model(ids))


def test_the_mismatch_error_lists_every_problem_and_nothing_else(saved, tmp_path):
    """Several problems of each kind, the first and the last key of the model among them: the error's
    lines are exactly these (worked out by hand for tiny_config: H = 2·64/16 = 8 heads, conv channels
    2·64 + 2·1·16 = 160, vocabulary 1000 padded to 1008)."""
    def break_(sd):
        del sd["backbone.norm_f.weight"]  # (the model's last key with a tied head)
        del sd["backbone.layers.0.mixer.A_log"]
        del sd["lm_head.weight"]  # (tied: its absence is no problem)
        sd["backbone.embedding.weight"] = torch.zeros(1001, 64)  # (the model's first key)
        sd["backbone.layers.1.mixer.conv1d.bias"] = torch.zeros(3)
        sd["backbone.layers.9.norm.weight"] = torch.zeros(2)
        sd["backbone.extra"] = torch.zeros(1)

    d = write_checkpoint(saved, tmp_path, break_)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(d)
    head, *lines = str(err.value).split("\n")
    assert head == (f"checkpoint {d} does not match its config.json (d_model=64, n_layer=2, d_state=16, headdim=16, "
                    "ngroups=1, vocab=1008):")
    assert sorted(line.strip() for line in lines) == sorted([
        "missing key layers.0.mixer.A_log (8,)",
        "missing key norm_f.weight (64,)",
        "unexpected key layers.9.norm.weight (2,)",
        "unexpected key extra (1,)",
        "wrong shape for embedding.weight: checkpoint (1001, 64), config expects (1008, 64)",
        "wrong shape for layers.1.mixer.conv1d.bias: checkpoint (3,), config expects (160,)",
    ])


def test_a_config_of_another_depth_is_refused_before_the_model_is_built(saved, tmp_path):
    """The checkpoint's blocks are counted before the model is built: a config.json of another scale says
    so in one line (not a listing of every key of the missing blocks), and an absurd n_layer is refused at
    once (building 10⁶ blocks, even on the meta device, would take hours)."""
    for n_layer in (3, 1, 10**6):
        d = write_checkpoint(saved, tmp_path, lambda sd: None)
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, "n_layer": n_layer}))
        with pytest.raises(CheckpointError) as err:
            from_pretrained(d)
        assert str(err.value) == (
            f"checkpoint {d} has 2 blocks (layers.0 to layers.1), but its config.json says n_layer={n_layer}: "
            "the weights and the config come from different models (another scale?); put the config.json that "
            "came with these weights beside them")


def test_the_mismatch_error_lists_40_problems_then_counts_the_rest(saved, tmp_path):
    def add_extra_keys(sd):
        for i in range(45):
            sd[f"backbone.extra{i:02d}"] = torch.zeros(1)

    d = write_checkpoint(saved, tmp_path, add_extra_keys)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(d)
    head, *lines = str(err.value).split("\n")
    assert [line.strip() for line in lines] == [f"unexpected key extra{i:02d} (1,)" for i in range(40)] + [
        "and 5 more problems"]


def test_many_non_floating_tensors_are_counted_and_a_non_tensor_value_is_refused(saved, tmp_path):
    names = [f"backbone.layers.{i}.mixer.{k}" for i in (0, 1) for k in ("A_log", "D", "dt_bias", "conv1d.bias",
                                                                         "norm.weight")]  # 10 tensors

    in_file_order = []

    def quantize(sd):
        for name in names:
            sd[name] = sd[name].to(torch.int32)
        in_file_order.extend(k for k in sd if k in names)

    with pytest.raises(CheckpointError) as err:
        from_pretrained(write_checkpoint(saved, tmp_path, quantize))
    listed = ", ".join(f"{n} (torch.int32)" for n in in_file_order[:8])  # the first 8 in the file's order, then a count
    assert f"not floating point: {listed} and 2 more. A Mamba2 checkpoint" in str(err.value)

    def non_tensor(sd):
        sd["backbone.layers.0.mixer.D"] = [1.0] * 8

    with pytest.raises(CheckpointError, match="does not hold a flat state dict of tensors"):
        from_pretrained(write_checkpoint(saved, tmp_path, non_tensor))


def test_dtype_names_are_read_whatever_their_case(saved):
    _, d = saved
    for given, want in [("BF16", torch.bfloat16), (" Float16 ", torch.float16), ("torch.FLOAT64", torch.float64)]:
        assert {p.dtype for p in from_pretrained(d, dtype=given).parameters()} == {want}, given
