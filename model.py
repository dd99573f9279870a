"""
One small transformer that loads four checkpoint families:
- GPT-2: pre-LN, causal, fused q/k/v (`c_attn`), Conv1D layers storing the weight as (in, out), tied LM head.
- RoBERTa: post-LN encoder, positions offset past the padding index, dense-tanh-out classification head.
- BERT: post-LN encoder, token types, pooler (dense + tanh on [CLS]) then a linear classifier.
- Llama (also Qwen2, Mistral, SmolLM2): pre-RMSNorm, causal, rotary positions instead of a position table,
  grouped-query attention (n_kv_head key/value heads shared by the query heads), SwiGLU MLP, tied or untied
  LM head; Qwen2 adds q/k/v biases. Its modules keep Llama's names (q_proj ... down_proj), so LoRA targets
  read as they do in peft.
Module names are otherwise our own and short; HF_NAMES below is the only place that knows the checkpoint
names, used both to load weights (from_pretrained) and to write adapters under peft's key names (lora.py).
This file knows no adapter: lora.py wraps its Linear/Conv1D layers from the outside.
Its last section runs the model on a device: bf16 autocast, torch.compile, peak memory.
"""
import json
import math
import os
import resource
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
import torch.nn as nn
from torch.nn import functional as F


CAUSAL = ("gpt2", "llama")  # decoders: pre-norm, causal mask, positions that skip left padding, can generate


@dataclass
class Config:
    family: str = "bert"         # "gpt2" | "roberta" | "bert" | "llama": norms, masking, positions, head
    vocab_size: int = 30522
    n_positions: int = 512
    n_types: int = 2             # token-type embeddings (BERT 2, RoBERTa 1, GPT-2 0)
    d: int = 768
    n_layer: int = 12
    n_head: int = 12
    d_ff: int = 3072
    act: str = "gelu"            # "gelu" (erf, BERT/RoBERTa) or "gelu_new" (tanh approximation, GPT-2)
    eps: float = 1e-12
    dropout: float = 0.1
    pad_id: int = 0              # RoBERTa: 1, and positions start at pad_id + 1
    num_labels: int = 2          # 1 = regression (STS-B); 0 = a causal LM (an LM head, no task head)
    # Llama only
    n_kv_head: int = 0           # grouped-query attention: key/value heads, each serving n_head // n_kv_head
    head_dim: int = 0            # 0 = d // n_head
    rope_theta: float = 10000.0  # base of the rotary frequencies
    rope_scaling: dict = None    # Llama 3.x's "llama3" rescaling (see rope_frequencies); None = plain RoPE
    qkv_bias: bool = False       # Qwen2 (and Llama's attention_bias) give q/k/v a bias
    o_bias: bool = False         # Llama's attention_bias also gives o_proj one (Qwen2 does not)
    tie: bool = True             # the LM head is wte; False: a separate lm_head (Llama 3 8B, Qwen2 7B)


def rope_frequencies(cfg, device=None):
    """RoPE's inverse frequencies (hs/2,): theta^(-2i/hs), and Llama 3.x's rescaling: wavelengths longer
    than the original context / low_freq_factor are stretched by `factor`, shorter than original context /
    high_freq_factor kept, and those between blended smoothly (transformers' _compute_llama3_parameters)."""
    hs = cfg.head_dim or cfg.d // cfg.n_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hs, 2, device=device, dtype=torch.float) / hs))
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    old, lo, hi = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / lo, inv_freq / s["factor"], inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    middle = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(middle, blended, scaled)


def rotate(x, cos, sin):
    """Rotary embedding of q or k (B, nh, T, hs): each pair (x_i, x_{i + hs/2}) turns by its position times
    its frequency (the half-split layout of HF's Llama, not the interleaved one of the RoPE paper)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Conv1D(nn.Module):
    """GPT-2's linear layer: y = x W + b with W stored as (in, out), the transpose of nn.Linear."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features).normal_(std=0.02))  # (in, out)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


class Attention(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.hs = cfg.head_dim or cfg.d // cfg.n_head  # the causal mask comes with `mask` from encode
        self.llama = cfg.family == "llama"
        if cfg.family == "gpt2":
            self.c_attn = Conv1D(cfg.d, 3 * cfg.d)  # one fused (d, 3d) matrix; one adapter covers all of it
            self.out = Conv1D(cfg.d, cfg.d)
        elif self.llama:
            n_q, n_kv = cfg.n_head * self.hs, (cfg.n_kv_head or cfg.n_head) * self.hs
            self.q_proj = nn.Linear(cfg.d, n_q, bias=cfg.qkv_bias)    # (n_q, d)
            self.k_proj = nn.Linear(cfg.d, n_kv, bias=cfg.qkv_bias)   # (n_kv, d): fewer heads under GQA
            self.v_proj = nn.Linear(cfg.d, n_kv, bias=cfg.qkv_bias)
            self.o_proj = nn.Linear(n_q, cfg.d, bias=cfg.o_bias)
        else:
            self.query, self.key, self.value = (nn.Linear(cfg.d, cfg.d) for _ in range(3))
            self.out = nn.Linear(cfg.d, cfg.d)
        self.p = cfg.dropout

    def forward(self, x, mask, rope=None, kv=None):
        """rope (Llama): (cos, sin) of the tokens' positions, (B, 1, T, hs) each. kv (decoding): this block's
        cache, [] or [k, v] of the earlier tokens, (B, n_kv, T_past, hs) each; this call's keys and values
        are appended to it."""
        B, T, C = x.size()
        if hasattr(self, "c_attn"):
            q, k, v = self.c_attn(x).split(C, dim=2)
        elif self.llama:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        q, k, v = (t.view(B, T, -1, self.hs).transpose(1, 2) for t in (q, k, v))  # (B, nh or n_kv, T, hs)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)  # the cache keeps keys already rotated
        if kv is not None:
            if kv:
                k, v = torch.cat([kv[0], k], 2), torch.cat([kv[1], v], 2)  # (B, n_kv, T_past + T, hs)
            kv[:] = [k, v]
        # GQA: key/value head j serves query heads j*g ... j*g + g-1, without copying k, v to every query head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.size(1) != q.size(1),
                                           dropout_p=self.p if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hs)
        return self.o_proj(y) if self.llama else self.out(y)


class MLP(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.swiglu = cfg.family == "llama"
        if self.swiglu:  # down(silu(gate x) * up x), no biases
            self.gate_proj = nn.Linear(cfg.d, cfg.d_ff, bias=False)  # (d_ff, d)
            self.up_proj = nn.Linear(cfg.d, cfg.d_ff, bias=False)    # (d_ff, d)
            self.down_proj = nn.Linear(cfg.d_ff, cfg.d, bias=False)  # (d, d_ff)
        else:
            Lin = Conv1D if cfg.family == "gpt2" else nn.Linear
            self.fc, self.proj = Lin(cfg.d, cfg.d_ff), Lin(cfg.d_ff, cfg.d)
            self.approx = "tanh" if cfg.act == "gelu_new" else "none"

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.proj(F.gelu(self.fc(x), approximate=self.approx))


def norm(cfg):
    return nn.RMSNorm(cfg.d, eps=cfg.eps) if cfg.family == "llama" else nn.LayerNorm(cfg.d, eps=cfg.eps)


class Block(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.pre_ln = cfg.family in CAUSAL
        self.ln_1, self.attn = norm(cfg), Attention(cfg)
        self.ln_2, self.mlp = norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, rope=None, kv=None):
        if self.pre_ln:  # GPT-2, Llama
            x = x + self.drop(self.attn(self.ln_1(x), mask, rope, kv))
            return x + self.drop(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.drop(self.attn(x, mask)))  # BERT / RoBERTa
        return self.ln_2(x + self.drop(self.mlp(x)))


class Head(nn.Module):
    """Task head, always trainable. RoBERTa: dense-tanh-out on <s>. BERT: pooler (dense-tanh on [CLS]) +
    linear. GPT-2, Llama: `score` (no bias) on the last non-pad token."""

    def __init__(self, cfg):
        super().__init__()
        self.family, self.drop = cfg.family, nn.Dropout(cfg.dropout)
        if cfg.family in CAUSAL:
            self.score = nn.Linear(cfg.d, cfg.num_labels, bias=False)
        else:
            self.dense = nn.Linear(cfg.d, cfg.d)  # RoBERTa classifier.dense, BERT pooler.dense
            self.out_proj = nn.Linear(cfg.d, cfg.num_labels)

    def forward(self, h, attention_mask):
        if self.family in CAUSAL:  # score the last non-pad position
            last = attention_mask.size(1) - 1 - attention_mask.flip(1).long().argmax(1)
            return self.score(h[torch.arange(h.size(0), device=h.device), last])
        x = self.drop(h[:, 0]) if self.family == "roberta" else h[:, 0]  # RoBERTa also drops out <s>
        return self.out_proj(self.drop(torch.tanh(self.dense(x))))


class Transformer(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.d) if cfg.family != "llama" else None  # Llama: RoPE
        self.wtt = nn.Embedding(cfg.n_types, cfg.d) if cfg.n_types else None
        self.ln_emb = nn.LayerNorm(cfg.d, eps=cfg.eps) if cfg.family not in CAUSAL else None  # post-LN ones
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = norm(cfg) if cfg.family in CAUSAL else None
        self.head = Head(cfg) if cfg.num_labels else None  # a causal LM scores tokens with its LM head
        untied = cfg.num_labels == 0 and not cfg.tie
        self.lm_head = nn.Linear(cfg.d, cfg.vocab_size, bias=False) if untied else None  # (vocab, d)
        self.apply(self._init_weights)
        # recompute each block's activations in backward (torch.utils.checkpoint): memory for time, same grads
        self.grad_checkpointing = False

    @staticmethod
    def _init_weights(m):  # HF's init (initializer_range 0.02), used for heads a checkpoint lacks
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, cache=None):
        """Final hidden states (B, T, d): HF's last_hidden_state. cache (decoding): one list per block
        (see Attention), holding the earlier tokens' keys and values; attention_mask then covers the earlier
        tokens and these, (B, T_past + T)."""
        cfg, (B, T) = self.cfg, input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask.bool()  # (B, S): S = T_past + T keys
        S = keep.size(1)
        if cfg.family == "roberta":  # positions count real tokens only, starting after the padding index
            pos = (torch.cumsum(keep, 1) * keep).long() + cfg.pad_id
        elif cfg.family in CAUSAL:  # count real tokens: a left-padded prompt starts at 0, as in HF's generate
            pos = (torch.cumsum(keep, 1) - 1).clamp(min=0)[:, S - T:]
        else:
            pos = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.wte(input_ids)  # (B, T, d)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:  # Llama: the angles pos * inv_freq, in fp32 as HF computes them, then cast like x
            angles = pos[..., None].float() * rope_frequencies(cfg, x.device)  # (B, T, hs/2)
            angles = torch.cat((angles, angles), -1)[:, None]  # (B, 1, T, hs): both halves of each pair
            rope = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        if self.wtt is not None:
            x = x + self.wtt(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        x = self.drop(self.ln_emb(x) if self.ln_emb is not None else x)
        mask = keep[:, None, None, :]  # (B, 1, 1, S): True = attend to this key
        if cfg.family in CAUSAL:  # causal, and every token sees itself, so a left pad's row is never empty
            causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            itself = torch.eye(T, S, dtype=torch.bool, device=x.device).roll(S - T, 1)
            mask = mask & causal | itself  # (B, 1, T, S)
        for i, block in enumerate(self.h):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # replayed in backward with the same RNG state, so dropout masks match
                x = torch.utils.checkpoint.checkpoint(block, x, mask, rope, use_reentrant=False)
            else:
                x = block(x, mask, rope, cache[i] if cache is not None else None)
        return self.ln_f(x) if self.ln_f is not None else x

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """Task logits (B, num_labels), or a causal LM's next-token logits (B, T, vocab)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.encode(input_ids, attention_mask, token_type_ids)
        return self.head(h, attention_mask) if self.head is not None else self.logits(h)

    def logits(self, h):
        """The LM head: (…, d) -> (…, vocab), tied to the token embedding unless the checkpoint has its own
        lm_head (a module under that name, which "all-linear" LoRA leaves out as peft does)."""
        return self.lm_head(h) if self.lm_head is not None else h @ self.wte.weight.t()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens, eos_id, use_cache=True):
        """Greedy decoding of a batch of left-padded prompts (B, T) -> new tokens (B, ≤ max_new_tokens);
        a finished row continues with eos_id, and decoding stops when every row has ended (HF's
        generate(do_sample=False) with pad = eos). With the KV cache each step feeds only the newest token;
        use_cache=False runs the whole sequence again at every step (the plain reference)."""
        if self.cfg.family not in CAUSAL:
            raise ValueError(f"a {self.cfg.family} model is an encoder and cannot generate; "
                             f"use a GPT-2 or Llama-family checkpoint")
        B, T = input_ids.shape
        if T + max_new_tokens > self.cfg.n_positions:
            raise ValueError(f"a {T}-token prompt and {max_new_tokens} new tokens exceed the "
                             f"{self.cfg.n_positions} positions; lower --max_new_tokens or --max_len")
        cache = [[] for _ in self.h] if use_cache else None
        ids, mask, new = input_ids, attention_mask, input_ids
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        out = []
        for _ in range(max_new_tokens):
            h = self.encode(new if use_cache else ids, mask, cache=cache)[:, -1]  # (B, d)
            token = self.logits(h).argmax(-1).masked_fill(done, eos_id)        # (B,)
            out.append(token)
            done |= token == eos_id
            if done.all():
                break
            new = token[:, None]
            ids, mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
        return torch.stack(out, 1)


# -----------------------------------------------------------------------------
# checkpoint names: ours -> HF's, per family. A block key is looked up without its "h.{i}." prefix.

HF_NAMES = {
    "bert": {
        "wte": "embeddings.word_embeddings", "wpe": "embeddings.position_embeddings",
        "wtt": "embeddings.token_type_embeddings", "ln_emb": "embeddings.LayerNorm", "h": "encoder.layer",
        "attn.query": "attention.self.query", "attn.key": "attention.self.key",
        "attn.value": "attention.self.value", "attn.out": "attention.output.dense",
        "ln_1": "attention.output.LayerNorm",
        "mlp.fc": "intermediate.dense", "mlp.proj": "output.dense", "ln_2": "output.LayerNorm",
        "head.dense": "pooler.dense", "head.out_proj": "classifier",
    },
    "gpt2": {
        "wte": "wte", "wpe": "wpe", "h": "h", "ln_f": "ln_f", "attn.c_attn": "attn.c_attn",
        "attn.out": "attn.c_proj", "ln_1": "ln_1", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj",
        "ln_2": "ln_2", "head.score": "score",
    },
}
HF_NAMES["roberta"] = {**HF_NAMES["bert"], "head.dense": "classifier.dense",
                       "head.out_proj": "classifier.out_proj"}
HF_NAMES["llama"] = {
    "wte": "embed_tokens", "h": "layers", "ln_f": "norm", "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm", "head.score": "score", "lm_head": "lm_head",
    **{f"attn.{p}_proj": f"self_attn.{p}_proj" for p in "qkvo"},
    **{f"mlp.{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")},
}
# the backbone's attribute in HF's model, and the head modules HF keeps inside it (BERT's pooler: in bert.)
HF_PREFIX = {"bert": "bert.", "roberta": "roberta.", "gpt2": "transformer.", "llama": "model."}
HEAD_IN_BACKBONE = {"bert": ("head.dense",), "roberta": (), "gpt2": (), "llama": ()}


def hf_name(family, name):
    """Our module/parameter name -> its name in HF's *ForSequenceClassification (*ForCausalLM) model, e.g.
    h.3.attn.query.weight -> roberta.encoder.layer.3.attention.self.query.weight,
    h.3.attn.q_proj.weight -> model.layers.3.self_attn.q_proj.weight, lm_head.weight -> lm_head.weight."""
    table, prefix = HF_NAMES[family], HF_PREFIX[family]
    _, i, rest = name.split(".", 2) if name.startswith("h.") else (None, None, name)  # block i, or None
    module, _, leaf = rest.rpartition(".") if rest.endswith((".weight", ".bias")) else (rest, "", "")
    local = table[module] + (("." + leaf) if leaf else "")
    if i is not None:
        return f"{prefix}{table['h']}.{i}.{local}"
    if module == "lm_head" or module.startswith("head.") and module not in HEAD_IN_BACKBONE[family]:
        return local
    return prefix + local


LLAMA_TYPES = ("llama", "qwen2", "mistral")  # one architecture up to q/k/v biases and the sliding window


def llama_config(hf, num_labels):
    """A Llama-family config.json -> our Config. rope_theta/rope_scaling (transformers 4) or rope_parameters
    (transformers 5); anything this model would compute differently is refused here, not run wrongly."""
    rope = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta")}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"rope type {kind!r} is not supported: nanoPEFT computes plain RoPE and Llama 3's")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
        raise ValueError("only the SwiGLU MLP without biases (hidden_act silu) is supported")
    n_positions = hf["max_position_embeddings"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window", hf["model_type"] == "mistral") else None
    if window:  # within the window, sliding-window attention is plain causal attention: cap the length there
        n_positions = min(n_positions, window)
    pad = next((v for v in (hf.get("pad_token_id"), hf.get("eos_token_id")) if v is not None), 0)
    qwen2 = hf["model_type"] == "qwen2"  # q/k/v always carry biases, o_proj never
    return Config(family="llama", vocab_size=hf["vocab_size"], n_positions=n_positions, n_types=0,
                  d=hf["hidden_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                  d_ff=hf["intermediate_size"], act="silu", eps=hf.get("rms_norm_eps", 1e-6),
                  dropout=hf.get("attention_dropout", 0.0),
                  pad_id=pad[0] if isinstance(pad, list) else pad,  # Llama 3.1: a list of eos ids
                  num_labels=num_labels, n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                  head_dim=hf.get("head_dim") or 0, rope_theta=float(rope.get("rope_theta") or 10000.0),
                  rope_scaling={k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                     "original_max_position_embeddings")}
                  if kind == "llama3" else None,
                  qkv_bias=qwen2 or bool(hf.get("attention_bias")), o_bias=bool(hf.get("attention_bias")),
                  tie=hf.get("tie_word_embeddings", False))  # transformers' default for these types


def config_from_hf(hf, num_labels):
    """transformers' config.json (a dict) -> our Config."""
    family = hf.get("model_type")
    if family in LLAMA_TYPES:
        return llama_config(hf, num_labels)
    if family not in HF_NAMES:
        raise ValueError(f"model_type {family!r} is not supported: nanoPEFT loads gpt2, roberta, bert and "
                         f"Llama-family ({', '.join(LLAMA_TYPES)}) checkpoints")
    if family == "gpt2":
        pad_id = hf.get("eos_token_id", 50256) if hf.get("pad_token_id") is None else hf["pad_token_id"]
        return Config(family=family, vocab_size=hf["vocab_size"], n_positions=hf["n_positions"], n_types=0,
                      d=hf["n_embd"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                      d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
                      act=hf.get("activation_function", "gelu_new"), eps=hf.get("layer_norm_epsilon", 1e-5),
                      dropout=hf.get("resid_pdrop", 0.1), pad_id=pad_id, num_labels=num_labels)
    return Config(family=family, vocab_size=hf["vocab_size"], n_positions=hf["max_position_embeddings"],
                  n_types=hf.get("type_vocab_size", 2), d=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
                  n_head=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
                  act=hf.get("hidden_act", "gelu"), eps=hf.get("layer_norm_eps", 1e-12),
                  dropout=hf.get("hidden_dropout_prob", 0.1), pad_id=hf.get("pad_token_id", 0),
                  num_labels=num_labels)


def resolve(name_or_dir):
    """A local folder as is, or a hub id downloaded through huggingface_hub; offline, one clear line."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if name_or_dir.startswith((".", "/", "~")) or name_or_dir.count("/") > 1:  # a path, not an "org/name" id
        raise FileNotFoundError(f"model folder {name_or_dir!r} does not exist; "
                                "pass --model DIR with config.json")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name_or_dir, allow_patterns=["config.json", "*.safetensors",
                                 "model.safetensors.index.json", "pytorch_model.bin", "vocab.json",
                                 "merges.txt", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                                 "generation_config.json"])
    except Exception as e:
        raise ConnectionError(f"cannot fetch {name_or_dir!r} from the Hugging Face hub ({type(e).__name__}); "
                              "offline, pass --model DIR (a local folder with config.json and "
                              "model.safetensors)") from None


def load_state_dict(folder):
    path = os.path.join(folder, "model.safetensors")
    try:
        from safetensors.torch import load_file
        if os.path.exists(path):
            return load_file(path)
        path = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(path):  # a checkpoint in shards (Llama 3B and up): the index names each file
            with open(path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            return {k: t for name in files for k, t in load_file(os.path.join(folder, name)).items()}
        path = os.path.join(folder, "pytorch_model.bin")
        if os.path.exists(path):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and pickle raise their own types for a truncated or foreign file
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}): truncated or not "
                         f"weights? download it again") from None
    raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin; "
                            "pass a full checkpoint folder")


# HF's saved masks and position ranges: no weights
HF_BUFFERS = (".attn.bias", ".attn.masked_bias", "position_ids", "rotary_emb.inv_freq")


def read_config(folder, num_labels=2):
    """Our Config from a checkpoint folder's config.json, with one line for a missing, broken or odd file."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{folder} has no config.json; "
                                "pass --model DIR pointing at a HF checkpoint folder")
    try:
        with open(cfg_path) as f:
            cfg = config_from_hf(json.load(f), num_labels)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    except KeyError as e:
        raise ValueError(f"{cfg_path} lacks the key {e}; is it a transformers config.json?") from None
    except AttributeError:
        raise ValueError(f"{cfg_path} is not a JSON object; is it a transformers config.json?") from None
    hf_keys = dict(vocab_size="vocab_size", n_positions="max_position_embeddings", d="hidden_size",
                   n_layer="num_hidden_layers", n_head="num_attention_heads", d_ff="intermediate_size")
    if cfg.family == "gpt2":
        hf_keys.update(n_positions="n_positions", d="n_embd", n_layer="n_layer", n_head="n_head",
                       d_ff="n_inner")
    for k, key in hf_keys.items():
        v = getattr(cfg, k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{cfg_path}: {key} is {v!r}, not a positive integer; fix the file")
    if cfg.d % cfg.n_head and not cfg.head_dim:
        raise ValueError(f"{cfg_path}: the hidden size {cfg.d} is not a multiple of the {cfg.n_head} heads")
    if cfg.n_kv_head and cfg.n_head % cfg.n_kv_head:
        raise ValueError(f"{cfg_path}: {cfg.n_head} query heads cannot share {cfg.n_kv_head} key/value heads")
    return cfg


def from_pretrained(name_or_dir, num_labels=2):
    """Build a Transformer from a checkpoint folder or hub id. Every backbone tensor must be found and shaped
    as ours, and the checkpoint may hold no backbone tensor we leave unread; the task head is loaded when the
    checkpoint has one with num_labels outputs, else initialised."""
    folder = resolve(name_or_dir)
    cfg = read_config(folder, num_labels)
    model = Transformer(cfg)
    model.name_or_path = name_or_dir  # adapter files name their base model (peft's base_model_name_or_path)
    sd = load_state_dict(folder)
    prefix, table = HF_PREFIX[cfg.family], HF_NAMES[cfg.family]
    read = set()
    for name, t in model.state_dict().items():
        key = hf_name(cfg.family, name)
        if key not in sd and key.startswith(prefix):  # a bare backbone (BertModel, GPT2Model) has no prefix
            key = key[len(prefix):]
        if key not in sd or sd[key].shape != t.shape:
            if name.startswith("head."):
                continue  # a fresh task head
            raise ValueError(f"checkpoint {folder} has no tensor {key} of shape {tuple(t.shape)}")
        with torch.no_grad():
            t.copy_(sd[key].to(t.dtype))
        read.add(key)
    roots = {table[k].split(".")[0] for k in ("wte", "wpe", "wtt", "ln_emb", "h", "ln_f") if k in table}
    unread = sorted(k for k in sd if k not in read and not k.endswith(HF_BUFFERS)
                    and (k[len(prefix):] if k.startswith(prefix) else k).split(".")[0] in roots)
    if unread:  # nanoGPT's key-count check: a backbone tensor we do not read is a layout we do not know
        raise ValueError(f"checkpoint {folder} has {len(unread)} backbone tensors this model does not read "
                         f"(e.g. {unread[0]}); is it a plain {cfg.family} checkpoint?")
    return model


# -----------------------------------------------------------------------------
# running it: precision, torch.compile, peak memory

def autocast(device):
    """bf16 autocast on CUDA (fp32 master weights); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def compile_model(model, device, grad_accum=1):
    """torch.compile, one graph per padded shape. On CUDA with one micro-batch per step, "reduce-overhead"
    replays each step as a CUDA graph; with --grad_accum it does not, because the next micro-batch's replay
    would overwrite the outputs and gradients the step still holds. On CPU, dropout keeps ATen's RNG
    (inductor's own was ~10% slower here)."""
    if device.startswith("cuda"):
        return torch.compile(model, mode="reduce-overhead" if grad_accum == 1 else "default")
    from torch._inductor import config as inductor
    inductor.fallback_random = True
    return torch.compile(model)


def graphs_compiled():
    """Graphs torch.compile has built so far: a step that compiled is timed apart from s/step."""
    from torch._dynamo.utils import counters  # here, not at the top: dynamo takes seconds to import
    return counters["stats"]["unique_graphs"]


def peak_memory_mb(device):
    """Training's peak: CUDA's allocator since the epoch began; on CPU the process's peak RSS so far."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
