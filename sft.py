"""Supervised fine-tuning of a Mamba2 language model: the BioMamba recipe's second step.

    python sft.py --init runs/cpt/step-006000 --tasks pubmedqa,bioasq --mix pubmedqa=0.35,bioasq=0.65
    python sft.py --scale 370m --tasks note_completion,note_summary --out runs/sft-clinical
    python sft.py --init runs/cpt/step-006000 --tasks mimic_completion,mimic_discharge --limit 20000 --out runs/sft-mimic
    python sft.py --scale tiny --init scratch --device cpu --tasks pubmedqa --limit 64 --max-len 512 \
        --batch-size 4 --examples-per-step 8 --epochs 1 --eval-every 4      # ~30 s on a CPU

Every knob is below, with the recipe's value as its default (they live in
`minimamba.finetune.SFTConfig`); the resolved configuration is printed at the start and stored in
OUT/sft_config.json. The data, the loss mask and early stopping are in `minimamba/finetune.py`; the
loop, the checkpoints and --resume are train.py's (`minimamba/training.py`). The best weights by
validation loss are in OUT/best/ (from_pretrained and eval.py read it).
Exit status: 0 done (or stopped early), 1 diverged (NaN/inf loss), 2 bad setup, 128+N stopped by signal N
(checkpoint written; a second signal stops at once).
"""

import argparse
import os

from minimamba.finetune import SFTConfig, finetune
from minimamba.tokenizer import DEFAULT_TOKENIZER
from minimamba.training import HelpFormatter, model_arguments, run_arguments, run_as_script

D = SFTConfig()  # the defaults
p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
model_arguments(p, D)  # --scale --backend --grad-ckpt
p.add_argument("--init", default=D.init,
               help="'pretrained' (state-spaces/mamba2-<scale>), 'scratch' (random weights), or a checkpoint "
               "directory (a train.py OUT/step-N) / Hub repo id")
p.add_argument("--tokenizer", default=D.tokenizer, help="Hub repo id or tokenizer.json of the model's tokenizer "
               f"(default: the --init checkpoint's tokenizer.json, else {DEFAULT_TOKENIZER})")
# data
p.add_argument("--tasks", default=D.tasks, help="comma-separated tasks of minimamba.tasks: pubmedqa,bioasq (QA), "
               "note_completion,note_summary (clinical) or mimic_completion,mimic_discharge (MIMIC-IV-Note)")
p.add_argument("--mix", default=D.mix, help="each task's share of an epoch's pairs, NAME=SHARE,... (a small task is "
               "repeated, a large one subsampled) (default: every pair once per epoch)")
p.add_argument("--task-data", default=D.task_data, help="task data directory (default: $MINIMAMBA_TASK_DATA if set, "
               "else data/tasks in the current directory)")
p.add_argument("--limit", type=int, default=D.limit, help="at most this many items of each task (the first ones)")
p.add_argument("--sample", type=int, default=D.sample, help="this many items of each task drawn at random (the same "
               "ones on every run: those whose ids hash lowest); not with --limit")
p.add_argument("--val-fraction", type=float, default=D.val_fraction,
               help="share of each task's training pairs held out for the validation loss (the test split is never read)")
p.add_argument("--max-len", type=int, default=D.max_len,
               help="tokens per pair (prompt + response + EOS) at most; longer prompts lose tokens on the left "
               "(a QA prompt's instruction and question first)")
p.add_argument("--batch-size", type=int, default=D.batch_size, help="pairs per micro-batch per process")
p.add_argument("--grad-accum", type=int, default=D.grad_accum,
               help="micro-batches per optimizer step (default: enough to reach --examples-per-step; given both, "
                    "they must agree)")
p.add_argument("--examples-per-step", type=int, default=D.examples_per_step,
               help="the effective batch: pairs per optimizer step over all processes")
# optimization
p.add_argument("--lr", type=float, default=D.lr, help="peak learning rate")
p.add_argument("--llrd", type=float, default=D.llrd, help="layer-wise LR decay (1: one LR for all layers)")
p.add_argument("--schedule", choices=["wsd", "cosine", "constant"], default=D.schedule, help="LR schedule after warmup")
p.add_argument("--decay", type=float, default=D.decay, help="wsd: fraction of the steps in the final decay")
p.add_argument("--epochs", type=int, default=D.epochs, help="passes over the training pairs")
p.add_argument("--ema", type=float, default=D.ema, help="EMA decay of the weights evaluated and saved (0: off)")
p.add_argument("--seed", type=int, default=D.seed, help="seed of the data order and the validation split")
# evaluation, checkpoints
p.add_argument("--eval-every", type=int, default=D.eval_every, help="validation loss every N steps (0: only at the end)")
p.add_argument("--eval-batch-size", type=int, default=D.eval_batch_size, help="pairs per eval batch (default: --batch-size)")
p.add_argument("--patience", type=int, default=D.patience,
               help="stop after this many evaluations in a row without a lower validation loss (0: never)")
p.add_argument("--keep", type=int, default=D.keep, help="step checkpoints to keep (OUT/best is kept besides)")
p.add_argument("--out", default=D.out, help="output directory: OUT/best/, OUT/step-N/ checkpoints, log.jsonl, training.png")
run_arguments(p, D)  # --weight-decay --beta1 --beta2 --grad-clip --warmup --min-lr-ratio
#   --eval-at-start --save-every --resume --device --dtype --fsdp --progress
args = p.parse_args()

result = run_as_script(lambda: finetune(SFTConfig(**vars(args))), out=args.out)
if os.environ.get("RANK", "0") == "0":  # (under torchrun, process 0 alone says it)
    if result["best"]:
        print(f"best validation loss {result['best_loss']:.4f} at step {result['best_step']}: {result['best']}")
    elif result["best_step"] is not None:
        print(f"best validation loss {result['best_loss']:.4f} at step {result['best_step']}, whose weights no "
              "checkpoint kept (see the note at the start): no OUT/best")
    else:
        print("no finite validation loss during training, so no OUT/best")
