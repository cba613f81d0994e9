"""minimamba.sampler: token shares, determinism, ranks, resume, epochs, held-out windows, bad inputs."""

import numpy as np
import pytest
import torch

from minimamba.data import DataError
from minimamba.sampler import MixtureSampler, check_domains, heldout_windows, parse_mix

SEQ = 8


def write_domain(root, name, n_train, n_heldout=200, offset=0):
    d = root / name
    d.mkdir(parents=True)
    # token i of the stream is offset + i (mod 60000): a window's position in the stream is readable from it
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        ((np.arange(n) % 60000) + offset).astype(np.uint16).tofile(d / f"{split}.bin")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    write_domain(root, "pubmed", 4001, offset=1)  # 500 windows of SEQ
    write_domain(root, "c4", 801, offset=10001)  # 100 windows
    write_domain(root, "wikipedia", 81, offset=20001)  # 10 windows: wraps into many epochs
    return root


MIX = {"pubmed": 0.8, "c4": 0.1, "wikipedia": 0.1}


def domain_of(row):
    return {0: "pubmed", 1: "c4", 2: "wikipedia"}[int(row[0]) // 10000]


def test_parse_mix():
    assert parse_mix("pubmed=8, c4=1,wikipedia=1") == pytest.approx(MIX)
    assert parse_mix("pubmed=1,c4=0") == {"pubmed": 1.0}  # a zero share drops the domain
    for bad, words in [("pubmed", "NAME=SHARE"), ("pubmed=x", "number"), ("pubmed=-1", ">= 0"),
                       ("a=1,a=2", "twice"), ("a=0", "sum to 0"), ("=1", "NAME=SHARE"),
                       ("pubmed=1e308,c4=1e308", "sum to inf: use smaller numbers")]:  # (was {}: every share 0)
        with pytest.raises(ValueError, match=words):
            parse_mix(bad)


def test_token_shares_are_exact_to_one_row_at_every_step(data):
    s = MixtureSampler(data, MIX, SEQ, rows_per_step=10, seed=0)
    counts = dict.fromkeys(MIX, 0)
    for step in range(1, 41):
        for row in s.next_batch():
            counts[domain_of(row)] += 1
        for d, share in MIX.items():
            assert abs(counts[d] - share * 10 * step) <= 1, (step, counts)
    assert counts == {"pubmed": 320, "c4": 40, "wikipedia": 40}
    assert s.token_shares() == pytest.approx(MIX)
    assert s.epochs()["wikipedia"] == pytest.approx(4.0)


def test_rows_are_packed_windows_of_the_stream(data):
    s = MixtureSampler(data, MIX, SEQ, rows_per_step=16, seed=3)
    for _ in range(5):
        batch = s.next_batch()
        assert batch.shape == (16, SEQ + 1) and batch.dtype == torch.int64
        # consecutive tokens of one stream, starting at a multiple of SEQ
        assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(16, SEQ, dtype=torch.int64))
        starts = batch[:, 0] % 10000 - 1
        assert torch.all(starts % SEQ == 0)


def test_each_epoch_visits_every_window_once(data):
    s = MixtureSampler(data, {"wikipedia": 1.0}, SEQ, rows_per_step=5, seed=0)
    epoch1 = torch.cat([s.next_batch() for _ in range(2)])[:, 0].tolist()
    epoch2 = torch.cat([s.next_batch() for _ in range(2)])[:, 0].tolist()
    windows = [20001 + SEQ * j for j in range(10)]
    assert sorted(epoch1) == windows and sorted(epoch2) == windows
    assert epoch1 != epoch2  # a fresh order per epoch


def test_deterministic_given_seed_and_step(data):
    a = [MixtureSampler(data, MIX, SEQ, 12, seed=7).next_batch() for _ in range(2)]
    assert torch.equal(a[0], a[1])
    b = MixtureSampler(data, MIX, SEQ, 12, seed=8).next_batch()
    assert not torch.equal(a[0], b)


def assert_resume_is_exact(data, mix, resume_mix, rows, stop, steps):
    """A sampler stopped after `stop` batches and resumed from its state with `resume_mix` gives the
    uninterrupted run's batches `stop`..`steps`-1. Returns the stopped sampler."""
    full = MixtureSampler(data, mix, SEQ, rows, seed=1)
    batches = [full.next_batch() for _ in range(steps)]
    stopped = MixtureSampler(data, mix, SEQ, rows, seed=1)
    for _ in range(stop):
        stopped.next_batch()
    resumed = MixtureSampler(data, resume_mix, SEQ, rows, seed=1)
    resumed.load_state_dict(stopped.state_dict())
    for step in range(stop, steps):
        assert torch.equal(resumed.next_batch(), batches[step]), step
    return stopped


def test_resume_from_state_sees_the_same_batches(data, tmp_path):
    first = assert_resume_is_exact(data, MIX, MIX, rows=12, stop=13, steps=30)
    # a domain dropped from (or added to) the mix: the data of the others did not change, and the error says so
    for name in MIX:
        (tmp_path / name).symlink_to(data / name)
    write_domain(tmp_path, "extra", 81, offset=30001)
    for mix in ({"pubmed": 0.5, "c4": 0.5}, {**MIX, "extra": 0.1}):
        with pytest.raises(ValueError, match="same values") as err:
            MixtureSampler(tmp_path, mix, SEQ, 12, seed=1).load_state_dict(first.state_dict())
        assert "mix: checkpoint" in str(err.value) and "prepared again" not in str(err.value)
    # the same shares in another order would give other batches: refused too
    reordered = MixtureSampler(data, {d: MIX[d] for d in ("c4", "wikipedia", "pubmed")}, SEQ, 12, seed=1)
    with pytest.raises(ValueError, match="order of its domains"):
        reordered.load_state_dict(first.state_dict())
    for changed, what in [(dict(rows_per_step=12, seed=2), "seed: checkpoint 1 vs now 2"),
                          (dict(rows_per_step=16, seed=1), "rows_per_step: checkpoint 12 vs now 16")]:
        with pytest.raises(ValueError, match="Resume with the same values") as err:  # (another data order)
            MixtureSampler(data, MIX, SEQ, changed["rows_per_step"], seed=changed["seed"]).load_state_dict(
                first.state_dict())
        assert what in str(err.value)
    with pytest.raises(ValueError) as err:  # another --seq-len: not new data, whatever the window counts
        MixtureSampler(data, MIX, SEQ * 2, 12, seed=1).load_state_dict(first.state_dict())
    assert f"seq_len: checkpoint {SEQ} vs now {SEQ * 2}" in str(err.value) and "prepared again" not in str(err.value)


def test_resume_after_the_data_changed_is_refused(tmp_path):
    write_domain(tmp_path, "pubmed", 801)
    write_domain(tmp_path, "c4", 401, offset=10001)
    mix = {"pubmed": 0.5, "c4": 0.5}
    first = MixtureSampler(tmp_path, mix, SEQ, 4)
    first.next_batch()
    state = first.state_dict()
    (np.arange(1601) % 60000).astype(np.uint16).tofile(tmp_path / "c4" / "train.bin")  # prepared again, larger
    with pytest.raises(ValueError, match="windows per domain: .*'c4': 50.*'c4': 200.*prepared again"):
        MixtureSampler(tmp_path, mix, SEQ, 4).load_state_dict(state)


def test_resume_with_the_same_shares_written_otherwise_is_exact(data):
    """0.7/0.2/0.1 and 7/2/1 normalise to shares a bit apart (0.7000000000000001 vs 0.7): close enough to be
    accepted on resume, so the resumed sampler must use the checkpoint's shares, or a tie between two
    domains' arrears breaks the other way and the batches differ from the uninterrupted run's."""
    first, again = parse_mix("pubmed=0.7,c4=0.2,wikipedia=0.1"), parse_mix("pubmed=7,c4=2,wikipedia=1")
    assert first != again and first == pytest.approx(again)
    assert_resume_is_exact(data, first, again, rows=8, stop=10, steps=20)


def test_resume_after_the_data_changed_within_a_window_is_refused(tmp_path):
    write_domain(tmp_path, "c4", 801)  # 100 windows of SEQ
    first = MixtureSampler(tmp_path, {"c4": 1.0}, SEQ, 4)
    first.next_batch()
    state = first.state_dict()
    (np.arange(805) % 7).astype(np.uint16).tofile(tmp_path / "c4" / "train.bin")  # other tokens, still 100 windows
    with pytest.raises(ValueError, match="tokens per domain: .*'c4': 801.*'c4': 805.*prepared again"):
        MixtureSampler(tmp_path, {"c4": 1.0}, SEQ, 4).load_state_dict(state)


def test_ranks_split_the_global_batch(data):
    whole = MixtureSampler(data, MIX, SEQ, 12, seed=2)
    ranks = [MixtureSampler(data, MIX, SEQ, 12, seed=2, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        rows = whole.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert all(p.shape == (4, SEQ + 1) for p in parts)
        assert sorted(map(tuple, torch.cat(parts).tolist())) == sorted(map(tuple, rows.tolist()))
        for r, part in enumerate(parts):  # as documented: rank r keeps rows r, r + 3, r + 6, ... of the step
            assert torch.equal(part, rows[r::3]), r
    with pytest.raises(ValueError, match="multiple of world_size"):
        MixtureSampler(data, MIX, SEQ, 10, world_size=3)


def test_heldout_windows(data):
    w = heldout_windows(data, "c4", SEQ)
    assert w.shape == ((200 - 1) // SEQ, SEQ + 1)
    assert torch.equal(w[1:, 0], w[:-1, -1])  # back to back: every token after the first is scored once
    # c4's heldout.bin holds token i = 10001 + i: window j is tokens [8j, 8j + 9), from the file's first token
    # (shape and back-to-back alone passed with every window shifted one token on)
    assert torch.equal(w, 10001 + SEQ * torch.arange(24)[:, None] + torch.arange(SEQ + 1))
    few = heldout_windows(data, "c4", SEQ, max_windows=5)
    # 5 of the 24 windows spread evenly: round(23k/4) for k = 0..4 = 0, 6 (5.75), 12 (11.5, half to even), 17, 23
    assert torch.equal(few, w[[0, 6, 12, 17, 23]])
    assert torch.equal(few, heldout_windows(data, "c4", SEQ, max_windows=5))
    with pytest.raises(ValueError, match="--eval-windows\\) must be at least 1, got 0"):
        heldout_windows(data, "c4", SEQ, max_windows=0)


def test_bad_data_errors_name_the_path_and_the_command(data, tmp_path):
    with pytest.raises(DataError, match=r"(?s)does not exist.*python -m minimamba.data prepare") as e:
        check_domains(tmp_path / "nope", ["pubmed"])
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(DataError, match=r"(?s)domain\(s\) pubmd .*Domains found there: c4, pubmed, wikipedia"):
        MixtureSampler(data, {"pubmd": 1.0}, SEQ, 4)
    with pytest.raises(DataError, match="fewer than one window"):
        MixtureSampler(data, {"wikipedia": 1.0}, 100, 4)
    # the held-out check (train.py's --eval-domains, eval.py's --ppl-domains) lists the domains with a heldout.bin
    # and names the flag that chose the domains (it said "change --mix" for both)
    for domain, split in (("c4", "heldout"), ("wikipedia", "heldout"), ("pubmed", "train")):
        (tmp_path / domain).mkdir(exist_ok=True)
        (tmp_path / domain / f"{split}.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"(?s)no heldout tokens for domain\(s\) wiki in .*\(expected .*wiki/heldout"
                                        r"\.bin\)\. Domains found there: c4, wikipedia\..*or change --ppl-domains\.$"):
        check_domains(tmp_path, ["c4", "wiki"], "heldout", "--ppl-domains")
