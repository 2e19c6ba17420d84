"""KV-cache ONNX decoder (prefill + decode graphs) against PyTorch: logits, caches and greedy tokens."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from heart_onnx.llm.generate import OnnxKVDecoder, torch_generate  # noqa: E402
from heart_onnx.llm.kv_export import KVWrapper, export_kv_decoder, load_kv_decoder_files  # noqa: E402
from heart_onnx.llm.models import ModelSpec  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = ModelSpec.parse("tiny:layers=2,hidden=32,heads=4,vocab=128,max_pos=128").build(seed=0)
    files = export_kv_decoder(model, tmp_path_factory.mktemp("kv"))
    return model, files


def test_prefill_and_decode_steps_match_torch(exported):
    model, files = exported
    rng = np.random.default_rng(1)
    B, T = 3, 7  # not the export's example sizes (2, 4): axes really are dynamic
    ids = rng.integers(0, 128, (B, T)).astype(np.int64)
    am = np.ones((B, T), np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(am), use_cache=True)
    with OnnxKVDecoder(files, "ort-cpu", threads=1) as dec:
        logits, past = dec.prefill_step(ids, am)
        np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-4, rtol=1e-4)
        ref_layers = ref.past_key_values.layers
        for i in range(files.num_layers):
            np.testing.assert_allclose(past[2 * i], ref_layers[i].keys.numpy(), atol=1e-5)
            np.testing.assert_allclose(past[2 * i + 1], ref_layers[i].values.numpy(), atol=1e-5)
        # decode step with a fresh token against torch with the same cache
        nxt = rng.integers(0, 128, (B, 1)).astype(np.int64)
        am2 = np.ones((B, T + 1), np.int64)
        logits2, past2 = dec.decode_step(nxt, am2, past)
        with torch.no_grad():
            ref2 = model(input_ids=torch.as_tensor(nxt), attention_mask=torch.as_tensor(am2),
                         past_key_values=ref.past_key_values, use_cache=True)
        np.testing.assert_allclose(logits2, ref2.logits.numpy(), atol=1e-4, rtol=1e-4)
        assert past2[0].shape == (B, files.num_heads, T + 1, files.head_dim)
        # and against a no-cache forward over the whole sequence (an independent reference)
        with torch.no_grad():
            full = model(input_ids=torch.as_tensor(np.concatenate([ids, nxt], 1))).logits[:, -1:]
        np.testing.assert_allclose(logits2, full.numpy(), atol=1e-4, rtol=1e-4)


def test_greedy_32_tokens_same_as_pytorch(exported):
    model, files = exported
    ids = np.random.default_rng(2).integers(0, 128, (2, 9)).astype(np.int64)
    ref = torch_generate(model, ids, 32)
    with OnnxKVDecoder(files, "ort-cpu", threads=1) as dec:
        got = dec.generate(ids, 32)
        nocache = dec.generate_no_cache(ids, 32)
    assert got.tokens.shape == (2, 32)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(nocache.tokens, ref.tokens)
    # HF's own generate() as a third, independent reference
    with torch.no_grad():
        hf = model.generate(torch.as_tensor(ids), attention_mask=torch.ones(2, 9, dtype=torch.long), max_new_tokens=32,
                            do_sample=False, min_new_tokens=32, pad_token_id=0)
    np.testing.assert_array_equal(hf[:, 9:].numpy(), ref.tokens)
    assert got.ttft_s > 0 and got.decode_s > 0 and got.decode_tokens_per_s > 0


def test_wrapper_without_past_equals_plain_model(exported):
    model, _ = exported
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        out = KVWrapper(model, False)(ids, torch.ones_like(ids))
        ref = model(ids).logits
    torch.testing.assert_close(out[0], ref)
    assert len(out) == 1 + 2 * model.config.num_hidden_layers


def test_interrupted_export_is_not_reused(exported, tmp_path):
    _, files = exported
    assert load_kv_decoder_files(files.prefill.parent) == files
    (tmp_path / "prefill.onnx").write_bytes(b"partial")
    assert load_kv_decoder_files(tmp_path) is None
