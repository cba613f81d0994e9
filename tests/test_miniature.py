"""minimamba.miniature: the report logic on made-up numbers, and the whole command end to end on the
shared corpora with a few steps per phase (the real run, ~8 minutes, is in the README)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from minimamba import data, miniature
from minimamba.sampler import parse_mix
from minimamba.training import read_log
from tests.conftest import DATA

needs_data = pytest.mark.skipif(not (DATA / "tokenizer" / "tokenizer.json").is_file(),
                                reason=f"the shared corpora are not at {DATA} (set MINIMAMBA_DATA)")


def test_target_and_table_from_made_up_numbers():
    ppl = {"before": {"pubmed": 100.0, "c4": 50.0, "wikipedia": 40.0},
           "mix": {"pubmed": 49.0, "c4": 51.0, "wikipedia": 40.0},
           "pubmed": {"pubmed": 45.0, "c4": 56.0, "wikipedia": 44.0}}
    assert miniature.check_target(ppl) == {"pubmed_at_most_half": True, "c4_within_3pct": True,
                                           "wikipedia_not_worse": True}
    ppl["mix"] = {"pubmed": 51.0, "c4": 48.0, "wikipedia": 40.4}  # -49%, -4%, +1%
    assert miniature.check_target(ppl) == {"pubmed_at_most_half": False, "c4_within_3pct": False,
                                           "wikipedia_not_worse": False}
    lines = miniature.table(ppl).splitlines()
    assert len(lines) == 2 + 3
    assert lines[2].startswith("| general model (before) | 100.00 | 50.00 | 40.00 |")
    assert "51.00 (-49.0%)" in lines[3] and "48.00 (-4.0%)" in lines[3] and "40.40 (+1.0%)" in lines[3]
    assert "56.00 (+12.0%)" in lines[4]
    ppl["mix"] = {"pubmed": 50.0, "c4": 50.0, "wikipedia": 39.0}  # exactly half: "at most half" holds
    assert miniature.check_target(ppl)["pubmed_at_most_half"] is True


def test_unknown_row_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        miniature.main(["--rows", "mix,nonsense", "--out", str(tmp_path / "out")])
    assert "unknown row(s) nonsense; choose from mix" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_data_root_names_the_files(tmp_path):
    with pytest.raises(data.DataError, match=r"missing .*tokenizer.json.*Point --data-root \(or \$MINIMAMBA_DATA\)"):
        miniature.prepare(tmp_path / "nowhere", tmp_path / "out")


def test_the_data_root_defaults_to_minimamba_data_wherever_it_runs(tmp_path, monkeypatch):
    """--data-root was ../shared/data from the current folder, whatever $MINIMAMBA_DATA said; now the rule
    of the tests' DATA and of the benchmarks: $MINIMAMBA_DATA, else shared/data beside the clone."""
    checked = []

    def check(data_root):  # (main checks the data root before anything else is written)
        checked.append(data_root)
        raise SystemExit("stop")

    monkeypatch.setattr(miniature, "check_data_root", check)
    monkeypatch.chdir(tmp_path)  # (a folder with no ../shared/data)
    monkeypatch.setenv("MINIMAMBA_DATA", str(tmp_path / "elsewhere"))
    for _ in range(2):
        with pytest.raises(SystemExit, match="stop"):
            miniature.main(["--out", str(tmp_path / "out")])
        monkeypatch.delenv("MINIMAMBA_DATA", raising=False)
    assert checked == [tmp_path / "elsewhere", Path(miniature.__file__).resolve().parents[1].parent / "shared" / "data"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--general-steps", "0"], "--general-steps must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--cpt-steps", "0"], "--cpt-steps must be >= 1, got 0"),
    (["--eval-windows", "0"], "--eval-windows must be >= 1, got 0"),
    (["--rows", ""], "unknown row(s) ''"),
])
def test_bad_options_are_refused_before_anything_runs(tmp_path, capsys, args, message):
    # (a --data-root that is not there: an option let through stops there, not after a whole run on the real one)
    with pytest.raises(SystemExit):
        miniature.main([*args, "--out", str(tmp_path / "out"), "--data-root", str(tmp_path / "nowhere")])
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_folder_it_did_not_write_is_never_deleted(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(SystemExit):
        miniature.main(["--out", str(mine), "--data-root", str(tmp_path / "nowhere")])
    assert "holds files that this script did not write" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "precious"
    # its own folder from an earlier run: still refused while --data-root is wrong, and left alone
    own = tmp_path / "own"
    own.mkdir()
    (own / miniature.MARKER).write_text("")
    (own / "miniature.json").write_text("{}")
    with pytest.raises(SystemExit) as stop:
        miniature.main(["--out", str(own), "--data-root", str(tmp_path / "nowhere")])
    assert stop.value.code == 2 and "missing" in capsys.readouterr().err  # (an argparse error: exit 2)
    assert (own / "miniature.json").exists()
    # a file, not a folder: refused by name (was: NotADirectoryError from iterdir)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("precious")
    with pytest.raises(SystemExit):
        miniature.main(["--out", str(a_file), "--data-root", str(tmp_path / "nowhere")])
    assert "is a file, not a folder" in capsys.readouterr().err and a_file.read_text() == "precious"


@needs_data
def test_the_whole_command_on_the_shared_corpora(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "mini"
    try:
        assert miniature.main(["--data-root", str(DATA), "--out", str(out), "--general-steps", "3",
                               "--cpt-steps", "2", "--rows", "mix,pubmed", "--eval-windows", "2",
                               "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)

    # the reduced vocabulary: a faithful remapping of the GPT-NeoX ids, EOS kept as id 0
    kept = np.load(out / "tokens" / "vocab.npy")
    assert len(kept) == miniature.VOCAB - 1 and len(set(kept.tolist())) == len(kept) and kept[0] == 0
    new_id = np.full(50277, miniature.VOCAB - 1)
    new_id[kept] = np.arange(len(kept))
    for domain in miniature.DOMAINS:
        for split in data.SPLITS:
            full = data.load_split(out / "tokens-full", domain, split)
            small = data.load_split(out / "tokens", domain, split)
            assert len(full) == len(small) > 1000
            assert np.array_equal(new_id[full], small)
        assert data.read_meta(out / "tokens", domain)["tokenizer"]["vocab_size"] == miniature.VOCAB

    # what each run trained on: the token shares its sampler logged (to within a row of the 8 per step)
    rows = {"general": ("c4=0.5,wikipedia=0.5", 3), "cpt-mix": ("pubmed=0.8,c4=0.1,wikipedia=0.1", 2),
            "cpt-pubmed": ("pubmed=1", 2)}  # (the recipe's row and its ablation, as the README describes them)
    for run, (mix, steps) in rows.items():
        shares = [r for r in read_log(out / run / "log.jsonl") if "token_shares" in r][-1]["token_shares"]
        assert shares == pytest.approx(parse_mix(mix), abs=1 / (steps * miniature.BATCH)), (run, shares)

    result = json.loads((out / "miniature.json").read_text())
    assert list(result["perplexity"]) == ["before", "mix", "pubmed"]
    for row, values in result["perplexity"].items():
        assert set(values) == set(miniature.DOMAINS)
        assert all(1.0 < v < 10 * miniature.VOCAB for v in values.values()), (row, values)
        for d in miniature.DOMAINS:
            assert result["change_vs_before"][row][d] == pytest.approx(values[d] / result["perplexity"]["before"][d] - 1)
    assert set(result["target"]) == {"pubmed_at_most_half", "c4_within_3pct", "wikipedia_not_worse"}
    assert result["setup"]["general_tokens"] == 3 * miniature.BATCH * miniature.SEQ_LEN
    assert (out / "miniature.md").read_text().count("\n") == 2 + 3
    printed = capsys.readouterr().out
    assert "general model (before)" in printed and "target (80/10/10 row)" in printed


def test_rows_named_twice_run_once_in_the_order_first_named(tmp_path, monkeypatch, capsys):
    # The pipeline's stages stand in (each records what it was asked); only the command's own logic runs.
    ran = []
    monkeypatch.setattr(miniature, "check_data_root", lambda root: None)
    monkeypatch.setattr(miniature, "prepare", lambda root, out: "tokens")
    monkeypatch.setattr(miniature, "general_pretraining", lambda tokens, out, steps, **kw: ran.append("general"))
    monkeypatch.setattr(miniature, "latest_checkpoint", lambda folder: "ckpt")
    monkeypatch.setattr(miniature, "continued_pretraining",
                        lambda tokens, out, start, row, steps, **kw: ran.append(row))
    monkeypatch.setattr(miniature, "perplexities", lambda result: {"pubmed": 10.0, "c4": 10.0, "wikipedia": 10.0})
    monkeypatch.setattr(miniature, "plot", lambda ppl, path: False)
    miniature.main(["--rows", " pubmed, mix,pubmed ,mix,", "--out", str(tmp_path / "out")])
    assert ran == ["general", "pubmed", "mix"]
    result = json.loads((tmp_path / "out" / "miniature.json").read_text())
    assert list(result["perplexity"]) == ["before", "pubmed", "mix"]
    assert (tmp_path / "out" / "miniature.md").read_text().count("\n") == 2 + 3  # header, rule, three rows
