"""
A method's trained tensors to and from files. The LoRA family writes peft's adapter format
(adapter_model.safetensors + adapter_config.json): peft.PeftModel.from_pretrained loads our LoRA, Dynamic LoRA
and AdaLoRA files into transformers' model. Keys follow peft's pattern
base_model.model.<HF name>.lora_X.weight, with model.hf_name mapping our module names to the checkpoint's.
- LoRA: peft's LORA config.
- Dynamic LoRA: LORA with rank_pattern (r_l) and alpha_pattern (α_l = m_l·α, so that peft's α_l/r_l is our
  m_l·s_l).
- AdaLoRA / ADAQ-LoRA: peft's ADALORA, holding only the kept triplets and rank_pattern (which ones).
- TLoRA / TLoRA+: the same layout with our own peft_type (peft has no TLoRA), frozen factors included: they
  are random, and a load must reproduce the outputs.
- The baselines (full, head, bitfit, adapter): trainable.safetensors, the trained tensors under our names.
Every file is written to a temp name and renamed, so a full disk or a Ctrl-C never leaves half a file.
"""
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adaq_lora import AdaLoRA, SVDLinear
from checkpoint import write_atomic, write_file
from dynamic_lora import DynamicLoRA
from lora import LoRA, adapter_layers
from model import hf_name
from tlora_plus import TLoRAPlus


def write_safetensors(folder, name, tensors, metadata, extra=None):
    size = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    write_atomic(folder, {name: lambda path: save_file(tensors, path, metadata=metadata), **(extra or {})},
                 size)


def saved_method(path, default):
    """The method a nanoPEFT safetensors file was written by (its metadata), else `default`."""
    try:
        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("nanopeft_method", default)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}); "
                         f"re-save it") from None


def read_adapter_config(folder):
    path = os.path.join(folder, "adapter_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} has no adapter_config.json; was it trained with another --method?")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); "
                         f"re-save the adapter") from None


# -----------------------------------------------------------------------------
# peft's names

MODULES_TO_SAVE = {"gpt2": ["score"], "roberta": ["classifier"], "bert": ["classifier", "pooler"]}


def peft_task(model):
    """peft's task_type and the trained head it saves whole: a classifier, or none for a causal LM."""
    if model.head is None:
        return {"task_type": "CAUSAL_LM", "modules_to_save": None}
    return {"task_type": "SEQ_CLS", "modules_to_save": MODULES_TO_SAVE[model.cfg.family]}


def peft_key(family, name, adalora=False):
    """Our tensor name -> its key in a peft file: h.0.attn.query.lora_A ->
    base_model.model.roberta.encoder.layer.0.attention.self.query.lora_A.weight (AdaLoRA's factors have no
    .weight); the head keeps HF's name."""
    mod, _, leaf = name.rpartition(".")
    if leaf.startswith("lora_"):
        return f"base_model.model.{hf_name(family, mod)}.{leaf}" + ("" if adalora else ".weight")
    return "base_model.model." + hf_name(family, name)


def adapter_tensors(model):
    """What a LoRA-family file holds: the trained tensors, plus the adapters' buffers (TLoRA's frozen factors;
    Dynamic LoRA's m_l goes into alpha_pattern instead)."""
    return {**{n: p for n, p in model.named_parameters() if p.requires_grad},
            **{n: b for n, b in model.named_buffers() if ".lora_" in n and not n.endswith(".lora_m")}}


def targets(model):
    return sorted(hf_name(model.cfg.family, n) for n in adapter_layers(model))


# -----------------------------------------------------------------------------
# adapter_config.json, per method

def lora_config(method, model):
    c, family = method.cfg, model.cfg.family
    cfg = {"peft_type": "LORA", **peft_task(model), "r": c.rank, "lora_alpha": c.alpha,
           "lora_dropout": c.dropout, "use_rslora": c.rslora, "fan_in_fan_out": family == "gpt2",
           "target_modules": targets(model), "bias": "none", "init_lora_weights": True,
           "inference_mode": True, "base_model_name_or_path": getattr(model, "name_or_path", "")}
    if isinstance(method, DynamicLoRA):
        layers = adapter_layers(model)
        cfg["rank_pattern"] = {hf_name(family, n): l.r for n, l in layers.items()}
        cfg["alpha_pattern"] = {hf_name(family, n): l.lora_m.item() * c.alpha for n, l in layers.items()}
    return cfg


def tlora_config(method, model):
    c = method.cfg
    return {"peft_type": method.name.upper(), **peft_task(model), "r": c.rank, "trainable": method.config(),
            "b_init": c.b_init, "init": c.tlora_init, "scaling": 1.0,
            "output_dropout": 0.5 if c.tlora_init == "official" else 0.0, "learnable_scalar": method.scalar,
            "lr_multipliers": method.lr_multipliers(), "seed": c.seed, "target_modules": targets(model),
            "base_model_name_or_path": getattr(model, "name_or_path", "")}


def adalora_config(method, model):
    c, family = method.cfg, model.cfg.family
    a = method.allocator
    keep = a.keep if a else {}
    return {"peft_type": "ADALORA", **peft_task(model), "init_r": c.init_r, "target_r": c.target_r,
            "tinit": c.tinit, "tfinal": c.tfinal, "deltaT": c.delta_t, "beta1": c.beta1, "beta2": c.beta2,
            "orth_reg_weight": c.orth_reg_weight, "total_step": a.T if a else c.tinit + c.tfinal + 1,
            "lora_alpha": c.alpha, "lora_dropout": c.dropout, "fan_in_fan_out": family == "gpt2",
            "bias": "none", "inference_mode": True, "target_modules": targets(model),
            "init_lora_weights": True,
            "rank_pattern": {hf_name(family, n) + ".lora_E": k.tolist() for n, k in keep.items()} or None,
            "base_model_name_or_path": getattr(model, "name_or_path", "")}


def file_tensors(method, model):
    """{key in the adapter file: tensor}. AdaLoRA keeps only the kept triplets: rows of Q and λ, columns
    of P."""
    family, ada = model.cfg.family, isinstance(method, AdaLoRA)
    keep = method.allocator.keep if ada and method.allocator else {}
    tensors = {}
    for n, p in adapter_tensors(model).items():
        mod, _, leaf = n.rpartition(".")
        if mod in keep:
            p = p[:, keep[mod]] if leaf == "lora_B" else p[keep[mod]]
        tensors[peft_key(family, n, ada)] = p.detach().contiguous()
    return tensors


# -----------------------------------------------------------------------------
# save and load

def save(method, model, folder):
    """Write the method's trained tensors to folder."""
    if not isinstance(method, LoRA):
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        write_safetensors(folder, "trainable.safetensors", tensors, {"nanopeft_method": method.name})
        return
    config = (adalora_config if isinstance(method, AdaLoRA) else
              tlora_config if isinstance(method, TLoRAPlus) else lora_config)(method, model)
    text = json.dumps(config, indent=2)

    write_safetensors(folder, "adapter_model.safetensors", file_tensors(method, model),
                      {"format": "pt", "nanopeft_method": method.name},
                      {"adapter_config.json": lambda path: write_file(path, text)})


def load(method, model, folder):
    """Fill the wrapped model's trained tensors from folder (written by save, or by peft for LoRA/AdaLoRA)."""
    if not isinstance(method, LoRA):
        return load_trainable(method, model, folder)
    cfg = read_adapter_config(folder)
    path = os.path.join(folder, "adapter_model.safetensors")
    saved = saved_method(path, str(cfg.get("peft_type")).lower())  # peft's own files have no method: its type
    if saved != method.name:
        raise ValueError(f"{folder} holds a {saved} adapter; pass --method {saved} to load it")
    if isinstance(method, AdaLoRA):
        return load_adalora(method, model, cfg, path)
    if isinstance(method, DynamicLoRA):
        check_ranks(model, cfg, folder)
    params = adapter_tensors(model)
    ours = {peft_key(model.cfg.family, n): n for n in params}
    tensors = load_file(path)
    for key, t in tensors.items():
        if key not in ours:
            raise ValueError(f"adapter tensor {key} matches no layer of this model; wrong --model?")
        if params[ours[key]].shape != t.shape:
            raise ValueError(f"adapter tensor {key} is {tuple(t.shape)} but this model's is "
                             f"{tuple(params[ours[key]].shape)}: pass the --rank it was trained with "
                             f"({cfg.get('r')})")
    absent = sorted(k for k in ours if k not in tensors)
    if absent:
        raise ValueError(f"{path} lacks {absent[0]} ({len(absent)} tensors missing): a partial adapter file?")
    with torch.no_grad():
        for key, t in tensors.items():
            params[ours[key]].copy_(t)
        if isinstance(method, DynamicLoRA):  # m_l = α_l / α
            alpha = cfg.get("lora_alpha", method.cfg.alpha)
            for n, layer in adapter_layers(model).items():
                layer.lora_m.fill_(
                    cfg.get("alpha_pattern", {}).get(hf_name(model.cfg.family, n), alpha) / alpha)


def check_ranks(model, cfg, folder):
    """Dynamic LoRA: the file's ranks must be the ones calibration gave here."""
    for n, layer in adapter_layers(model).items():
        saved = cfg.get("rank_pattern", {}).get(hf_name(model.cfg.family, n), cfg.get("r"))
        if saved != layer.r:
            raise ValueError(f"{folder} has rank {saved} at {n}, but calibration here gave {layer.r}: "
                             f"pass the --rank, --beta, --r_max, --n_cal, --seed and data it was "
                             f"trained with")


def load_adalora(method, model, cfg, path):
    """Fill each layer's kept triplets from the file and zero the rest (P, λ, Q), so ΔW is the saved one."""
    if cfg.get("init_r") != method.cfg.init_r:
        raise ValueError(f"{path} was trained with --init_r {cfg.get('init_r')}; pass it")
    family, tensors, params = model.cfg.family, load_file(path), adapter_tensors(model)
    layers, pattern = adapter_layers(model, SVDLinear), cfg.get("rank_pattern") or {}
    keys = {peft_key(family, n, adalora=True): n for n in params}
    missing = sorted(k for k in keys if k not in tensors)
    if missing or len(tensors) != len(keys):
        raise ValueError(f"{path} does not match this model's adapters (e.g. "
                         f"{(missing or sorted(set(tensors) - set(keys)) or ['?'])[0]}): "
                         f"another --model or --targets?")
    with torch.no_grad():
        for key, n in keys.items():
            mod, _, leaf = n.rpartition(".")
            p, t = params[n], tensors[key]
            if mod not in layers:  # the task head
                p.copy_(t)
                continue
            rows = p.shape[1] if leaf == "lora_B" else p.shape[0]
            keep = torch.tensor(pattern.get(hf_name(family, mod) + ".lora_E", [True] * rows),
                                dtype=torch.bool, device=p.device)
            if int(keep.sum()) != t.shape[1 if leaf == "lora_B" else 0]:
                raise ValueError(f"{key} has {tuple(t.shape)}, which does not fit its rank_pattern")
            p.zero_()
            if leaf == "lora_B":
                p[:, keep] = t.to(p)
            else:
                p[keep] = t.to(p)


def load_trainable(method, model, folder):
    path = os.path.join(folder, "trainable.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} holds no {method.name} checkpoint (trainable.safetensors); was it "
                                f"trained with another --method?")
    saved = saved_method(path, None)
    if saved != method.name:
        raise ValueError(f"{path} was trained with --method {saved}; pass --method {saved} to load it")
    tensors, params = load_file(path), dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(f"{path} has tensors this model lacks (e.g. {missing[0]}): another model?")
    for n, t in tensors.items():
        if params[n].shape != t.shape:
            raise ValueError(f"{path}: {n} is {tuple(t.shape)} but this model's is {tuple(params[n].shape)}")
    model.load_state_dict(tensors, strict=False)
