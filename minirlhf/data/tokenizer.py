"""Tokenizers built with the `tokenizers` library: word-level for the embedded tasks,
byte-level BPE for text.

Every tokenizer has dedicated PAD, BOS and EOS tokens (PAD != EOS: padding must never look like a
finished response). `Tokenizer` is a thin wrapper that knows their ids.
"""
import json

from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from ..plumbing.config import UsageError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]


class Tokenizer:
    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        self.pad_id, self.bos_id, self.eos_id = (tok.token_to_id(t) for t in (PAD, BOS, EOS))
        if None in (self.pad_id, self.bos_id, self.eos_id):
            raise ValueError(f"tokenizer lacks one of the special tokens {SPECIALS[:3]}")
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        """Decode keeping EOS (a response is finished iff its text ends with the EOS word)
        and dropping PAD."""
        return self.tok.decode([i for i in ids if i != self.pad_id], skip_special_tokens=False)

    def text(self, response):
        """A response as a person or an embedded task's judge reads it: the token ids it was
        sampled as, decoded with every token kept (a PAD or BOS sampled mid-response too), or a
        text as it is."""
        if isinstance(response, str):
            return response
        return self.tok.decode(list(response), skip_special_tokens=False)

    def save(self, path):
        self.tok.save(path)

    @classmethod
    def load(cls, path):
        return cls(HFTokenizer.from_file(path))


def word_tokenizer(words):
    """Whitespace-separated words, one id each; specials first so PAD is id 0."""
    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens(SPECIALS)
    return Tokenizer(tok)


def _byte_level(tok):
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return Tokenizer(tok)


def train_bpe(texts, vocab_size=4096):
    """Byte-level BPE trained on an iterable of strings."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return _byte_level(tok)


def gpt2_bpe(vocab_json, merges_txt):
    """GPT-2's byte-level BPE from its vocab.json / merges.txt; our specials are appended
    after its 50257 ids."""
    with open(vocab_json) as f:
        vocab = json.load(f)
    bad = next((t for t, i in vocab.items() if type(i) is not int), None)
    if bad is not None:
        raise ValueError(f"{vocab_json}: token {bad!r} has id {vocab[bad]!r}, not an integer")
    merges = []
    with open(merges_txt) as f:
        for n, line in enumerate(f.read().splitlines()[1:], start=2):  # line 1: #version
            if line.strip():
                merges.append(tuple(line.split()))
                if len(merges[-1]) != 2:
                    raise ValueError(f"{merges_txt}, line {n}: expected two tokens, got "
                                     f"{len(merges[-1])}")
    try:
        bpe = models.BPE(vocab, merges)
    except Exception as e:  # tokenizers raises a bare Exception (e.g. a merge out of vocabulary)
        raise ValueError(f"{merges_txt}: {e}") from None
    return _byte_level(HFTokenizer(bpe))


def fits_vocabulary(vocab, tok, named):
    """A checkpoint's embedding must have one row per token of `tok`: either exactly, or for the
    tokenizer's own tokens with minirlhf's PAD, BOS, EOS and UNK still to be appended (GPT-2's
    vocabulary): any other size would reuse rows learnt for other tokens."""
    base = tok.tok.get_vocab_size(with_added_tokens=False)
    if vocab not in (base, tok.vocab_size):
        raise UsageError(f"{named}: its vocabulary ({vocab} tokens) is not the tokenizer's ({base} "
                         f"tokens, {tok.vocab_size} with minirlhf's PAD, BOS, EOS and UNK): pass "
                         "the --tokenizer=DIR it was trained with")
