"""GGUF checkpoints: tiny files written with the gguf package's writer, in every supported tensor
type, load to the same logits as transformers gives for the same file (both dequantize with the
gguf package, in float32); tensor-parallel ranks dequantize only their slices and agree with one
rank; bad files fail with one message naming the file."""

import threading

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize
from thread_tp import run_ranks
from tiny_gguf import CHAT_TEMPLATE, K_QUANTS, write_gguf
from transformers import AutoModelForCausalLM

from shardgate.shards.attention import AttentionMetadata
from shardgate.shards.gguf_checkpoint import GGUFCheckpoint, GGUFError, GGUFTensor
from shardgate.shards.kv_cache import KVCache
from shardgate.shards.parallel import ParallelConfig, ParallelState
from shardgate.shards.quantization import quantize_model
from shardgate.shards.weights import LoadedModel, load_model

CPU = torch.device("cpu")
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
PROMPT = torch.randint(3, 290, (37,), generator=torch.Generator().manual_seed(2)).tolist()
LOAD_LOCK = threading.Lock()  # accelerate's init_empty_weights patches torch for the whole process


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    made = {}

    def get(tensor_type: str, arch: str = "llama", tied: bool = False):
        key = (tensor_type, arch, tied)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"gguf-{arch}-{tensor_type}")
            made[key] = write_gguf(folder / f"tiny-{arch}-{tensor_type}.gguf", tensor_type, arch, tied)
        return made[key]

    return get


def prefill_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    block_size = 4
    num_blocks = -(-len(ids) // block_size)
    kv_cache = KVCache(loaded.model.kv_layout, num_blocks, block_size, torch.float32, CPU)
    metadata = AttentionMetadata.build([len(ids)], [0], [list(range(num_blocks))], block_size, CPU, None)
    with torch.inference_mode():
        return loaded.model.compute_logits(loaded.model(torch.tensor(ids), torch.arange(len(ids)), metadata, kv_cache))


def transformers_logits(path, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize(
    "tensor_type, arch, tied",
    [(t, "llama", False) for t in TENSOR_TYPES] + [("F16", "qwen2", True), ("Q8_0", "qwen2", True), ("Q5_K", "qwen2", False)],
)
def test_logits_match_transformers_on_the_same_file(gguf_file, tensor_type, arch, tied):
    path = gguf_file(tensor_type, arch, tied)
    loaded = load_model(str(path), torch.float32, CPU)
    assert loaded.config.model_type == arch and loaded.config.tie_word_embeddings == tied
    assert (loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight) == tied
    torch.testing.assert_close(prefill_logits(loaded, PROMPT), transformers_logits(path, PROMPT), rtol=0, atol=1e-4)


@pytest.mark.parametrize("tensor_type", ["Q4_1", "Q6_K"])
def test_tensor_parallel_ranks_give_the_logits_of_one_rank(gguf_file, tensor_type):
    # Q4_1 (hidden 64, intermediate 96): o_proj's column split is block-aligned (32), down_proj's (48) is not.
    # Q6_K (hidden 256, intermediate 512): o_proj's (128) is not aligned to 256, down_proj's (256) is.
    path = str(gguf_file(tensor_type))
    single = prefill_logits(load_model(path, torch.float32, CPU), PROMPT)

    def rank(tp):
        with LOAD_LOCK:
            loaded = load_model(path, torch.float32, CPU, ParallelState(ParallelConfig(tp_size=2), tp.rank, tp))
        return prefill_logits(loaded, PROMPT)

    for logits in run_ranks(2, rank):
        torch.testing.assert_close(logits, single, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tensor_type", TENSOR_TYPES)
def test_a_slice_dequantizes_like_the_whole_tensor(gguf_file, tensor_type):
    checkpoint = GGUFCheckpoint(gguf_file(tensor_type))
    name = "model.layers.0.mlp.down_proj.weight"  # (hidden, intermediate)
    source = checkpoint.tensor(name)
    whole = source.narrow(0, 0, source.shape[0])
    rows, columns = source.shape
    block = 256 if tensor_type in K_QUANTS else 32 if tensor_type not in ("F32", "F16", "BF16") else 1
    for dim, start, length in [(0, 3, 5), (1, block, block), (1, 0, columns // 2), (1, columns // 2, columns // 2), (1, 5, 7)]:
        assert torch.equal(source.narrow(dim, start, length), whole.narrow(dim, start, length)), (dim, start, length)
    reader_tensor = checkpoint._tensors[name]
    expected = dequantize(reader_tensor.data, reader_tensor.tensor_type).reshape(rows, columns)
    assert np.array_equal(whole.numpy(), expected)


def test_reading_undoes_llama_cpp_interleaving_of_rotary_halves():
    heads, head_dim, columns = 3, 8, 5
    original = np.arange(heads * head_dim * columns, dtype=np.float32).reshape(heads * head_dim, columns)
    # llama.cpp's permute (convert_hf_to_gguf.py), written independently of the reader
    interleaved = original.reshape(heads, 2, head_dim // 2, columns).swapaxes(1, 2).reshape(original.shape)

    class Stored:  # what GGUFReader gives for an F32 tensor
        tensor_type = GGMLQuantizationType.F32
        shape = np.array([columns, heads * head_dim])
        data = interleaved

    source = GGUFTensor(Stored(), interleaved_heads=heads)
    assert np.array_equal(source.narrow(0, 0, heads * head_dim).numpy(), original)
    assert np.array_equal(source.narrow(0, head_dim, 2 * head_dim).numpy(), original[head_dim:])  # a rank's heads
    assert np.array_equal(source.narrow(1, 1, 3).numpy(), original[:, 1:4])


def test_a_pipeline_stage_dequantizes_only_its_own_tensors(gguf_file, monkeypatch):
    read = []
    original = GGUFCheckpoint.tensor
    monkeypatch.setattr(GGUFCheckpoint, "tensor", lambda self, name, heads=None: read.append(name) or original(self, name, heads))
    load_model(str(gguf_file("Q8_0")), torch.float32, CPU, ParallelState(ParallelConfig(pp_size=2), 1))
    assert read and all(name.startswith("model.layers.1.") or name in ("model.norm.weight", "lm_head.weight") for name in read)


def test_int8_quantizes_the_dequantized_weights(gguf_file):
    path = str(gguf_file("Q4_K"))
    dense = prefill_logits(load_model(path, torch.float32, CPU), PROMPT)
    loaded = load_model(path, torch.float32, CPU)
    quantize_model(loaded.model, "int8")
    assert type(loaded.model.model.layers["0"].mlp.down_proj.weight).__name__ == "Int8Weight"
    quantized = prefill_logits(loaded, PROMPT)
    assert (quantized - dense).abs().max() < 0.1 * dense.abs().max()
    assert (quantized.argmax(-1) == dense.argmax(-1)).float().mean() > 0.9


def test_serving_defaults_come_from_the_metadata(gguf_file):
    loaded = load_model(str(gguf_file("F32")), torch.float32, CPU)
    assert loaded.defaults.chat_template == CHAT_TEMPLATE
    assert (loaded.defaults.bos_token, loaded.defaults.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert loaded.defaults.temperature is None
    assert loaded.config.eos_token_ids == (2,) and loaded.config.bos_token_id == 1


def _write(path, arch: str, tensor_type: GGMLQuantizationType = GGMLQuantizationType.F32):
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    data = np.zeros((4, 64), dtype=np.float32)
    if tensor_type == GGMLQuantizationType.F32:
        writer.add_tensor("token_embd.weight", data)
    else:
        from gguf.quants import quantize

        writer.add_tensor("token_embd.weight", quantize(data, tensor_type), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_files_fail_with_a_message_naming_the_file_and_the_problem(gguf_file, tmp_path):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello, I am not a model\n" * 10)
    truncated = tmp_path / "truncated.gguf"
    whole = gguf_file("Q4_0").read_bytes()
    truncated.write_bytes(whole[: len(whole) - 1000])
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(whole[:100])
    cases = {
        not_gguf: "not a GGUF file (it does not start with the GGUF magic number)",
        truncated: "truncated or corrupt GGUF file",
        header_only: "truncated or corrupt GGUF file",
        _write(tmp_path / "phi.gguf", "phi3"): "GGUF architecture 'phi3' is not supported; supported: llama, qwen2",
        _write(tmp_path / "q5.gguf", "llama", GGMLQuantizationType.Q5_0): "tensor token_embd.weight has type Q5_0; supported: F32, F16",
        _write(tmp_path / "sparse.gguf", "llama"): "GGUF metadata lacks llama.embedding_length",
    }
    for path, problem in cases.items():
        with pytest.raises(GGUFError) as caught:
            load_model(str(path), torch.float32, CPU)
        assert str(caught.value).startswith(f"{path}: ") and problem in str(caught.value), str(caught.value)
        assert "\n" not in str(caught.value)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        load_model(str(tmp_path / "absent.gguf"), torch.float32, CPU)
