"""Downstream-task scoring (minimamba.evaluate): option log-likelihoods against a plain per-option loop and
against HF transformers' Mamba2, greedy generation against generating each prompt alone, and the metrics
and the results table against hand-worked numbers. (Held-out perplexity is tested in tests/test_training.py.)"""

import math

import pytest
import torch

from minimamba import Mamba2Config, Mamba2LM, from_pretrained
from minimamba.evaluate import (choice_metrics, encode_option, evaluate_task, generate_texts, lambada_metrics,
                                parse_yes_no, predict_labels, results_table, rouge, score_options,
                                settings_that_differ, tasks_missing, yesno_metrics)
from minimamba.tasks import Choice, Generation, Task
from tests.conftest import randomize_, save_in_state_spaces_layout

# a character tokenizer: id = ord(c) + 1 for c in U+0000..U+00FF, and id 0 the EOS; so V = 257, padded to 272
CFG = Mamba2Config(d_model=64, n_layer=2, vocab_size=257, d_state=16, headdim=16, ngroups=2, chunk_size=8)


class CharTokenizer:
    def __init__(self, eos_id=0):
        self.eos_id = eos_id

    def encode(self, text):
        return [ord(c) + 1 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 1) for i in ids)


TOK = CharTokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize_(Mamba2LM(CFG, decode_backend="torch"), seed=1, biases=True).eval()


def reference_scores(model, tok, items, max_tokens=None):
    """The straightforward way, written from lm-eval-harness's description: per option, one unpadded forward
    of (context + continuation)[-(max_tokens + 1):][:-1], no cache; the empty context is [EOS]."""
    V = model.config.vocab_size
    out = []
    for item in items:
        row = []
        for context, continuation in item.options:
            ctx = tok.encode(context) if context else [tok.eos_id]
            cont = tok.encode(continuation)
            ids = ctx + cont
            if max_tokens is not None:
                ids = ids[-(max_tokens + 1):]
            with torch.no_grad():
                logits = model(torch.tensor([ids[:-1]]))[0, -len(cont):, :V]  # (n_cont, V)
            logp = torch.log_softmax(logits.double(), -1)  # (n_cont, V)
            target = torch.tensor(cont)
            row.append((logp[torch.arange(len(cont)), target].sum().item(), len(cont),
                        bool((logp.argmax(-1) == target).all())))
        out.append(row)
    return out


def greedy_continuation(model, context, n):
    """The n characters the model writes greedily after `context` (so that option scores greedy=True)."""
    ids = model.generate(torch.tensor([TOK.encode(context)]), n)[0, len(context):].tolist()
    assert 0 not in ids, "the test needs a greedy continuation without EOS; pick another context"
    return TOK.decode(ids)


def first_greedy_only(model, context):
    """Two characters: the model's greedy one after `context`, then one that is not its greedy next."""
    greedy = greedy_continuation(model, context, 2)
    return greedy[0] + ("q" if greedy[1] != "q" else "z")


def last_greedy_only(model, context):
    """Two characters: one that is not the model's greedy one after `context`, then its greedy next."""
    first = "q" if greedy_continuation(model, context, 1) != "q" else "z"
    return first + greedy_continuation(model, context + first, 1)


@pytest.fixture(scope="module")
def items(model):
    return [
        Choice("shared", (("The cat sat on the", " mat"), ("The cat sat on the", " hat, then left"),
                          ("The cat sat on the", " x"), ("The cat sat on the", " dog's bed"),
                          ("The cat sat on the", greedy_continuation(model, "The cat sat on the", 5)),
                          ("The cat sat on the", first_greedy_only(model, "The cat sat on the")),
                          ("The cat sat on the", last_greedy_only(model, "The cat sat on the"))), gold=1),
        Choice("wino", (("Anna gave Maria a book because Anna", " was kind."),
                        ("Anna gave Maria a book because Maria", " was kind.")), gold=0),
        Choice("empty-context", (("", "Hello"), ("", "Hi"), ("Q: hi? A:", " no")), gold=1),
        Choice("one-token", (("yes or no?", "y"), ("yes or no?", "n")), gold=0, labels=("yes", "no")),
    ]


@pytest.fixture(scope="module")
def want(model, items):
    return reference_scores(model, TOK, items)


# score_options -------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_scores_equal_a_plain_forward_per_option(model, items, want, batch_size):
    """Shared and per-option contexts, ragged continuations, an empty context and one-token continuations,
    in batches that split items (3) or hold them all (16): the cached, batched scoring equals the loop."""
    model.train()
    got = score_options(model, TOK, items, batch_size=batch_size)
    assert model.training  # left as it was found
    model.eval()
    assert [len(r) for r in got] == [len(it.options) for it in items]
    for item, g_row, w_row in zip(items, got, want):
        for j, (g, w) in enumerate(zip(g_row, w_row)):
            assert abs(g[0] - w[0]) <= 1e-5 * max(1.0, abs(w[0])), f"{item.id} option {j}: {g[0]} vs {w[0]}"
            assert g[1:] == w[1:], f"{item.id} option {j}"
    assert got[0][4][2] and got[0][4][1] == 5  # the model's own greedy continuation is greedy
    assert not got[0][5][2]  # greedy means every token: the first one alone is not enough
    assert not got[0][6][2]  # nor the last one alone
    assert not all(s[2] for row in got for s in row)  # and not every option is


def test_truncation_drops_context_tokens_from_the_left(model, items):
    got = score_options(model, TOK, items, max_tokens=16, batch_size=4)
    want = reference_scores(model, TOK, items, max_tokens=16)
    for g_row, w_row in zip(got, want):
        for g, w in zip(g_row, w_row):
            assert abs(g[0] - w[0]) <= 1e-5 * max(1.0, abs(w[0])) and g[1:] == w[1:]
    # the shared context kept fewer of its tokens for the longer continuation: its scores differ from untruncated
    assert abs(got[0][1][0] - score_options(model, TOK, items[:1])[0][1][0]) > 1e-4
    ctx, cont = encode_option(TOK, "abcdefgh", " xyz", max_tokens=5)
    assert (TOK.decode(ctx), TOK.decode(cont)) == ("gh", " xyz")  # 2 + 4 = max_tokens + 1 tokens
    with pytest.raises(ValueError, match="continuation has 4 tokens, more than max_tokens=3"):
        encode_option(TOK, "abc", " xyz", max_tokens=3)


def test_bad_items_are_named(model):
    with pytest.raises(ValueError, match=r"item 'e' option 1: the continuation '' has no tokens"):
        score_options(model, TOK, [Choice("e", (("a", " b"), ("a", "")), gold=0)])
    with pytest.raises(TypeError, match="item 0 is a Generation, not a Choice"):
        score_options(model, TOK, [Generation("g", "p", "r")])
    with pytest.raises(ValueError, match="context is empty, and the tokenizer has no EOS"):
        score_options(model, CharTokenizer(eos_id=None), [Choice("e", (("", "b"),), gold=0)])


def test_summed_logprobs_equal_hf_transformers(items, tmp_path):
    """The summed log-probabilities against HF transformers' Mamba2 (the test-only oracle) reading each option
    whole, with the same weights (saved in the state-spaces layout as tests/test_model.py does)."""
    transformers = pytest.importorskip("transformers", reason="HF transformers is the test-only oracle for Mamba2")
    hf = randomize_(transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**CFG.to_dict("hf"))), seed=4).eval()
    ours = from_pretrained(save_in_state_spaces_layout(hf, CFG, tmp_path)).eval()
    # (HF's CPU forward is slow: five options) a shared context, per-option contexts, an empty context
    items = [Choice("shared", items[0].options[:2], gold=0), items[1], Choice("empty", items[2].options[:1], gold=0)]
    got = score_options(ours, TOK, items, batch_size=8)
    for item, row in zip(items, got):
        for (context, continuation), (logprob, n, _) in zip(item.options, row):
            ids = (TOK.encode(context) if context else [0]) + TOK.encode(continuation)
            with torch.no_grad():
                logits = hf(torch.tensor([ids])).logits[0, -n - 1 : -1, : CFG.vocab_size]  # (n, V)
            want = torch.log_softmax(logits.double(), -1)[torch.arange(n), torch.tensor(ids[-n:])].sum().item()
            assert abs(logprob - want) <= 1e-4, f"{item.id} {continuation!r}: {logprob} vs HF {want}"


# metrics, by hand ----------------------------------------------------------------------------------
def test_choice_metrics_by_hand():
    items = [Choice("a", (("q", " a"), ("q", " bbbb")), gold=1),  # acc picks " a"; per character " bbbb" wins
             Choice("b", (("q", " yes"), ("q", " no")), gold=0),  # both right
             Choice("c", (("q", "x"), ("q", "yy")), gold=1),  # a tie goes to the first; per character "yy" wins
             Choice("d", (("q", " a"), ("q", " bbb")), gold=1)]  # only if the separating space is not counted
    scores = [[(-2.0, 1, False), (-4.0, 2, False)],  # per character (less the space): -2/1, -4/4
              [(-1.0, 1, True), (-3.0, 1, False)],  # -1/3, -3/2
              [(-1.0, 1, False), (-1.0, 2, False)],  # -1/1, -1/2
              [(-1.0, 1, False), (-2.5, 1, False)]]  # -1/1 < -2.5/3 (with the space: -1/2 > -2.5/4)
    m = choice_metrics(items, scores)
    assert m["n"] == 4 and m["acc"] == pytest.approx(1 / 4) and m["acc_norm"] == 1.0
    assert m["acc_stderr"] == pytest.approx(math.sqrt((1 / 4) * (3 / 4) / 3)) and m["acc_norm_stderr"] == 0.0


def test_lambada_metrics_by_hand():
    m = lambada_metrics([[(-2.0, 1, True)], [(-4.0, 3, False)]])
    assert m == {"acc": 0.5, "ppl": pytest.approx(math.exp(3.0)), "n": 2}  # exp(-mean(-2, -4)), per item not token
    # a mean log-likelihood below -log(float max) ≈ -709.78: a perplexity beyond any float is inf, not an OverflowError
    assert lambada_metrics([[(-800.0, 3, False)], [(-700.0, 2, False)]])["ppl"] == math.inf
    assert lambada_metrics([[(-709.0, 3, False)]])["ppl"] == pytest.approx(math.exp(709.0))
    with pytest.raises(ValueError, match="item 1 has 2"):
        lambada_metrics([[(-2.0, 1, True)], [(-1.0, 1, True), (-1.0, 1, True)]])


def test_yesno_metrics_by_hand():
    gold = ["yes", "yes", "no", "no", "maybe"]
    pred = ["yes", "no", "no", None, "yes"]  # None: an answer that parsed to nothing
    m = yesno_metrics(gold, pred, ("yes", "no", "maybe"))
    # yes: tp 1, fp 1 (the maybe), fn 1 -> P = R = F1 = 1/2; no: tp 1, fp 1, fn 1 (the None) -> 1/2; maybe: 0
    assert m["per_class"] == {"yes": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
                              "no": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
                              "maybe": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}}
    assert m["acc"] == pytest.approx(0.4) and m["macro_f1"] == pytest.approx(1 / 3)
    assert m["macro_precision"] == pytest.approx(1 / 3) and (m["f1_yes"], m["f1_maybe"]) == (0.5, 0.0)
    assert m["confusion"] == {"yes": {"yes": 1, "no": 1}, "no": {"no": 1, "none": 1}, "maybe": {"yes": 1}}
    # a class neither gold nor predicted has F1 0 and counts in the macro mean (scikit-learn, zero_division=0)
    m = yesno_metrics(["yes", "no"], ["yes", "no"], ("yes", "no", "maybe"))
    assert m["acc"] == 1.0 and m["macro_f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"gold labels \['perhaps'\]"):
        yesno_metrics(["perhaps"], ["yes"], ("yes", "no"))


def test_predicted_label_is_the_likeliest_options():
    item = Choice("q", (("c", " yes"), ("c", " no"), ("c", " Yes")), gold=1, labels=("yes", "no", "yes"))
    assert predict_labels([item, item], [[(-3.0, 1, 0), (-2.0, 1, 0), (-1.0, 1, 0)],
                                         [(-3.0, 1, 0), (-2.0, 1, 0), (-2.5, 1, 0)]]) == ["yes", "no"]
    with pytest.raises(ValueError, match="item 'q' has 3 options and 2 labels; a yes/no item names each option"):
        predict_labels([Choice("q", item.options, gold=1, labels=("yes", "no"))], [[(-1.0, 1, 0)] * 3])


@pytest.mark.parametrize("text, expected", [(" Yes.", "yes"), ("no, because", "no"), ("\n**Maybe**", "maybe"),
                                        ("NO", "no"), ("Answer: yes", None), ("yesterday", None), ("", None),
                                        ("  ...  ", None),
                                        ("__Yes__", "yes"), ("_no_", "no")])  # (markdown emphasis: "_" is no letter)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_rouge_by_hand():
    """Words of three letters or fewer are not stemmed, so these are plain ROUGE: pair 1 shares the 1-grams
    the, the, cat, on, mat (5 of 6 each way: F = 5/6), the 2-grams the-cat, on-the, the-mat (3 of 5: F = 3/5),
    and an LCS of 5 (F = 5/6); pair 2 shares nothing. Means in percent."""
    r = rouge(["the cat sat on the mat", "red"], ["The cat lay on the mat.", "blue"])
    assert r == pytest.approx({"rouge1": 100 * 5 / 12, "rouge2": 100 * 3 / 10, "rougeL": 100 * 5 / 12})
    # with the stemmer, "discharged" and "discharge" are one word (Porter: "discharg")
    assert rouge(["patient discharged"], ["patient discharge"])["rouge1"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="one reference per prediction"):
        rouge(["a"], [])


# generation ----------------------------------------------------------------------------------------
def test_generated_texts_equal_generating_each_prompt_alone(model):
    prompts = ["Once upon a time", "Hi", "", "A much longer prompt that will be cut to its last tokens"]
    # an EOS that "Hi" writes after k other tokens: the first of its greedy tokens that is not a repeat
    written = model.generate(torch.tensor([TOK.encode("Hi")]), 6)[0, 2:].tolist()
    k = next(k for k in range(1, 6) if written[k] not in written[:k])
    tok = CharTokenizer(eos_id=written[k])
    got = generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=3, max_prompt_tokens=20)
    for prompt, text in zip(prompts, got):
        ids = (tok.encode(prompt) or [tok.eos_id])[-20:]
        new = model.generate(torch.tensor([ids]), 6, eos_token_id=tok.eos_id)[0, len(ids):].tolist()
        new = new[: new.index(tok.eos_id)] if tok.eos_id in new else new
        assert text == tok.decode(new), prompt
    assert len(got[1]) == k  # cut before its EOS
    assert got[0] and got[3] != got[2]


# evaluate_task and the table -----------------------------------------------------------------------
def test_evaluate_task_dispatches_on_the_kind(model, items, want):
    choice = evaluate_task(model, TOK, Task("mc", "choice", "test"), items, return_predictions=True)
    assert {k: choice[k] for k in ("acc", "acc_norm", "n")} == {k: v for k, v in choice_metrics(
        items, want).items() if k in ("acc", "acc_norm", "n")}
    assert choice["task"] == "mc" and choice["kind"] == "choice" and choice["seconds"] >= 0
    assert [p["id"] for p in choice["predictions"]] == [it.id for it in items]
    for key, metric in (("pred", "acc"), ("pred_norm", "acc_norm")):  # the file holds both picks
        assert sum(p[key] == p["gold"] for p in choice["predictions"]) / len(items) == choice[metric]

    qa = [Choice(f"q{k}", ((f"Question {k}? Answer:", " yes"), (f"Question {k}? Answer:", " no")), gold=k % 2,
                 labels=("yes", "no")) for k in range(2)]
    by_logprob = evaluate_task(model, TOK, Task("qa", "yesno", "test"), qa, return_predictions=True)
    expected = [it.labels[max(range(2), key=lambda j: s[j][0])]
                for it, s in zip(qa, reference_scores(model, TOK, qa))]
    assert [p["pred"] for p in by_logprob["predictions"]] == expected
    assert by_logprob["acc"] == sum(w == it.labels[it.gold] for w, it in zip(expected, qa)) / 2
    by_generation = evaluate_task(model, TOK, Task("qa", "yesno", "test"), qa, qa_scoring="generate",
                                  qa_max_new_tokens=4, return_predictions=True)
    answers = generate_texts(model, TOK, [it.options[0][0] for it in qa], max_new_tokens=4)
    assert [p["answer"] for p in by_generation["predictions"]] == answers
    assert by_generation["acc"] == sum(parse_yes_no(a) == it.labels[it.gold] for a, it in zip(answers, qa)) / 2

    passages = [Choice("l1", (("The end of the", " story"),), gold=0),
                Choice("l2", (("Once upon a", " time"),), gold=0)]
    lam = evaluate_task(model, TOK, Task("lambada", "lambada", "test"), passages)
    ref = reference_scores(model, TOK, passages)
    assert lam["ppl"] == pytest.approx(math.exp(-(ref[0][0][0] + ref[1][0][0]) / 2), rel=1e-5)
    assert lam["acc"] == (ref[0][0][2] + ref[1][0][2]) / 2

    gen = [Generation("g", "Note: patient", "patient was discharged home")]
    result = evaluate_task(model, TOK, Task("notes", "generate", "test"), gen, max_new_tokens=5)
    assert result == {"task": "notes", "kind": "generate", **rouge(generate_texts(model, TOK, ["Note: patient"], 5),
                                                                   ["patient was discharged home"]),
                      "n": 1, "seconds": result["seconds"]}
    with pytest.raises(TypeError, match=r"scores Choice items, got a Generation \('g'\)"):
        evaluate_task(model, TOK, Task("mc", "choice", "test"), gen)
    with pytest.raises(ValueError, match="qa_scoring must be"):
        evaluate_task(model, TOK, Task("qa", "yesno", "test"), qa, qa_scoring="vote")


def test_results_table_by_hand():
    runs = {"base": {"pubmedqa": {"task": "pubmedqa", "acc": 0.5, "macro_f1": 0.25, "n": 200, "seconds": 3.0,
                                  "per_class": {"yes": {"f1": 0.5}}}},
            "cpt": {"pubmedqa": {"acc": 0.625, "macro_f1": 0.125, "n": 200},
                    "mimic": {"rouge1": 7.07}}}
    assert results_table(runs) == (
        "| task | metric | base | cpt | Δ |\n"
        "|---|---|---:|---:|---:|\n"
        "| pubmedqa | acc | 0.5000 | 0.6250 | +0.1250 |\n"
        "| pubmedqa | macro_f1 | 0.2500 | 0.1250 | -0.1250 |\n"
        "| pubmedqa | n | 200 | 200 | +0 |\n"
        "| mimic | rouge1 | – | 7.0700 | – |\n")
    three = results_table({"a": {"t": {"acc": 1.0}}, "b": {"t": {"acc": 0.0}}, "c": {}})
    assert three == "| task | metric | a | b | c |\n|---|---|---:|---:|---:|\n| t | acc | 1.0000 | 0.0000 | – |\n"


def test_a_setting_differs_only_where_both_runs_have_a_task_it_changes():
    """--max-new-tokens (16 vs 128) was noted for two runs with no generation task; now a setting counts
    where two runs that differ in it hold a task of a kind it changes (a result without a kind: any)."""
    def run(config, **kinds):
        return {"config": config, "results": {t: {"kind": k, "acc": 0.5} for t, k in kinds.items()}}

    mc, gen, qa = {"arc_easy": "choice"}, {"note_completion": "generate"}, {"pubmedqa": "yesno"}
    short, long = {"max_new_tokens": 16, "qa_scoring": "logprob"}, {"max_new_tokens": 128, "qa_scoring": "generate"}
    assert settings_that_differ({"a": run(short, **mc), "b": run(long, **mc)}) == {}
    assert settings_that_differ({"a": run(short, **mc, **gen), "b": run(long, **mc)}) == {}  # (gen in one only)
    assert settings_that_differ({"a": run(short, **mc, **gen), "b": run(long, **gen)}) == {"max_new_tokens": [16, 128]}
    assert settings_that_differ({"a": run(short, **qa), "b": run(long, **qa, **gen)}) == {
        "qa_scoring": ["logprob", "generate"]}
    # three runs: a and c differ and share a generation task, b (no generation task) only shows its value;
    # no run has a yes/no task, so --qa-scoring does not matter
    assert settings_that_differ({"a": run(short, **gen), "b": run(long, **mc), "c": run(long, **gen)}) == {
        "max_new_tokens": [16, 128, 128]}
    # a result file without kinds (older), and a setting of every kind (--limit): noted as before
    assert settings_that_differ({"a": {"config": short, "results": {"arc_easy": {"acc": 0.5}}},
                                 "b": run(long, **mc)}) == {"max_new_tokens": [16, 128], "qa_scoring": ["logprob", "generate"]}
    assert settings_that_differ({"a": run({"limit": None}, **mc), "b": run({"limit": 10}, **gen)}) == {"limit": [None, 10]}
    assert settings_that_differ({"a": run({"sample": 500}, **gen), "b": run({}, **gen)}) == {"sample": [500, None]}


def test_tasks_missing_from_a_run_are_named():
    runs = {"a": {"arc_easy": {"acc": 0.5}, "ppl_pubmed": {"ppl": 9.0}}, "b": {"note_completion": {"rouge1": 7.0}},
            "c": {"arc_easy": {"acc": 0.5}, "note_completion": {"rouge1": 7.0}, "ppl_pubmed": {"ppl": 9.0}}}
    assert tasks_missing(runs) == {"a": ["note_completion"], "b": ["arc_easy", "ppl_pubmed"]}
    assert tasks_missing({"a": runs["a"], "a (2)": runs["a"]}) == {}


def test_generation_runs_under_the_autocast_it_is_given(model, monkeypatch):
    seen = []
    forward = Mamba2LM.forward

    def spy(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Mamba2LM, "forward", spy)
    generate_texts(model, TOK, ["Hi"], max_new_tokens=2, autocast_dtype=torch.bfloat16)
    assert seen == [True]
    task = Task("notes", "generate", "test")
    evaluate_task(model, TOK, task, [Generation("g", "Hi", "there")], max_new_tokens=2, autocast_dtype=torch.bfloat16)
    qa = Task("qa", "yesno", "test")
    evaluate_task(model, TOK, qa, [Choice("q", (("Q?", " yes"), ("Q?", " no")), 0, ("yes", "no"))],
                  qa_scoring="generate", autocast_dtype=torch.bfloat16)
    assert seen == [True] * 3
    generate_texts(model, TOK, ["Hi"], max_new_tokens=2)
    assert seen[-1] is False


def test_domain_perplexity_split_over_ranks_adds_up_to_the_whole(model, monkeypatch):
    """Under torch.distributed each rank scores windows[rank::world_size] and all_reduce sums (NLL, tokens):
    emulated here in one process (rank 1 first, its sums recorded; rank 0's all_reduce adds them), the result
    is the single-process perplexity of every window (5 windows: ranks of 3 and 2)."""
    from types import SimpleNamespace

    from minimamba.evaluate import domain_perplexity

    windows = {"pubmed": torch.randint(0, CFG.vocab_size, (5, 9), generator=torch.Generator().manual_seed(0))}
    byte_lengths = [0] + [1 + i % 3 for i in range(1, CFG.vocab_size)]  # (bits per byte: over every window too)
    whole = domain_perplexity(model, windows, batch_size=2, byte_lengths=byte_lengths)
    sent, calls = [], []

    def all_reduce(t):  # (SUM, the default op)
        calls.append(t.tolist())
        if sent:
            t += sent.pop()
        else:
            sent.append(t.clone())

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    domain_perplexity(model, windows, batch_size=2, dist=SimpleNamespace(rank=1, world_size=2, device="cpu"),
                      byte_lengths=byte_lengths)
    split = domain_perplexity(model, windows, batch_size=2, dist=SimpleNamespace(rank=0, world_size=2, device="cpu"),
                              byte_lengths=byte_lengths)
    assert split["pubmed"]["tokens"] == whole["pubmed"]["tokens"] == 5 * 8
    assert [tokens for _, tokens in calls] == [2 * 8, 3 * 8]  # each rank sent its own windows' sums
    assert split["pubmed"]["loss"] == pytest.approx(whole["pubmed"]["loss"], rel=1e-6)
    assert split["pubmed"]["bpb"] == pytest.approx(whole["pubmed"]["bpb"], rel=1e-6)


def test_bits_per_byte_by_hand(model):
    """target_bytes sums each target's byte length (not a window's first token); loss_summary's bpb is the summed
    NLL over ln 2 · bytes, None where the targets spell no byte; domain_perplexity gives it per domain."""
    from minimamba.evaluate import domain_perplexity, loss_summary, target_bytes

    lengths = [0, 1, 2, 3, 4]  # id -> bytes (id 0: a special token, no text)
    windows = torch.tensor([[4, 1, 2, 0], [3, 3, 0, 4]])  # targets (1, 2, 0) and (3, 0, 4): 3 + 7 bytes
    assert target_bytes(windows, lengths) == 10
    assert target_bytes(torch.zeros(0, 4, dtype=torch.long), lengths) == 0
    with pytest.raises(ValueError, match="the windows hold id 5, beyond the tokenizer's 5 ids"):
        target_bytes(torch.tensor([[0, 5]]), lengths)
    summary = loss_summary(6.0, 4, n_bytes=10)
    assert summary["bpb"] == pytest.approx(6.0 / (math.log(2) * 10)) and summary["loss"] == 1.5
    assert loss_summary(6.0, 4, n_bytes=0)["bpb"] is None and "bpb" not in loss_summary(6.0, 4)

    gen = torch.Generator().manual_seed(0)
    domains = {"pubmed": torch.randint(0, CFG.vocab_size, (3, 9), generator=gen)}
    byte_lengths = [0] + [1 + i % 3 for i in range(1, CFG.vocab_size)]
    r = domain_perplexity(model, domains, batch_size=2, byte_lengths=byte_lengths)["pubmed"]
    n_bytes = sum(byte_lengths[i] for i in domains["pubmed"][:, 1:].flatten().tolist())
    assert r["bpb"] == pytest.approx(r["loss"] * r["tokens"] / (math.log(2) * n_bytes), rel=1e-12)
    assert "bpb" not in domain_perplexity(model, domains, batch_size=2)["pubmed"]
