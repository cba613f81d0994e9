"""generate and sample: prompts of different lengths, the checks on prompts, caches and step ids, the sampling
arguments, and a float64 model. (Generation against HF transformers is in tests/test_model.py.)"""

import math
import shutil

import numpy as np
import pytest
import torch

from minimamba import Mamba2Config, Mamba2LM
from minimamba.model import row_seed, sample
from tests.conftest import randomize_

CFG = Mamba2Config(d_model=64, n_layer=2, vocab_size=1000, d_state=16, headdim=16, ngroups=2, chunk_size=8)
BACKENDS = ["torch", pytest.param("c", marks=pytest.mark.skipif(shutil.which("cc") is None,
                                                                 reason="the C decode step needs a C compiler"))]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(Mamba2LM(CFG), seed=2, biases=True).eval()


def prompts_of_lengths(*lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (n,), generator=g) for n in lengths]


# prompts of different lengths ----------------------------------------------------------------------
@pytest.mark.parametrize("decode_backend", BACKENDS)
def test_a_list_of_prompts_of_different_lengths_gives_what_each_prompt_gives_alone(model, decode_backend):
    model.decode_backend = decode_backend
    prompts = prompts_of_lengths(7, 1, 12)
    sampling = dict(temperature=1.0, top_k=100, top_p=0.9)
    eos = int(model.generate(prompts[1][None], 2, **sampling, seed=row_seed(3, 1))[0, 2])  # prompt 1's 2nd token
    for kw in (dict(), dict(sampling, seed=3, eos_token_id=eos)):  # greedy; seeded sampling with an EOS
        out = model.generate(prompts, 6, **kw)
        for i, p in enumerate(prompts):  # row i samples with row_seed(3, i)
            alone = model.generate(p[None], 6, **{**kw, **({"seed": row_seed(3, i)} if kw else {})})[0]
            assert torch.equal(out[i], alone), f"prompt {i} {kw}"
    assert len(out[1]) <= 1 + 2 and out[1][-1] == eos  # that row ends at its EOS, the others run on
    assert len(out[0]) == 7 + 6 or out[0][-1] == eos


def test_padded_prompts_are_not_prompts_a_mask_is_refused_and_lists_take_lists_of_ids(model):
    """A 2-D tensor is taken as is: a row padded to the batch length is another prompt, and generates
    other tokens; the list form exists for that (and an attention_mask, HF's way, is refused)."""
    model.decode_backend = "torch"
    short, long = prompts_of_lengths(3, 6, seed=1)
    alone = model.generate([short], 5)[0]
    left_padded = torch.stack([torch.cat([torch.ones(3, dtype=torch.long), short]), long])  # (2, 6)
    assert not torch.equal(model.generate(left_padded, 5)[0, 6:], alone[3:])
    with pytest.raises(ValueError, match="no attention_mask.*as a list"):
        model.generate(left_padded, 5, attention_mask=torch.ones(2, 6))
    as_lists = model.generate([short.tolist(), long.tolist()], 5)
    assert torch.equal(as_lists[0], alone) and as_lists[1].dtype == torch.long


@pytest.mark.parametrize("call, message", [
    (lambda m: m(torch.zeros(1, 0, dtype=torch.long)), r"no tokens \(shape \(1, 0\)\).*start from the EOS id"),
    (lambda m: m.generate(torch.zeros(2, 0, dtype=torch.long), 3), "input_ids is empty.*start from the EOS id"),
    (lambda m: m.generate([[5, 6], []], 3), "prompt 1 is empty.*start from the EOS id"),
    (lambda m: m.generate([], 3), "empty list of prompts"),
    (lambda m: m.generate(torch.tensor([[5, 1000]]), 3), r"token id 1000, outside the vocabulary \[0, 1000\)"),
    (lambda m: m.generate([[5], [7, -1]], 3), r"prompt 1 holds token id -1, outside the vocabulary \[0, 1000\)"),
    (lambda m: m.generate(torch.tensor([5, 6]), 3), r"\(batch, seqlen\) tensor.*got \(2,\).*ids\[None\].*list"),
    (lambda m: m.generate([[[5, 6]]], 3), r"prompt 0 must be a list of ids or a 1-D tensor"),
    (lambda m: m.generate(torch.tensor([[0.5, 2.0]]), 3), "integer ids.*float32"),
    (lambda m: m.generate(torch.tensor([[5]]), 2.5), "max_new_tokens must be an integer >= 0, got 2.5"),
    (lambda m: m.generate(torch.tensor([[5]]), 3, eos_token_id=1000), r"eos_token_id must be an id in \[0, 1000\)"),
    (lambda m: m.generate(torch.tensor([[5]]), 3, seed=1.5), r"seed must be None or an integer in .*got 1.5"),
    (lambda m: m.generate(torch.tensor([[5]]), 3, seed=2**64), r"seed must be .* in \[-2\*\*63, 2\*\*64\)"),
])
def test_bad_prompts_are_named(model, call, message):
    with pytest.raises(ValueError, match=message):
        call(model)


# the cache and the step's ids (the C step's own checks are in tests/test_decode_cpu.py) ---------------
@pytest.mark.parametrize("other, message", [
    (dict(n_layer=3), r"cache.conv has shape \(3, 2, 3, 192\).*n_layer 3 \(this model: 2\).*allocate_cache\(2\)"),
    (dict(d_state=8), r"cache.conv .*conv_dim 160 \(this model: 192\)"),
    (dict(d_conv=2), r"cache.conv .*d_conv-1 1 \(this model: 3\)"),
    (dict(headdim=8),
     r"cache.ssm has shape \(2, 2, 16, 8, 16\).*nheads 16 \(this model: 8\), headdim 8 \(this model: 16\)"),
    ("batch", r"cache.conv .*: batch 3 \(this call: 2 sequences\) \(a cache"),  # (was "this model: 2")
    ("float64 state", r"cache.ssm is torch.float64, and this model's SSM state is torch.float32"),
])
def test_a_cache_that_does_not_fit_the_model_is_refused_by_the_torch_step_and_the_prefill(model, other, message):
    model.decode_backend = "torch"
    if other == "batch":
        cache = model.allocate_cache(3)
    elif other == "float64 state":
        cache = model.allocate_cache(2)
        cache.ssm = cache.ssm.double()
    else:
        cache = Mamba2LM(CFG.replace(**other)).allocate_cache(2)
    with pytest.raises(ValueError, match=message):
        model.step(torch.tensor([1, 2]), cache)
    with pytest.raises(ValueError, match=message):
        model(torch.tensor([[1, 2], [3, 4]]), cache=cache)


@pytest.mark.parametrize("decode_backend", BACKENDS)
def test_step_takes_exactly_one_integer_id_per_sequence(model, decode_backend):
    model.decode_backend = decode_backend
    cache = model.allocate_cache(2)
    step = model.decoder(2)
    for ids, shown in ((torch.tensor([[1], [2]]), r"\(2, 1\)"), (torch.tensor(1), r"\(\)")):
        for call in (model.step, step):
            with pytest.raises(ValueError, match=rf"1-D tensor \(batch,\).*{shown}.*ids\[:, 0\]"):
                call(ids, cache)
    with pytest.raises(ValueError, match="integer ids.*float32"):
        step(torch.tensor([1.0, 2.0]), cache)
    assert cache.seqlen_offset == 0 and not cache.ssm.any()  # nothing ran
    assert step(torch.tensor([1, 2]), cache).shape == (2, 1008)


# sampling arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    (dict(top_k=0), "top_k must be None or an integer >= 1, got 0"),
    (dict(top_k=2.5), "top_k must be None or an integer >= 1, got 2.5"),
    (dict(top_p=0), r"top_p must be None or a number in \(0, 1\], got 0"),
    (dict(top_p=1.5), r"top_p must be None or a number in \(0, 1\], got 1.5"),
    (dict(top_p=math.nan), r"top_p .* got nan"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=math.nan), "temperature must be a finite number >= 0 .* got nan"),
    (dict(temperature=math.inf), "temperature must be a finite number >= 0 .* got inf"),
])
@pytest.mark.parametrize("greedy", [True, False])
def test_bad_sampling_arguments_are_refused_even_when_greedy(model, kw, message, greedy):
    if greedy and "temperature" not in kw:
        kw = {**kw, "temperature": 0.0}  # ignored until now: greedy never reads top_k / top_p
    elif "temperature" not in kw:
        kw = {**kw, "temperature": 1.0}
    with pytest.raises(ValueError, match=message):
        sample(torch.randn(2, 10), **kw)
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([[5]]), 3, **kw)  # refused before any work


def test_sampling_arguments_may_be_0_dim_tensors_or_numpy_scalars(model):
    """As the old sample() took them; they are read as Python numbers, and still checked."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    as_numbers = dict(temperature=0.7, top_k=20, top_p=0.9)
    for kw in (dict(temperature=torch.tensor(0.7, dtype=torch.float64), top_k=torch.tensor(20),
                    top_p=torch.tensor(0.9, dtype=torch.float64)),
               dict(temperature=np.float64(0.7), top_k=np.int64(20), top_p=np.array(0.9))):
        want = sample(logits, **as_numbers, generator=torch.Generator().manual_seed(1))
        assert torch.equal(sample(logits, **kw, generator=torch.Generator().manual_seed(1)), want), kw
        prompt = torch.tensor([[5, 6]])
        assert torch.equal(model.generate(prompt, 3, **kw, seed=2), model.generate(prompt, 3, **as_numbers, seed=2))
    for kw, message in [(dict(temperature=torch.tensor(math.nan)), "temperature must be .* got nan"),
                        (dict(temperature=np.float64(math.inf)), "temperature must be .* got inf"),
                        (dict(temperature=torch.tensor([0.7])), r"temperature must be .* got tensor\(\[0.7"),
                        (dict(top_k=torch.tensor(0)), "top_k must be None or an integer >= 1, got 0"),
                        (dict(top_k=torch.tensor(2.0)), "top_k must be None or an integer >= 1, got 2.0"),
                        (dict(top_p=np.float64(1.5)), r"top_p must be None or a number in \(0, 1\], got 1.5"),
                        (dict(top_p=torch.tensor(True)), r"top_p must be None or a number in \(0, 1\], got True")]:
        with pytest.raises(ValueError, match=message):
            sample(logits, **{"temperature": 1.0, **kw})


# seeds -------------------------------------------------------------------------------------------
def test_seeded_rows_do_not_repeat_across_seeds_and_row_i_is_row_seed_alone(model, monkeypatch):
    """Row i used seed + i, so generate([p, p], seed=0)[1] was generate([p, p], seed=1)[0]: drawing a batch per
    call with seeds 0, 1, 2 gave duplicates. Row 0 keeps `seed`; row i > 0 seeds with row_seed(seed, i)."""
    model.decode_backend = "torch"
    assert [row_seed(s, 0) for s in (0, 7, -1)] == [0, 7, -1]
    assert row_seed(0, 1) == 5836529245451711556  # pinned: NumPy's SeedSequence([0, 1]), a documented formula
    assert row_seed(-1, 2) == row_seed(2**64 - 1, 2)  # as torch reads a negative seed
    assert len({row_seed(s, i) for s in range(4) for i in range(4)}) == 16
    prompt = torch.tensor([[5, 6, 7]])
    rows = {s: model.generate(prompt.expand(3, -1), 6, temperature=1.0, seed=s)[:, 3:] for s in range(3)}
    assert len({tuple(r.tolist()) for out in rows.values() for r in out}) == 9  # 3 calls x 3 rows, all distinct
    for i in range(3):
        assert torch.equal(rows[1][i], model.generate(prompt, 6, temperature=1.0, seed=row_seed(1, i))[0, 3:]), i
    # a seeded batch samples row by row (one multinomial per row and token), an unseeded one in one call
    calls, multinomial = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial",
                        lambda probs, *a, **k: calls.append(len(probs)) or multinomial(probs, *a, **k))
    model.generate(prompt.expand(3, -1), 2, temperature=1.0, seed=0)
    assert calls == [1] * 6
    calls.clear()
    model.generate(prompt.expand(3, -1), 2, temperature=1.0)
    assert calls == [3, 3]


def test_top_p_one_keeps_every_id(monkeypatch):
    # 5 dominant ids and a long tail: the float32 cumulative sum passes 1 before the tail ends, and the top-p
    # filter dropped ~4,900 tail ids at top_p=1.0
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50277, generator=g) * 3
    logits[0, :5] = 12.0
    seen, multinomial = [], torch.multinomial  # the probabilities sample() draws from
    monkeypatch.setattr(torch, "multinomial", lambda probs, *a, **k: seen.append(probs) or multinomial(probs, *a, **k))
    sample(logits, temperature=1.0, top_p=1.0, generator=g)
    assert bool((seen[0] > 0).all()), f"{int((seen[0] == 0).sum())} ids dropped at top_p=1.0"
    sample(logits, temperature=1.0, top_p=0.999, generator=g)
    assert int((seen[1] == 0).sum()) > 10000  # below 1 it still filters


def test_a_tiny_temperature_samples_the_argmax_instead_of_overflowing():
    """logits / 1e-39 overflowed to inf (NaN probabilities: a RuntimeError in torch.multinomial); each row's
    largest logit is the one left."""
    logits = torch.tensor([[1.0, 2.0, -3.0], [100.0, 2.0, float("-inf")], [-5.0, -4.0, -30.0]])
    g = torch.Generator().manual_seed(0)
    for temperature in (1e-39, 1e-37, 1e-30, 5e-324):
        assert sample(logits, temperature=temperature, generator=g).tolist() == [1, 0, 1], temperature
    draws = torch.stack([sample(logits, temperature=1.0, generator=g) for _ in range(2000)])  # (2000, 3)
    frequency = (draws[:, 0] == 1).float().mean().item()  # (the shift changes no probability)
    assert abs(frequency - torch.softmax(logits[0], -1)[1].item()) < 0.04 and (draws[:, 1] == 0).all()


# a float64 model ---------------------------------------------------------------------------------
def test_a_float64_model_generates_its_forward_argmax():
    torch.manual_seed(0)
    m = randomize_(Mamba2LM(CFG.replace(n_layer=1)), seed=4).eval().double()
    assert m.allocate_cache(1).ssm.dtype == torch.float64
    prompt = torch.randint(0, 1000, (2, 5), generator=torch.Generator().manual_seed(4))
    out = m.generate(prompt, 10)  # (2, 15)
    assert m.decode_backend_used[0] == "torch"
    with torch.no_grad():
        logits = m(out)[:, 4:-1, :1000]  # (2, 10, V): the prediction of each generated token
    assert torch.equal(out[:, 5:], logits.argmax(-1))
