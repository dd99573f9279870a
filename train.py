"""
Fine-tune a pretrained transformer on a GLUE task (or a GPT-2 on alpaca/gsm8k) with one PEFT method and report
the task's metrics.

    python train.py --method lora --task mrpc                                   # roberta-base from the hub
    python train.py --method lora --task mrpc --model DIR --data_dir ../shared/data/glue   # offline
    python train.py --method lora --task gsm8k --model gpt2 --data_dir ../shared/data/gsm8k  # generation
    python train.py --help                                                      # every flag
    torchrun --standalone --nproc_per_node 2 train.py ...                      # data parallel

The run itself (flags -> the method's config, model, step, evaluation, epoch loop, files) is finetune.py,
which bench.py shares; this script only turns a bad input into one line: "error: ..." and a non-zero exit.
"""
import os
import sys

import finetune


def main(argv=None):
    try:
        return finetune.run(finetune.parse_args(argv))
    except (ValueError, OSError, FloatingPointError) as e:  # bad flags, files, data, or a diverged loss
        # under torchrun every rank meets the same error: rank 0 says it once (torchrun then adds its summary)
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one saves a checkpoint, given --out_dir)
        sys.exit("error: interrupted again: stopped at once, without saving")


if __name__ == "__main__":
    main()
