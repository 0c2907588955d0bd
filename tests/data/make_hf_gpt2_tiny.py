"""Writes tests/data/hf-gpt2-tiny/: a random GPT-2 saved by Hugging Face transformers, with its logits
and greedy tokens (reference.pt), so that the tests check GPT.from_pretrained against Hugging Face
without transformers installed. Run once, in a venv with transformers (../shared/peers/setup.sh's):

    $PEER_VENV/bin/python tests/data/make_hf_gpt2_tiny.py
"""
import os

import torch
import transformers

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf-gpt2-tiny")
torch.manual_seed(0)
hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2,
    initializer_range=0.4)).eval()  # far from 0.02, so that GELU and LayerNorm details show
hf.save_pretrained(out)
# the .bin layout (what older uploads hold), so that reading it needs no safetensors
os.remove(os.path.join(out, "model.safetensors"))
torch.save(hf.state_dict(), os.path.join(out, "pytorch_model.bin"))
ids = torch.randint(0, 50, (2, 9))
prompt = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10], [0, 11, 12, 13]])  # left-padded with 0
prompt_mask = (prompt != 0).long()
with torch.no_grad():
    logits = hf(ids).logits
    greedy = hf.generate(input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=10,
                         min_new_tokens=10, do_sample=False, pad_token_id=0,
                         eos_token_id=None)[:, prompt.shape[1]:]
torch.save({"transformers": transformers.__version__, "ids": ids, "logits": logits,
            "prompt": prompt, "prompt_mask": prompt_mask, "greedy": greedy},
           os.path.join(out, "reference.pt"))
