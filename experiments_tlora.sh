#!/usr/bin/env bash
# TLoRA+'s tables (arXiv 2604.13368, Tables 3-6; CoLA and RTE as in its §4.4) on MiniLM, then RESULTS.md.
# One run at a time (two at once double each step's time); a finished run (its metrics.json) is skipped
# on a re-run.
#
#   bash experiments_tlora.sh MINILM_DIR [GLUE_DIR]
#
# A reduced protocol, the same for every cell of a task: 2 epochs (the paper: 30; RTE: 6, as its 2,490
# examples give 156 steps an epoch and earlier 1-epoch runs sat at chance), batch 16, warmup 0.1, wd 0.1,
# every block linear, the last epoch reported. Rows: LoRA (the paper's baseline: α 8, no dropout; A, B and
# the head at η), TLoRA+ "Ours" (T3: A, B, C trained, λ 4) and TLoRA (B and one scalar per module). η is
# chosen once, for every row, on the held-out 10% of train (--select holdout, r 8, seed 0): the η with the
# best mean held-out accuracy over the three rows. Dev plays no part.
set -euo pipefail
M=$(realpath "${1:?usage: bash experiments_tlora.sh MINILM_DIR [GLUE_DIR]}")
G=$(realpath "${2:-$(dirname "$0")/../shared/data/glue}")
cd "$(dirname "$0")"
D=results/seed002/rank
P="--model $M --data_dir $G --epochs 2 --batch_size 16 --warmup_ratio 0.1 --weight_decay 0.1 --log_every 10"
declare -A ROW=([lora]="--method lora --alpha 8 --dropout 0"
                [ours]="--method tlora_plus --tlora_train ABC --ratio 4"
                [tlora]="--method tlora")

done_at() {  # OUT_DIR LR: OUT_DIR holds a run that finished at this --lr
    [ -f "$1/metrics.json" ] && python -c "import json, sys
sys.exit(json.load(open(sys.argv[1]))['args']['lr'] != float(sys.argv[2]))" "$1/metrics.json" "$2"
}

swap() {  # OUT_DIR LR: a run finished at another η moves to other_eta/NAME-eLR (kept, out of the tables);
    # one kept there at LR moves back. Fails (1) when OUT_DIR still lacks a run at LR.
    local name lr old
    name=$(basename "$1") lr=$(python -c "import sys; print(f'{float(sys.argv[1]):g}')" "$2")
    if [ -f "$1/metrics.json" ] && ! done_at "$1" "$2"; then
        old=$(python -c "import json, sys
print(f\"{json.load(open(sys.argv[1]))['args']['lr']:g}\")" "$1/metrics.json")
        mkdir -p $D/other_eta
        mv "$1" "$D/other_eta/$name-e$old"
        if [ -f "$1.log" ]; then mv "$1.log" "$D/other_eta/$name-e$old.log"; fi
    fi
    if [ -f "$D/other_eta/$name-e$lr/metrics.json" ]; then
        mv "$D/other_eta/$name-e$lr" "$1"
        if [ -f "$D/other_eta/$name-e$lr.log" ]; then mv "$D/other_eta/$name-e$lr.log" "$1.log"; fi
    fi
    done_at "$1" "$2"
}

run() {  # OUT_DIR LR FLAGS...: train.py at --lr LR (and --head_lr LR), unless a run at LR is there already
    local out=$1 lr=$2; shift 2
    swap "$out" "$lr" && return
    mkdir -p "$(dirname "$out")"
    echo "$out"
    python train.py $P "$@" --lr "$lr" --head_lr "$lr" --overwrite --out_dir "$out" > "$out.log" 2>&1 ||
        { echo "FAILED $out (see $out.log)"; exit 1; }
}

# 1. η on the held-out slice: every row at r 8, seed 0; η is the best mean held-out accuracy over the rows.
# The grid grows by a step while its top comes out best (2e-3 and 5e-3 were added to LoRA's grid that way).
for e in 2e-4 5e-4 1e-3 2e-3 5e-3; do for row in lora ours tlora; do
    run $D/sel_$row-e$e $e --task mrpc ${ROW[$row]} --rank 8 --select holdout --seed 0
done; done
E=$(python report.py --eta_best $D)
# 2. MRPC: every row at r 8, 16, 32, 64; seeds 0, 1, 2 at r 8 and 32, seed 0 at r 16 and 64
for r in 8 32 16 64; do
    case $r in 8|32) seeds="0 1 2" ;; *) seeds=0 ;; esac
    for s in $seeds; do for row in lora ours tlora; do
        run $D/mrpc-$row-r$r-s$s $E --task mrpc ${ROW[$row]} --rank $r --seed $s
    done; done
done
# 3. LoRA on transformers + peft: the r 8 LoRA runs' flags, seeds 0, 1, 2
for s in 0 1 2; do
    out=$D/mrpc-peft-r8-s$s
    swap $out $E || python bench.py peft_glue $P --task mrpc ${ROW[lora]} --rank 8 --lr $E \
        --head_lr $E --seed $s --overwrite --out_dir $out > $out.log 2>&1 ||
        { echo "FAILED $out (see $out.log)"; exit 1; }
done
# 4. CoLA (2 epochs) and RTE (6 epochs: at 1 it sat at chance), every row at r 8, seeds 0, 1, 2
# A seed's three rows finish before the next seed starts, and CoLA (short) before RTE.
for task in cola rte; do for s in 0 1 2; do for row in lora ours tlora; do
    case $task in rte) ep="--epochs 6" ;; *) ep="" ;; esac
    run $D/$task-$row-r8-s$s $E --task $task $ep ${ROW[$row]} --rank 8 --seed $s
done; done; done

python report.py --out RESULTS.md
