"""A trained policy as a Hugging Face folder that `transformers` loads with no minirlhf installed:
the model in GPT-2's layout (model.GPT.save_pretrained), its tokenizer, and a generation config
that samples as minirlhf does.

The tokenizer is written as tokenizer.json (the `tokenizers` library's own format, which
AutoTokenizer reads as a fast tokenizer) with one addition: a post-processor that starts every
text with BOS, so that `tokenizer(prompt)` gives the ids minirlhf's prompts have. A byte-level
BPE also gets vocab.json and merges.txt (GPT-2's files), so that the folder is a valid
--init_from and --tokenizer of a later run.
"""
import importlib.util
import json
import os

from tokenizers import Tokenizer as HFTokenizer, processors

from ..data.tokenizer import BOS, EOS, PAD, UNK
from .checkpoint import atomic_write_json


def export_policy(policy, tok, folder, cfg):
    """Write `policy` (a GPT) and `tok` (data.tokenizer.Tokenizer) to `folder` (new or empty)."""
    os.makedirs(folder, exist_ok=True)
    ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    # safetensors is an optional extra: without it, the .bin layout (which needs nothing)
    weights = "safetensors" if importlib.util.find_spec("safetensors") else "bin"
    policy.save_pretrained(folder, weights=weights, token_ids=ids)
    # pure sampling at the run's temperature, as minirlhf samples (transformers' default top-k of
    # 50 would cut the tail)
    _write_json(folder, "generation_config.json",
                dict(**ids, do_sample=True, temperature=cfg.temperature, top_k=0,
                     max_new_tokens=cfg.max_new_tokens))
    export_tokenizer(tok, folder, model_max_length=cfg.block_size)


def export_tokenizer(tok, folder, model_max_length):
    """tokenizer.json (BOS first on every text), its config, and for a BPE GPT-2's vocab.json and
    merges.txt."""
    os.makedirs(folder, exist_ok=True)
    hf = HFTokenizer.from_str(tok.tok.to_str())
    hf.post_processor = processors.TemplateProcessing(single=f"{BOS} $A",
                                                      special_tokens=[(BOS, tok.bos_id)])
    hf.save(os.path.join(folder, "tokenizer.json"))
    specials = dict(bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    _write_json(folder, "special_tokens_map.json", specials)
    _write_json(folder, "tokenizer_config.json", dict(
        tokenizer_class="PreTrainedTokenizerFast", **specials, model_max_length=model_max_length,
        padding_side="left",  # prompts are left-padded, so that every response starts at one column
        clean_up_tokenization_spaces=False))  # decode exactly what the ids say
    model = json.loads(hf.to_str())["model"]
    if model["type"] == "BPE":
        _write_json(folder, "vocab.json", model["vocab"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))


def _write_json(folder, name, obj):
    atomic_write_json(obj, os.path.join(folder, name))
