#!/usr/bin/env bash
# ADAQ-LoRA's four rows on SmolLM2-135M-Instruct, GSM8K (a reduced protocol: results/notes/smollm2_gsm8k.md),
# then the same rows' memory at Llama 1B and 6B shapes, and SmolLM2's step time and decoding speed against
# transformers + peft. One run at a time: two at once double each step's time. About 2.5 h on 2 cores.
#
#   bash experiments_llm.sh SMOLLM2_DIR [GSM8K_DIR]    # SMOLLM2_DIR: an HF folder (../shared/get_smollm2.sh)
set -euo pipefail
M=$(realpath "${1:?usage: bash experiments_llm.sh SMOLLM2_DIR [GSM8K_DIR]}")
D=$(realpath "${2:-$(dirname "$0")/../shared/data/gsm8k}")
cd "$(dirname "$0")"
R=results/seed003
G="--task gsm8k --model $M --data_dir $D --max_train_samples 400 --eval_samples 200 --subset_seed 0
   --epochs 1 --batch_size 1 --lr 3e-4 --lr_schedule constant --grad_clip 0.1 --weight_decay 0
   --max_new_tokens 256 --eval_batch_size 100 --log_every 20 --seed 0"

row() {  # NAME FLAGS...: one row into runs/smollm2/NAME; its metrics.json is kept under results/
    local name=$1; shift
    [ -f $R/smollm2_gsm8k/$name/metrics.json ] && return
    python train.py $G "$@" --overwrite --out_dir runs/smollm2/$name > runs/smollm2_$name.log 2>&1
    mkdir -p $R/smollm2_gsm8k/$name && cp runs/smollm2/$name/metrics.json $R/smollm2_gsm8k/$name/
}
mkdir -p runs
row zero_shot --method full --epochs 0
row lora-s0 --method lora --rank 64 --alpha 16 --dropout 0.1
row qlora-s0 --method lora --quant nf4 --rank 64 --alpha 16 --dropout 0.1
row adaq_lora-s0 --method adaq_lora --tinit 50 --tfinal 150 --delta_t 10

python bench.py memory --model llama-135m --full_depth --out $R/llama_memory_135m.json
python bench.py memory --model llama-1b --out $R/llama_memory_1b.json
python bench.py memory --model llama-6b --out $R/llama_memory_6b.json
python bench.py speed --models "" --llm $M --rank 64 --llm_batch 2 --llm_seq 128 --warmup 2 --steps 3 --rounds 3 \
    --out $R/smollm2_speed.json
python bench.py generate --model $M --batch 8 --prompt 64 --new 64 --out $R/smollm2_generate.json
python report.py --out RESULTS.md
