#!/usr/bin/env bash
# The per-matrix learning-rate experiments on this CPU, then RESULTS.md from every run folder under results/.
#
#   bash experiments.sh MINILM_DIR [GLUE_DIR]       # 1.5 h on 2 cores; finished runs are skipped on a re-run
#   python report.py --out RESULTS.md               # the report alone, from the metrics.json already in results/
#
# The per-matrix-rate paper reports QQP, which our data folder lacks, so its comparison runs on MRPC (the other
# GLUE paraphrase task) and SST-2 (a larger train set, subsampled here). A reduced protocol: 1 epoch; SST-2 uses
# the first 5000 train sentences. LoRA r 8, α 16, dropout 0.1 on every block linear; A at α, B at λ·α; the head at
# 4e-4; wd 0.1, batch 16, warmup 0.06. --select holdout keeps 10% of train (seed 0) apart: the grid's winner is
# chosen on it, and GLUE dev (the reported split) plays no part in any choice.
set -euo pipefail
cd "$(dirname "$0")"
M=${1:?usage: bash experiments.sh MINILM_DIR [GLUE_DIR]}
G=${2:-../shared/data/glue}
JOBS=${JOBS:-2}                 # runs at a time, one thread each
export OMP_NUM_THREADS=1
COMMON="--method lora --model $M --data_dir $G --rank 8 --alpha 16 --dropout 0.1 --head_lr 4e-4"
COMMON+=" --weight_decay 0.1 --batch_size 16 --warmup_ratio 0.06 --epochs 1 --select holdout --log_every 10"
declare -A TASK=([mrpc]="--task mrpc" [sst2]="--task sst2 --max_train_samples 5000")

run_all() {  # lines of "OUT_DIR FLAGS...": run each whose metrics.json is missing, JOBS at a time
    grep -v '^$' | while read -r out flags; do
        [ -f "$out/metrics.json" ] || echo "$out $flags"
    done | xargs -P "$JOBS" -L 1 bash -c 'out=$0; python train.py '"$COMMON"' $@ --overwrite --out_dir $out \
        > $out.log 2>&1 && echo "done $out" || { echo "FAILED $out (see $out.log)"; exit 255; }'
}

for t in mrpc sst2; do
    mkdir -p results/seed000/$t
    # 1. the α × λ grid, seed 0: A at α, B at λ·α (the form of LoRA+, arXiv 2402.12354)
    for a in 5e-5 1e-4 2e-4 4e-4; do for l in 1 2 4 8 16; do
        echo "results/seed000/$t/grid-a$a-l$l ${TASK[$t]} --lr $a --lr_ratio $l --seed 0"
    done; done | run_all
    # 2. the 2 × 2 ablation at the grid's (α*, λ*) and tied η* (chosen on the held-out slice), seeds 0, 1, 2;
    #    seed 0 of "ours" and "tied" are grid runs already (report.py finds a row's runs by their flags)
    read -r a l e < <(python report.py --grid_best results/seed000/$t)
    for s in 0 1 2; do
        [ $s = 0 ] || echo "results/seed000/$t/ours-s$s ${TASK[$t]} --lr $a --lr_ratio $l --seed $s"
        [ $s = 0 ] || echo "results/seed000/$t/tied-s$s ${TASK[$t]} --lr $e --lr_ratio 1 --seed $s"
        echo "results/seed000/$t/qv-s$s ${TASK[$t]} --lr $a --lr_ratio $l --targets query,value --seed $s"
        echo "results/seed000/$t/qv_tied-s$s ${TASK[$t]} --lr $e --lr_ratio 1 --targets query,value --seed $s"
    done | run_all
done

# 3. the report
python report.py --out RESULTS.md
