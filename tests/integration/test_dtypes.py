"""Half-precision serving end to end."""

import pytest
from servers import start_server


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_serves_in_half_precision(dtype, tmp_path):
    server = start_server(tmp_path, "--dtype", dtype, "--kv-cache-memory", str(16 << 20))
    try:
        with server.client() as client:
            assert client.model_info().dtype == dtype
            result = client.generate("half precision", max_new_tokens=16, temperature=0, ignore_eos=True)
            assert len(result.token_ids) == 16 and result.finish_reason == "length"
            again = client.generate("half precision", max_new_tokens=16, temperature=0, ignore_eos=True)
            assert again.token_ids == result.token_ids
    finally:
        server.stop()
