"""
Benchmarks against the references nanoPEFT is checked against (transformers + peft). Reference libraries are
imported here and in test_all.py only, never by the product.

    python bench.py peft_glue --task mrpc --model DIR --data_dir ../shared/data/glue --seed 0 --out_dir out/peft0
        the same training run as `train.py --method lora`, but on transformers + peft: same data, batches, seeds,
        optimizer groups (A at lr, B at lr x lr_ratio, head at head_lr), schedule and evaluation (train.py's loop)
"""
import sys

import torch
import torch.nn as nn

import lora
import train
from model import hf_name


class HFClassifier(nn.Module):
    """A transformers+peft model behind our model's call signature: (ids, mask, types) -> logits."""

    def __init__(self, peft_model, family, cfg):
        super().__init__()
        self.peft_model, self.family, self.cfg = peft_model, family, cfg

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        kw = {"token_type_ids": token_type_ids} if self.family == "bert" else {}
        return self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits


class PeftLoRA(lora.LoRA):
    """LoRA through peft on transformers' model, started from exactly our initial adapter and head values."""
    name = "peft_lora"

    def wrap(self, model):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification
        ours = super().wrap(model)  # ours, only to draw the initial values and the target list
        cfg = self.peft_config(ours)
        hf = AutoModelForSequenceClassification.from_pretrained(train.resolve(self.args.model),
                                                                num_labels=model.cfg.num_labels)
        if model.cfg.family == "gpt2":
            hf.config.pad_token_id = model.cfg.pad_id
        peft_model = get_peft_model(hf, LoraConfig(task_type="SEQ_CLS", r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                                    lora_dropout=cfg["lora_dropout"], target_modules=cfg["target_modules"],
                                    modules_to_save=cfg["modules_to_save"], fan_in_fan_out=cfg["fan_in_fan_out"],
                                    use_rslora=cfg["use_rslora"]))
        theirs = dict(peft_model.named_parameters())
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if not p.requires_grad:
                    continue
                mod, _, leaf = n.rpartition(".")
                if leaf.startswith("lora_"):
                    key = f"base_model.model.{hf_name(model.cfg.family, mod)}.{leaf}.default.weight"
                else:  # the head, as peft's trainable copy (modules_to_save)
                    top, _, rest = hf_name(model.cfg.family, n).partition(".")
                    key = f"base_model.model.{top}.modules_to_save.default.{rest}"
                    if key not in theirs:  # BERT's pooler: bert.pooler.dense.weight
                        head, _, leaf2 = hf_name(model.cfg.family, n).rpartition(".")
                        mod2, _, last = head.rpartition(".")
                        key = f"base_model.model.{mod2}.modules_to_save.default.{last}.{leaf2}"
                theirs[key].copy_(p)
        return HFClassifier(peft_model, model.cfg.family, model.cfg)

    def param_groups(self, model):
        a, named = self.args, [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        head = [(n, p) for n, p in named if ".lora_" not in n]
        head_lr = a.head_lr if a.head_lr is not None else 4e-4
        groups = [{"params": [p for n, p in named if ".lora_A." in n], "lr": self.lr, "weight_decay": a.weight_decay},
                  {"params": [p for n, p in named if ".lora_B." in n], "lr": self.lr * a.lr_ratio,
                   "weight_decay": a.weight_decay},
                  {"params": [p for n, p in head if p.ndim >= 2], "lr": head_lr, "weight_decay": a.weight_decay},
                  {"params": [p for n, p in head if p.ndim < 2], "lr": head_lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def save(self, model, folder):
        model.peft_model.save_pretrained(folder)


def peft_glue(argv):
    train.METHODS["peft_lora"] = PeftLoRA
    args = train.parse_args(argv + ["--method", "peft_lora"])
    return train.main(args)


if __name__ == "__main__":
    modes = {"peft_glue": peft_glue}
    if len(sys.argv) < 2 or sys.argv[1] not in modes:
        sys.exit(f"usage: python bench.py {{{'|'.join(modes)}}} [train.py flags]")
    modes[sys.argv[1]](sys.argv[2:])
