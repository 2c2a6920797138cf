"""The reserved-buffer KV cache gives what transformers' DynamicCache gives, growing past its reserve."""
import torch
from transformers import DynamicCache, LlamaConfig
from transformers.cache_utils import DynamicLayer

from qadapter_kernels.decoding.kv_cache import MAX_RESERVED_POSITIONS, ReservedLayer, reserved_cache


def test_appends_equal_a_dynamic_layer_through_growth_and_reset():
    reserved, dynamic = ReservedLayer(reserve=5), DynamicLayer()
    gen = torch.Generator().manual_seed(0)
    for round_ in range(2):  # the second round after reset()
        for n in (3, 1, 1, 4, 1, 9):  # a prompt, then single tokens, then chunks past 5, 10 and 20 positions
            k, v = torch.randn(2, 3, n, 8, generator=gen), torch.randn(2, 3, n, 8, generator=gen)
            got, expected = reserved.update(k, v), dynamic.update(k, v)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert reserved.get_seq_length() == dynamic.get_seq_length()
            assert reserved.get_mask_sizes(1) == dynamic.get_mask_sizes(1)
        reserved.reset()
        dynamic = DynamicLayer()
        assert reserved.get_seq_length() == 0


def test_reserved_cache_replaces_the_full_attention_layers_only():
    config = LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         layer_types=["full_attention", "sliding_attention", "full_attention"], sliding_window=8)
    cache = reserved_cache(config, max_length=10 * MAX_RESERVED_POSITIONS)
    assert isinstance(cache, DynamicCache)
    assert [type(layer).__name__ for layer in cache.layers] == ["ReservedLayer", "DynamicSlidingWindowLayer",
                                                                 "ReservedLayer"]
    assert cache.layers[0].reserve == MAX_RESERVED_POSITIONS  # capped: longer sequences grow
