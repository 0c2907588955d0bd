import sys

import pytest
import torch

from minirlhf.generate import generate, left_pad, response_mask, sequence_logprobs
from minirlhf.model import GPT, GPTConfig, KVCache, ScalarModel


def tiny(vocab=23, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, n_positions=48, n_embd=32, n_layer=2, n_head=4)).eval()


def test_kv_cache_decode_equals_full_forward():
    model = tiny()
    ids = torch.randint(0, 23, (3, 12))
    full = model(ids)
    cache = KVCache(model.cfg, 3, 12, "cpu", torch.float32)
    steps = [model(ids[:, :5], cache=cache)]  # prefill 5, then decode one token at a time
    for t in range(5, 12):
        steps.append(model(ids[:, t:t + 1], position_ids=torch.full((3, 1), t), cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_left_padding_equals_each_row_alone():
    model = tiny()
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    ids, mask = left_pad(rows, pad_id=0)
    batch_logits = model(ids, mask)
    resp, _, _ = generate(model, ids, mask, 6, eos_id=1, pad_id=0, greedy=True, stop_early=False)
    for i, r in enumerate(rows):
        alone = model(torch.tensor([r]))
        torch.testing.assert_close(batch_logits[i, -len(r):], alone[0], atol=1e-5, rtol=0)
        r_alone, _, _ = generate(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), 6,
                                 eos_id=1, pad_id=0, greedy=True, stop_early=False)
        assert resp[i].tolist() == r_alone[0].tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_match_generation(temperature):
    model = tiny()
    ids, mask = left_pad([[5, 6, 7], [8, 9, 10, 11, 12], [13]], pad_id=0)
    g = torch.Generator().manual_seed(0)
    resp, logp, rmask = generate(model, ids, mask, 10, eos_id=1, pad_id=0, temperature=temperature, generator=g)
    again = sequence_logprobs(model, ids, mask, resp, rmask, temperature=temperature)
    torch.testing.assert_close(again, logp * rmask, atol=1e-5, rtol=0)


def test_generation_is_reproducible_and_stops_at_eos():
    model = tiny()
    ids, mask = left_pad([[5, 6], [7, 8, 9]], pad_id=0)
    out = [generate(model, ids, mask, 30, eos_id=3, pad_id=0, generator=torch.Generator().manual_seed(1))[0]
           for _ in range(2)]
    assert torch.equal(out[0], out[1])
    resp = out[0]
    for row in resp.tolist():
        if 3 in row:  # everything after the first EOS is padding
            assert all(t == 0 for t in row[row.index(3) + 1:])


def test_sft_loss_is_the_response_tokens_nll_eos_included_prompt_excluded():
    from minirlhf.data.batches import Batcher
    from minirlhf.data.tasks import get_task
    from minirlhf.sft import sft_loss
    tok = get_task("reviews").tokenizer
    model = tiny(vocab=tok.vocab_size)
    prompt, response = "review soup prices positive :", "the soup was great ."
    loss, n = sft_loss(model, Batcher(tok, 16, 16), [prompt], [response])
    ids = [tok.bos_id] + tok.encode(prompt) + tok.encode(response) + [tok.eos_id]
    first = 1 + len(tok.encode(prompt))  # the first response token
    logp = torch.log_softmax(model(torch.tensor([ids])), -1)[0]
    expected = -sum(logp[t - 1, ids[t]] for t in range(first, len(ids)))
    assert n == len(ids) - first and torch.allclose(loss, expected, atol=1e-5)


def test_response_mask_includes_first_eos_only():
    r = torch.tensor([[4, 5, 2, 0, 0], [4, 4, 4, 4, 4], [2, 0, 0, 0, 0]])
    assert response_mask(r, eos_id=2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_hf_layout_round_trip(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # HF Conv1D layout: (in, out)
    loaded = GPT.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 23, (2, 9))
    torch.testing.assert_close(loaded(ids), model(ids))


def test_hf_layout_is_gpt2s(tmp_path):
    """Without transformers here: the layout itself. HF's GPT-2 keeps its four Conv1D weights as (in, out), the
    transpose of nn.Linear's; GPT2Model's keys have no 'transformer.' prefix and it carries causal-mask buffers."""
    model = tiny()
    model.save_pretrained(tmp_path)
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    ours = model.state_dict()
    for name in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
        for i in range(model.cfg.n_layer):
            assert torch.equal(sd[f"transformer.h.{i}.{name}"], ours[f"transformer.h.{i}.{name}"].t())
    bare = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    bare |= {f"h.{i}.attn.bias": torch.ones(1, 1, 16, 16) for i in range(model.cfg.n_layer)}
    torch.save(bare, tmp_path / "pytorch_model.bin")
    ids = torch.randint(0, 23, (2, 9))
    torch.testing.assert_close(GPT.from_pretrained(tmp_path).eval()(ids), model(ids))
    torch.save({**bare, "h.0.attn.extra": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="unexpected tensor 'h.0.attn.extra'"):
        GPT.from_pretrained(tmp_path)
    del bare["ln_f.bias"]
    torch.save(bare, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing tensors.*ln_f.bias"):
        GPT.from_pretrained(tmp_path)


def test_from_pretrained_reads_the_legacy_pre_zip_format(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)  # older Hugging Face uploads predate torch 1.6's zip format
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    torch.save(sd, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ids = torch.randint(0, 23, (2, 9))
    torch.testing.assert_close(GPT.from_pretrained(tmp_path).eval()(ids), model(ids))


def test_from_pretrained_rejects_wrong_shapes(tmp_path):
    tiny().save_pretrained(tmp_path)
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    sd["transformer.wpe.weight"] = torch.zeros(7, 32)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="wpe.weight"):
        GPT.from_pretrained(tmp_path)


def test_from_pretrained_without_safetensors_says_what_to_install(tmp_path, monkeypatch):
    tiny().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").rename(tmp_path / "model.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed: import raises
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(OSError, match="needs the optional package safetensors"):
        GPT.from_pretrained(tmp_path)


def test_from_pretrained_reads_model_safetensors_when_installed(tmp_path):
    save_file = pytest.importorskip("safetensors.torch").save_file
    model = tiny()
    model.save_pretrained(tmp_path)
    bin_path = tmp_path / "pytorch_model.bin"
    sd = torch.load(bin_path, weights_only=True)
    # as Hugging Face writes it: the tied LM head left out, no shared storage
    save_file({k: v.clone() for k, v in sd.items() if k != "lm_head.weight"},
              str(tmp_path / "model.safetensors"))
    bin_path.unlink()
    ids = torch.randint(0, 23, (2, 9))
    torch.testing.assert_close(GPT.from_pretrained(tmp_path).eval()(ids), model(ids))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors: corrupt or truncated checkpoint"):
        GPT.from_pretrained(tmp_path)


def test_double_backward_through_math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = tiny()
    ids = torch.randint(0, 23, (2, 6))
    with sdpa_kernel([SDPBackend.MATH]):
        loss = model(ids).logsumexp(-1).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        second = torch.autograd.grad(sum((g ** 2).sum() for g in grads), model.transformer.wte.weight)[0]
    assert torch.isfinite(second).all() and second.abs().sum() > 0


def test_scalar_model_reads_its_head_on_the_backbone():
    rm = ScalarModel(tiny())
    ids = torch.randint(0, 23, (2, 5))
    values, h = rm(ids, return_hidden=True)
    assert values.shape == (2, 5) and h.shape == (2, 5, 32)
    assert torch.equal(h, rm.gpt(ids, return_hidden=True))
    torch.testing.assert_close(values, rm.head(h).squeeze(-1))
