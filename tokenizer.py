"""
The two tokenizers our checkpoints use, built from the files in the checkpoint folder:
- byte-level BPE (GPT-2, RoBERTa, Llama-family: SmolLM2, Qwen2, Llama 3) through tiktoken: the merges give
  the merge ranks, the vocab the model's ids (identical to the ranks for GPT-2, a different order for the
  others). GPT-2 and RoBERTa read vocab.json + merges.txt; Llama-family checkpoints read tokenizer.json
  (transformers' fast tokenizer: its pre-tokenizer, e.g. SmolLM2's digits one by one, and its added tokens
  such as <|im_start|>), and render the chat template of an instruct checkpoint as transformers does;
- WordPiece (BERT) from vocab.txt: basic tokenization (clean, CJK split, lowercase, strip accents, split
  punctuation) then greedy longest-match-first with "##" continuations.
Both encode sentence pairs with the family's special tokens and truncate the longer segment first.
"""
import json
import os
import unicodedata

import tiktoken

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# tokenizers' Sequence[Digits(individual_digits), ByteLevel] (SmolLM2) as one regex. It acts as GPT-2's
# pieces with every ASCII digit then cut out on its own: " 12" -> " ", "1", "2" (other numerals, "½" or
# "٣", stay in runs as in GPT-2)
DIGITS_PAT = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\P{N}0-9]+| (?=[0-9])|[0-9]| ?[^\s\p{L}\p{N}]+"""
              r"""|\s+(?!\S)|\s+""")


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


def read_json(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_vocab_merges(folder):
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        # first line: #version
        merges = [line.split() for line in f.read().split("\n")[1:] if line.strip()]
    return vocab, merges


def read_tokenizer_json(folder):
    """tokenizer.json -> (vocab, merges, regex, added tokens {text: id}, NFC or not). Only what tiktoken can
    run exactly: a byte-level BPE whose pre-tokenizer is GPT-2's regex, SmolLM2's digits + GPT-2's regex, or
    one Split regex (Llama 3, Qwen2); anything else (SentencePiece-style Llama 2/Mistral) is refused."""
    tj = read_json(folder, "tokenizer.json")
    model, pre, norm = tj["model"], tj.get("pre_tokenizer") or {}, tj.get("normalizer")
    steps = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        pat = GPT2_PAT
    elif (kinds == ["Digits", "ByteLevel"] and steps[0]["individual_digits"]
          and steps[1].get("use_regex", True)):
        pat = DIGITS_PAT
    elif (kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True)
          and "Regex" in steps[0]["pattern"]
          and steps[0]["behavior"] == "Isolated" and not steps[0]["invert"]):
        pat = steps[0]["pattern"]["Regex"]
    else:
        pat = None
    if (model.get("type") != "BPE" or model.get("byte_fallback") or pat is None
            or norm not in (None, {"type": "NFC"})):
        raise ValueError(f"{folder}/tokenizer.json is not a byte-level BPE tiktoken can run (pre-tokenizer "
                         f"{kinds}, normalizer {norm and norm.get('type')}); nanoPEFT reads GPT-2-style ones")
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    return model["vocab"], merges, pat, added, norm is not None


class BPETokenizer:
    """Byte-level BPE; family "gpt2" adds no special tokens, "roberta" writes <s> A </s></s> B </s>, "llama"
    adds none (SmolLM2 and Qwen2 add none to plain text; Llama 3's <|begin_of_text|> comes with its chat
    template only)."""

    def __init__(self, folder, family):
        b2u = bytes_to_unicode()
        u2b = {c: b for b, c in b2u.items()}
        to_bytes = lambda s: bytes(u2b[c] for c in s)
        pat, added, self.nfc = GPT2_PAT, {}, False
        if family == "llama" and os.path.exists(os.path.join(folder, "tokenizer.json")):
            vocab, merges, pat, added, self.nfc = read_tokenizer_json(folder)
        else:
            vocab, merges = read_vocab_merges(folder)
        ranks = {bytes([b]): i for i, b in enumerate(b2u)}  # 256 single bytes, then one per merge
        for a, b in merges:
            ranks.setdefault(to_bytes(a) + to_bytes(b), len(ranks))
        to_str = lambda bs: "".join(b2u[b] for b in bs)
        self.rank_to_id = {r: vocab[to_str(tok)] for tok, r in ranks.items() if to_str(tok) in vocab}
        self.id_to_rank = {i: r for r, i in self.rank_to_id.items()}  # decoding: added tokens left out
        self.family = family
        if family == "llama":
            self._llama_specials(folder, vocab, added)
            added = self.added
        specials = {t: len(ranks) + j for j, t in enumerate(added)}  # tiktoken's ids for them, past the ranks
        self.rank_to_id.update({specials[t]: i for t, i in added.items()})
        self.enc = tiktoken.Encoding(f"bpe-{family}", pat_str=pat, mergeable_ranks=ranks,
                                     special_tokens=specials)
        if family == "llama":
            return
        specials = ("<s>", "</s>", "<pad>") if family == "roberta" else ("<|endoftext|>",)
        missing = [s for s in specials if s not in vocab]
        if missing:
            raise ValueError(f"{folder}/vocab.json has no {missing[0]} token; is it a {family} checkpoint?")
        if family == "roberta":
            self.bos, self.eos, self.pad_id = vocab["<s>"], vocab["</s>"], vocab["<pad>"]
        else:
            self.bos = self.eos = self.pad_id = vocab["<|endoftext|>"]  # GPT-2 pads with eos
        self.chat_template = None

    def _llama_specials(self, folder, vocab, added):
        """Added tokens, bos/eos/pad and the chat template, from tokenizer_config.json (transformers' view)
        and the model's generation_config.json/config.json."""
        tc = read_json(folder, "tokenizer_config.json")
        text = lambda t: t.get("content") if isinstance(t, dict) else t  # "<|im_end|>" or {"content": ...}
        self.special_text = {k: text(tc.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        named = [*self.special_text.values(), *map(text, tc.get("additional_special_tokens") or [])]
        self.added = {**{t: vocab[t] for t in named if t in vocab}, **added}
        ids = lambda v: v[0] if isinstance(v, list) else v
        model_cfg = {**read_json(folder, "config.json"), **read_json(folder, "generation_config.json")}
        self.eos = (self.added.get(self.special_text["eos_token"])  # an instruct model ends its turn here
                    if self.special_text["eos_token"] in self.added else ids(model_cfg.get("eos_token_id")))
        self.bos = self.added.get(self.special_text["bos_token"], ids(model_cfg.get("bos_token_id")))
        self.pad_id = self.added.get(self.special_text["pad_token"], self.eos)
        if self.eos is None:
            raise ValueError(f"{folder} names no end-of-sequence token (tokenizer_config.json eos_token or "
                             "config.json eos_token_id); a causal LM needs one to stop generating")
        template = tc.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = {t["name"]: t["template"] for t in template}.get("default")
        path = os.path.join(folder, "chat_template.jinja")  # transformers 5 writes it beside the config
        if template is None and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                template = f.read()
        self.chat_template = template

    def tokenize(self, text, special=False):
        """Text -> ids. special=True (chat-template text): added tokens such as <|im_start|> written in the
        text become their single ids, as in transformers; otherwise they are plain text."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        ranks = self.enc.encode(text, allowed_special="all") if special else self.enc.encode_ordinary(text)
        return [self.rank_to_id[r] for r in ranks]

    def render_chat(self, messages, add_generation_prompt=True):
        """The chat template applied to [{"role": ..., "content": ...}, ...] as transformers'
        apply_chat_template(messages, tokenize=False, add_generation_prompt=...) renders it: jinja2's sandbox
        with trim_blocks/lstrip_blocks, loop controls, its tojson and raise_exception, and the special tokens
        as variables. SmolLM2's template adds its default system turn when the messages have none."""
        if self.chat_template is None:
            raise ValueError("this checkpoint's tokenizer_config.json has no chat_template")
        import datetime
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                           extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
            json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                       sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        specials = {k: v for k, v in self.special_text.items() if v is not None}
        return env.from_string(self.chat_template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **specials)

    def encode_chat(self, user_text, system=None):
        """One user turn -> the prompt ids an instruct model expects, ending with the assistant's header
        (transformers' apply_chat_template(..., add_generation_prompt=True)); its answer then ends
        with eos."""
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": user_text}]
        return self.tokenize(self.render_chat(messages), special=True)

    def decode(self, ids):
        """Token ids -> text; the special tokens (no bytes of their own) are left out."""
        return self.enc.decode([self.id_to_rank[i] for i in ids if i in self.id_to_rank], errors="replace")

    def encode(self, a, b=None, max_len=512):
        """-> (input_ids, token_type_ids) for one sentence or a pair, at most max_len tokens."""
        ta, tb = self.tokenize(a), self.tokenize(b) if b is not None else []
        if self.family in ("gpt2", "llama"):
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
    if family == "llama" and os.path.exists(os.path.join(folder, "tokenizer.json")):
        return BPETokenizer(folder, family)
    for f in ("vocab.json", "merges.txt"):
        if not os.path.exists(os.path.join(folder, f)):
            raise FileNotFoundError(f"{folder} has no {f}; a {family} checkpoint needs vocab.json and "
                                    "merges.txt" + (" (or tokenizer.json)" if family == "llama" else ""))
    return BPETokenizer(folder, family)
