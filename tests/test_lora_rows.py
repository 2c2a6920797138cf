"""Row blocks routed through their adapters by slicing equal peft's own mixed-batch routing."""
import threading

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qadapter_kernels.decoding.lora_rows import BASE_ADAPTER_NAME, row_blocks, sliced_lora_routing


def peft_model(dora: bool = False, seed: int = 0) -> peft.PeftModel:
    """A tiny Llama with LoRA adapters "a" (q/v/o) and "b" (q only), LoRA B random (peft starts it at zero)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], use_dora=dora)
    model = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(**lora), adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(**{**lora, "r": 2, "target_modules": ["q_proj"]}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn_like(param))
    return model.eval()


def peft_routing(model, names):
    return model.base_model._enable_peft_forward_hooks(adapter_names=names)


@pytest.mark.parametrize("names", [
    ["a"] * 3 + [BASE_ADAPTER_NAME] * 3,  # one adapter and the base model: decoding's mixed batch
    ["a"] * 2 + ["b"] * 2 + [BASE_ADAPTER_NAME] * 2,  # a composition of two
    ["b"] + [BASE_ADAPTER_NAME],  # one row per stream, the other adapter
])
def test_slicing_equals_peft_routing(names):
    model = peft_model()
    rows = len(names)
    ids = torch.randint(0, 64, (rows, 7), generator=torch.Generator().manual_seed(rows))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    with torch.no_grad():
        with peft_routing(model, names):
            expected = model(input_ids=ids, attention_mask=mask).logits
        active = model(input_ids=ids, attention_mask=mask).logits
        routing = sliced_lora_routing(model, names)
        assert routing is not None
        with routing:
            got = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # Afterwards every row runs through the active adapter again, exactly as before.
    assert torch.equal(after, active)


def test_disabled_adapters_inside_the_block_run_the_base_model():
    model = peft_model()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        with sliced_lora_routing(model, ["a", BASE_ADAPTER_NAME]), model.disable_adapter():
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, base, rtol=0, atol=0)


def test_where_slicing_is_not_the_whole_story_peft_routes():
    assert sliced_lora_routing(peft_model(dora=True), ["a", BASE_ADAPTER_NAME]) is None  # a variant: DoRA
    model = peft_model()
    assert sliced_lora_routing(model, ["a", BASE_ADAPTER_NAME, "a"]) is None  # not one block per name
    model.base_model.model.model.layers[0].self_attn.q_proj.merge(adapter_names=["a"])
    assert sliced_lora_routing(model, ["a", BASE_ADAPTER_NAME]) is None  # a merged layer


def test_an_unknown_adapter_is_an_error_naming_it():
    with pytest.raises(ValueError, match="adapter_names: the model has no adapter 'c' "):
        sliced_lora_routing(peft_model(), ["a", "c", BASE_ADAPTER_NAME])


def test_a_forward_of_another_batch_size_is_an_error():
    model = peft_model()
    with torch.no_grad(), sliced_lora_routing(model, ["a", BASE_ADAPTER_NAME]):
        with pytest.raises(ValueError, match="routes 2 rows, but this forward has 3"):
            model(input_ids=torch.zeros(3, 4, dtype=torch.long))


def test_row_blocks():
    assert row_blocks(["a", "a", "b", "c", "c"]) == [("a", 0, 2), ("b", 2, 3), ("c", 3, 5)]
    assert row_blocks([]) == [] and row_blocks(["x"]) == [("x", 0, 1)]


def test_no_names_runs_every_row_without_an_adapter_as_peft_disables_it():
    model = peft_model()
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with model.disable_adapter():
            base, base_one_row = model(input_ids=ids).logits, model(input_ids=ids[:1]).logits
        with sliced_lora_routing(model, None):
            got = model(input_ids=ids).logits
            one_row = model(input_ids=ids[:1]).logits  # any batch size
    # Bit-equal at the same batch size: a one-row product may take another BLAS kernel than three rows.
    assert torch.equal(got, base) and torch.equal(one_row, base_one_row)


def test_modules_to_save_or_a_forward_set_by_someone_else_keep_pefts_routing():
    model = peft_model()
    model.add_adapter("c", peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert sliced_lora_routing(model, ["a", BASE_ADAPTER_NAME]) is None
    model = peft_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.forward = lambda x, *args, **kwargs: type(layer).forward(layer, x, *args, **kwargs)
    assert sliced_lora_routing(model, ["a", BASE_ADAPTER_NAME]) is None


def test_a_routing_holds_in_its_own_thread_only():
    model = peft_model()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    other_thread = {}
    with torch.no_grad():
        active = model(input_ids=ids).logits
        with sliced_lora_routing(model, ["b", BASE_ADAPTER_NAME]):
            routed = model(input_ids=ids).logits
            thread = threading.Thread(target=lambda: other_thread.update(logits=model(input_ids=ids).logits))
            thread.start()
            thread.join()
    assert not torch.equal(routed, active)
    assert torch.equal(other_thread["logits"], active)  # the other thread saw peft's own forward
