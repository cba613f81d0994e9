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


# ----------------------------------------------------------------------------------------------------------
# what a mutation audit found untested (each test names the change it catches)


def windows_of(batch):
    """(domain, window number) of each row of a batch of the `data` fixture (window j starts at token j·SEQ)."""
    return [(domain_of(row), (int(row[0]) % 10000 - 1) // SEQ) for row in batch]


def test_a_tie_between_domains_goes_to_the_first_of_the_mix(data):
    """One row per step, shares 1/2 and 1/2: at step 0 both are 0.5 rows behind (a tie: the first domain of
    the mix), then the other is 1 row behind, and so on: first, second, first, second (it held with the ties
    broken towards the last domain too)."""
    for mix in ({"c4": 0.5, "wikipedia": 0.5}, {"wikipedia": 0.5, "c4": 0.5}):
        s = MixtureSampler(data, mix, SEQ, rows_per_step=1, seed=0)
        assert [domain_of(s.next_batch()[0]) for _ in range(4)] == [*mix] * 2


def test_every_epoch_and_every_domain_has_its_own_window_order(tmp_path):
    """The windows of a domain are visited in a fresh random order each epoch, and two domains of the same
    size in different orders. (Only the order of the rows *within* each step was checked, which the
    per-step shuffle changes anyway: a permutation seeded without the epoch, or without the domain, passed.)"""
    write_domain(tmp_path, "x", 10 * SEQ + 1, offset=1)
    write_domain(tmp_path, "y", 10 * SEQ + 1, offset=10001)  # (domain_of: "pubmed" is x, "c4" is y)
    s = MixtureSampler(tmp_path, {"x": 0.5, "y": 0.5}, SEQ, rows_per_step=10, seed=0)
    halves = {"pubmed": [], "c4": []}  # per domain: the set of its windows in the first step of each epoch
    for _ in range(4):  # 4 epochs: each step takes 5 windows of each domain, 2 steps per epoch
        first, second = windows_of(s.next_batch()), windows_of(s.next_batch())
        for d in halves:
            got = [j for dd, j in first if dd == d], [j for dd, j in second if dd == d]
            assert sorted(got[0] + got[1]) == list(range(10))  # each window once per epoch
            halves[d].append(frozenset(got[0]))
    assert len(set(halves["pubmed"])) > 1 and len(set(halves["c4"])) > 1  # other windows first in another epoch
    assert halves["pubmed"] != halves["c4"]  # two domains of one size: not the same order


def test_the_rows_of_a_step_are_shuffled_before_the_ranks_take_theirs(data):
    """Two domains, one row each per step, two ranks: with the rows shuffled anew each step (seeded by the
    step), rank 0 gets either domain; unshuffled, or shuffled the same way each step, it always got the same one."""
    s = MixtureSampler(data, {"c4": 0.5, "wikipedia": 0.5}, SEQ, rows_per_step=2, seed=0, rank=0, world_size=2)
    seen = [domain_of(s.next_batch()[0]) for _ in range(20)]
    assert set(seen) == {"c4", "wikipedia"}


def test_a_stream_of_exactly_k_windows_worth_of_tokens_has_k_minus_1(tmp_path):
    """A window is seq_len + 1 tokens and window j starts at j·seq_len, so 10·SEQ tokens hold 9 whole windows
    (the 10th would lack its last token), and the last (10·SEQ - 1) % SEQ = SEQ - 1 tokens are never read."""
    write_domain(tmp_path, "x", 10 * SEQ, offset=1)
    s = MixtureSampler(tmp_path, {"x": 1.0}, SEQ, rows_per_step=3, seed=0)
    assert s.num_windows == {"x": 9}
    rows = torch.cat([s.next_batch() for _ in range(3)])  # one epoch: 9 rows
    assert sorted(rows[:, 0].tolist()) == [1 + SEQ * j for j in range(9)]
    assert int(rows.max()) == 1 + 9 * SEQ  # the first token of the never-read tail is the last one read
    s.next_batch()
    assert s.epochs() == {"x": pytest.approx(12 / 9)}  # (a fraction, not whole passes)


def test_other_bad_arguments_are_refused(data):
    with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
        MixtureSampler(data, MIX, 0, 4)
    with pytest.raises(DataError, match="heldout.bin holds 200 tokens, fewer than one window of 201"):
        heldout_windows(data, "c4", 200)  # (199 // 200 = 0 windows)
    with pytest.raises(ValueError, match="the share of 'c4' in --mix must be >= 0, got nan"):
        parse_mix("pubmed=1,c4=nan")
    first = MixtureSampler(data, MIX, SEQ, 10, seed=0)
    first.next_batch()
    near = {"pubmed": 0.75, "c4": 0.15, "wikipedia": 0.1}  # (a changed mix, if not by much)
    with pytest.raises(ValueError, match="mix: checkpoint"):
        MixtureSampler(data, near, SEQ, 10, seed=0).load_state_dict(first.state_dict())
