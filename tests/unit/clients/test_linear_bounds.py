import torch

from shardgate.clients.tools import linear_bounds
from shardgate.shards.weights import load_model


def test_the_bounds_time_every_linear_weight_and_the_tied_head_once():
    model = load_model("builtin:tiny", torch.float32, torch.device("cpu")).model
    weights = linear_bounds._linear_weights(model)
    names = {name for name, param in model.named_parameters() if param.dim() == 2 and "embed_tokens" not in name}
    assert len(weights) == len(names) + (1 if model.config.tie_word_embeddings else 0)
    assert any(weight is model.lm_head.weight or weight.data_ptr() == model.lm_head.weight.data_ptr() for weight in weights)
    bounds = linear_bounds.measure(model, [1, 4], repeats=3)
    assert bounds.weight_bytes == sum(w.numel() * 4 for w in weights)
    assert set(bounds.eager_s) == set(bounds.prepacked_s) == {1, 4}
    assert bounds.read_s > 0 and bounds.peak_flops > 0
    assert bounds.kernels_s == {}  # no decode kernels loaded in this process
    lines = bounds.lines()
    assert lines[0].startswith("linears alone (") and len(lines) == 3


def test_with_the_decode_kernels_loaded_the_bounds_time_the_served_linears_too(cpu_kernels_loaded):
    model = load_model("builtin:tiny", torch.bfloat16, torch.device("cpu")).model
    bounds = linear_bounds.measure(model, [1, 4], repeats=3)
    assert set(bounds.kernels_s) == {1, 4} and all(seconds > 0 for seconds in bounds.kernels_s.values())
    assert all("decode kernels" in line for line in bounds.lines()[1:])
    assert set(bounds.as_dict()["batches"]["4"]) == {"eager_ms", "prepacked_ms", "decode_kernels_ms"}


def test_int8_weights_have_no_float_bound():
    from shardgate.shards.quantization import quantize_model

    model = load_model("builtin:tiny", torch.float32, torch.device("cpu")).model
    quantize_model(model, "int8")
    assert linear_bounds.measure(model, [1]) is None
