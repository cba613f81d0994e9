"""minimamba.bench: what its rows measure (the model benchmark's option checks and its decode-vs-floor
run are in tests/test_decode_cpu.py, HF's activation checkpointing in tests/test_hub.py)."""

import pytest
import torch

from minimamba import bench


def test_the_hf_model_takes_our_weights_without_a_second_copy(monkeypatch):
    """Each row's peak memory is its process's peak RSS, so the HF row must never hold our model's weights
    and its own at once (it did: HF built its own random weights, then copied ours into them, and 130m's
    HF rows counted ~0.6 GiB more than HF needs: 1.55 vs 0.92 GiB after the build alone)."""
    transformers = pytest.importorskip("transformers", reason="HF transformers is the test-only oracle for Mamba2")
    import minimamba.model

    built = []

    class Recorded(minimamba.model.Mamba2LM):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            built.append(self)

    monkeypatch.setattr(minimamba.model, "Mamba2LM", Recorded)
    hf = bench._build("hf", "tiny", torch.float32, None)
    assert isinstance(hf, transformers.Mamba2ForCausalLM)
    ours = {p.data_ptr() for p in built[0].parameters()}
    assert all(p.device.type == "cpu" and p.data_ptr() in ours for p in hf.parameters())
    assert hf.lm_head.weight is hf.backbone.embeddings.weight  # tied: one Parameter, as HF's own init leaves it
    assert len(list(hf.parameters())) == len(list(built[0].parameters()))
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, built[0](ids), rtol=1e-4, atol=1e-4)
