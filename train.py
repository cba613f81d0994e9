"""Continued pretraining of a Mamba2 language model: the BioMamba recipe, mixed by tokens and packed.

    python -m minimamba.data prepare ...                       # first: token files, see README
    python train.py --scale 370m                               # the recipe on one GPU
    torchrun --nproc_per_node 4 train.py --scale 2.7b --fsdp   # several GPUs
    python train.py --scale tiny --init scratch --device cpu --data DIR --seq-len 64 --batch-size 4 \
        --tokens-per-step 512 --max-steps 20 --eval-every 10 --eval-windows 4 --ema 0   # half a minute on a CPU

Every knob is below, with the recipe's value as its default (they live in
`minimamba.training.TrainConfig`); the resolved configuration is printed at the start and stored in
OUT/train_config.json. The loop, the checkpoints and the estimates are in `minimamba/training.py`.
Exit status: 0 done, 1 diverged (NaN/inf loss), 2 bad setup, 128+N stopped by signal N (checkpoint written;
a second signal stops at once).
"""

import argparse
import math

from minimamba.training import HelpFormatter, TrainConfig, model_arguments, run_arguments, run_as_script, train

D = TrainConfig()  # the defaults
p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
model_arguments(p, D)  # --scale --backend --grad-ckpt
p.add_argument("--init", default=D.init,
               help="'pretrained' (state-spaces/mamba2-<scale> from the Hub), 'scratch' (random weights), "
               "or a checkpoint directory / Hub repo id")
# data
p.add_argument("--data", default=D.data, help="directory of DIR/<domain>/{train,heldout}.bin (python -m minimamba.data prepare)")
p.add_argument("--mix", default=D.mix, help="token share of each domain, NAME=SHARE,...")
p.add_argument("--seq-len", type=int, default=D.seq_len, help="tokens per training sequence")
p.add_argument("--batch-size", type=int, default=D.batch_size, help="sequences per micro-batch per process")
p.add_argument("--grad-accum", type=int, default=D.grad_accum,
               help="micro-batches per optimizer step (default: enough to reach --tokens-per-step; given both, "
                    "they must agree)")
p.add_argument("--tokens-per-step", type=int, default=D.tokens_per_step,
               help="target tokens per optimizer step over all processes (the recipe: 256 sequences of 1024)")
# optimization
p.add_argument("--lr", type=float, default=D.lr, help="peak learning rate (top layer)")
p.add_argument("--llrd", type=float, default=D.llrd, help="layer-wise LR decay: layer l of L gets lr*llrd^(L-1-l)")
p.add_argument("--schedule", choices=["wsd", "cosine", "constant"], default=D.schedule,
               help="LR schedule: warmup-stable-decay, warmup+cosine, or warmup+constant")
p.add_argument("--decay", type=float, default=D.decay, help="wsd: fraction of the steps in the final cosine decay")
p.add_argument("--max-steps", type=int, default=D.max_steps, help="optimizer steps")
p.add_argument("--tokens", type=float, default=D.tokens, help="total training tokens (overrides --max-steps), e.g. 1.5e9")
p.add_argument("--ema", type=float, default=D.ema, help="EMA decay of the weights used for eval and saving (0: off)")
p.add_argument("--seed", type=int, default=D.seed, help="seed of the data order (and of --init scratch)")
# evaluation, logging, checkpoints
p.add_argument("--eval-every", type=int, default=D.eval_every, help="held-out perplexity every N steps (0: only at the end)")
p.add_argument("--eval-domains", default=D.eval_domains,
               help="comma-separated domains to evaluate on (default: those of --mix)")
p.add_argument("--eval-windows", type=int, default=D.eval_windows, help="held-out windows of --seq-len tokens per domain")
p.add_argument("--eval-batch-size", type=int, default=D.eval_batch_size, help="sequences per eval batch (default: --batch-size)")
p.add_argument("--keep", type=int, default=D.keep, help="step checkpoints to keep")
p.add_argument("--out", default=D.out, help="output directory: OUT/step-N/ checkpoints, log.jsonl, training.png")
run_arguments(p, D)  # --weight-decay --beta1 --beta2 --grad-clip --warmup --min-lr-ratio
#   --eval-at-start --save-every --resume --device --dtype --fsdp --progress
args = p.parse_args()
if args.tokens is not None and math.isfinite(args.tokens):  # (nan/inf: refused by the checks in train())
    args.tokens = int(args.tokens)

run_as_script(lambda: train(TrainConfig(**vars(args))), out=args.out)
