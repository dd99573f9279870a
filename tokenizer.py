"""
The two tokenizers our checkpoints use, built from the files in the checkpoint folder:
- byte-level BPE (GPT-2, RoBERTa) through tiktoken: merges.txt gives the merge ranks, vocab.json the model's
  ids (identical to the ranks for GPT-2, a different order for RoBERTa);
- WordPiece (BERT) from vocab.txt: basic tokenization (clean, CJK split, lowercase, strip accents, split
  punctuation) then greedy longest-match-first with "##" continuations.
Both encode sentence pairs with the family's special tokens and truncate the longer segment first.
"""
import json
import os
import unicodedata

import tiktoken

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 bytes to printable characters (vocab.json/merges.txt are written in
    it)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def truncate_pair(a, b, budget):
    """longest_first as HF's fast tokenizers cut a pair to `budget` tokens: a segment of at most half the
    budget is kept whole and the other one cut; otherwise both get half, the longer one (the second on ties)
    the odd token."""
    if len(a) + len(b) <= budget:
        return a, b
    a_short = len(a) <= len(b)
    short = min(len(a), len(b))
    if 2 * short <= budget:
        n_short, n_long = short, budget - short
    else:
        n_short, n_long = budget // 2, budget - budget // 2
    return (a[:n_short], b[:n_long]) if a_short else (a[:n_long], b[:n_short])


class BPETokenizer:
    """Byte-level BPE; family "gpt2" adds no special tokens, "roberta" writes <s> A </s></s> B </s>."""

    def __init__(self, folder, family):
        b2u = bytes_to_unicode()
        u2b = {c: b for b, c in b2u.items()}
        to_bytes = lambda s: bytes(u2b[c] for c in s)
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
            # first line: #version
            merges = [line.split() for line in f.read().split("\n")[1:] if line.strip()]
        ranks = {bytes([b]): i for i, b in enumerate(b2u)}  # 256 single bytes, then one per merge
        for a, b in merges:
            ranks.setdefault(to_bytes(a) + to_bytes(b), len(ranks))
        self.enc = tiktoken.Encoding(f"bpe-{family}", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                                     special_tokens={})
        to_str = lambda bs: "".join(b2u[b] for b in bs)
        self.rank_to_id = {r: vocab[to_str(tok)] for tok, r in ranks.items() if to_str(tok) in vocab}
        self.id_to_rank = {i: r for r, i in self.rank_to_id.items()}
        self.family = family
        specials = ("<s>", "</s>", "<pad>") if family == "roberta" else ("<|endoftext|>",)
        missing = [s for s in specials if s not in vocab]
        if missing:
            raise ValueError(f"{folder}/vocab.json has no {missing[0]} token; is it a {family} checkpoint?")
        if family == "roberta":
            self.bos, self.eos, self.pad_id = vocab["<s>"], vocab["</s>"], vocab["<pad>"]
        else:
            self.bos = self.eos = self.pad_id = vocab["<|endoftext|>"]  # GPT-2 pads with eos

    def tokenize(self, text):
        return [self.rank_to_id[r] for r in self.enc.encode_ordinary(text)]

    def decode(self, ids):
        """Token ids -> text; the special tokens (no bytes of their own) are left out."""
        return self.enc.decode([self.id_to_rank[i] for i in ids if i in self.id_to_rank], errors="replace")

    def encode(self, a, b=None, max_len=512):
        """-> (input_ids, token_type_ids) for one sentence or a pair, at most max_len tokens."""
        ta, tb = self.tokenize(a), self.tokenize(b) if b is not None else []
        if self.family == "gpt2":
            ta, tb = truncate_pair(ta, tb, max_len)
            ids = ta + tb
        elif b is None:
            ids = [self.bos] + ta[:max_len - 2] + [self.eos]
        else:
            ta, tb = truncate_pair(ta, tb, max_len - 4)
            ids = [self.bos] + ta + [self.eos, self.eos] + tb + [self.eos]
        return ids, [0] * len(ids)


class WordPieceTokenizer:
    """BERT uncased: [CLS] A [SEP] B [SEP] with token types 0…0 1…1."""

    def __init__(self, folder, lowercase=True):
        with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        self.lowercase = lowercase
        missing = [t for t in ("[CLS]", "[SEP]", "[UNK]", "[PAD]") if t not in self.vocab]
        if missing:
            raise ValueError(f"{folder}/vocab.txt has no {missing[0]} token; is it a BERT WordPiece vocab?")
        self.cls, self.sep, self.unk = self.vocab["[CLS]"], self.vocab["[SEP]"], self.vocab["[UNK]"]
        self.pad_id = self.vocab["[PAD]"]

    @staticmethod
    def _is_punct(ch):
        cp = ord(ch)
        return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 \
            or unicodedata.category(ch).startswith("P")

    @staticmethod
    def _is_cjk(cp):
        return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                   (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF),
                   (0x2F800, 0x2FA1F)))

    def basic(self, text):
        """Whitespace/punctuation split after cleaning, CJK spacing, lowercasing and accent stripping."""
        out = []
        for ch in text:
            cp, cat = ord(ch), unicodedata.category(ch)
            if cp == 0 or cp == 0xFFFD or (cat.startswith("C") and ch not in "\t\n\r"):
                continue  # control characters
            out.append(f" {ch} " if self._is_cjk(cp) else " " if ch.isspace() or cat == "Zs" else ch)
        text = "".join(out)
        if self.lowercase:
            text = unicodedata.normalize("NFD", text.lower())
            text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        words = []
        for word in text.split():
            cur = ""
            for ch in word:
                if self._is_punct(ch):
                    words += [cur, ch] if cur else [ch]
                    cur = ""
                else:
                    cur += ch
            if cur:
                words.append(cur)
        return words

    def wordpiece(self, word):
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in self.vocab:
                end -= 1
            if end == start:
                return [self.unk]  # no piece matches: the whole word is unknown
            ids.append(self.vocab[("##" if start else "") + word[start:end]])
            start = end
        return ids

    def tokenize(self, text):
        return [i for w in self.basic(text) for i in self.wordpiece(w)]

    def encode(self, a, b=None, max_len=512):
        ta = self.tokenize(a)
        if b is None:
            ids = [self.cls] + ta[:max_len - 2] + [self.sep]
            return ids, [0] * len(ids)
        ta, tb = truncate_pair(ta, self.tokenize(b), max_len - 3)
        return [self.cls] + ta + [self.sep] + tb + [self.sep], [0] * (len(ta) + 2) + [1] * (len(tb) + 1)


def load_tokenizer(folder, family):
    if family == "bert":
        if not os.path.exists(os.path.join(folder, "vocab.txt")):
            raise FileNotFoundError(f"{folder} has no vocab.txt; "
                                    "a bert checkpoint needs its WordPiece vocab.txt")
        path = os.path.join(folder, "tokenizer_config.json")
        lower = json.load(open(path)).get("do_lower_case", True) if os.path.exists(path) else True
        return WordPieceTokenizer(folder, lower)
    for f in ("vocab.json", "merges.txt"):
        if not os.path.exists(os.path.join(folder, f)):
            raise FileNotFoundError(f"{folder} has no {f}; "
                                    f"a {family} checkpoint needs vocab.json and merges.txt")
    return BPETokenizer(folder, family)
