"""Causal language modelling with the HF Trainer and RigL: the Trainer as usual, plus one callback.

By default a tiny GPT-2 built from a config learns a small text byte by byte (vocabulary of 256 bytes, no
tokenizer, nothing downloaded): on CPU it runs in well under a minute. `--model NAME` starts from a pretrained
causal LM and its tokenizer instead (a local folder, or a hub name already in the local cache; `--download`
lets transformers fetch it). `--text FILE` trains on your own text.

    python examples/hf_causal_lm.py
    python examples/hf_causal_lm.py --max-steps 300 --save-steps 100 --output-dir runs/lm
    python examples/hf_causal_lm.py --max-steps 300 --output-dir runs/lm --resume runs/lm/checkpoint-100
    python examples/hf_causal_lm.py --model gpt2 --text my_corpus.txt --dense-allocation 0.2

RigL's part is the `RigLCallback(...)` line: it builds the scheduler on the Trainer's model and optimizer when
training begins (T_end = 75% of --max-steps unless --t-end), saves its state in every checkpoint folder and
restores it on resume, and logs `rigl/density`, `rigl/regrown_fraction`, `rigl/updates`, `rigl/skipped_updates`.
"""
import argparse
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from rigl_fast.integrations.hf import RigLCallback

TEXT = """\
Dynamic sparse training keeps a network sparse for the whole run. Every few hundred steps RigL drops the
weights of smallest magnitude in each layer and grows the same number of new connections where the dense
gradient is largest, so the count of active weights never changes while the topology keeps improving.
The grown weights start at zero, and the optimizer's state for them starts at zero too. Early in training
many connections move; the fraction that moves decays along a cosine and stops at T_end, after which the
sparse network is fine-tuned with a fixed mask. The result trains as fast as a static sparse network and
reaches the accuracy of a dense one at a fraction of the cost.
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="pretrained causal LM (local folder or cached hub name); "
                   "default: a tiny GPT-2 from a config, trained on bytes")
    p.add_argument("--download", action="store_true", help="let transformers download --model")
    p.add_argument("--text", default=None, help="a UTF-8 text file to train on (default: a built-in paragraph)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="the Trainer's gradient_accumulation_steps")
    p.add_argument("--max-steps", type=int, default=150, help="optimizer steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dense-allocation", type=float, default=0.1)
    p.add_argument("--distribution", default="erk", choices=["uniform", "erk", "er"])
    p.add_argument("--delta", type=int, default=20, help="optimizer steps between topology updates")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--t-end", type=int, default=None, help="default: 75%% of --max-steps")
    p.add_argument("--output-dir", default="hf_causal_lm_out")
    p.add_argument("--save-steps", type=int, default=50)
    p.add_argument("--logging-steps", type=int, default=25)
    p.add_argument("--resume", default=None, help="a checkpoint folder (or 'last') to resume from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is there")
    return p.parse_args(argv)


def load_model_and_ids(args, text):
    if args.model is None:
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=args.block_size,
                            bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config), list(text.encode("utf-8"))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    local = not args.download
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=local)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=local)
    return model, tokenizer(text)["input_ids"]


def blocks(ids, block_size):
    """Overlapping windows (stride block_size // 2), so a short text still gives a few dozen examples."""
    stride = max(1, block_size // 2)
    out = []
    for start in range(0, max(1, len(ids) - block_size + 1), stride):
        x = torch.tensor(ids[start:start + block_size], dtype=torch.long)
        if len(x) == block_size:
            out.append({"input_ids": x, "labels": x.clone()})
    if not out:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than --block-size {block_size}")
    return out


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    text = open(args.text, encoding="utf-8").read() if args.text else TEXT
    model, ids = load_model_and_ids(args, text)
    train_dataset = blocks(ids, args.block_size)

    rigl = RigLCallback(dense_allocation=args.dense_allocation, sparsity_distribution=args.distribution,  # RigL
                        delta=args.delta, alpha=args.alpha, T_end=args.t_end, ignore_linear_layers=False)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, warmup_steps=0,
        logging_steps=args.logging_steps, save_steps=args.save_steps, seed=args.seed, report_to=[],
        use_cpu=args.cpu or not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, callbacks=[rigl])
    resume = True if args.resume == "last" else args.resume
    result = trainer.train(resume_from_checkpoint=resume)

    print(rigl.pruner)  # the schedule's state and one line per layer with its density
    st = rigl.pruner.stats()
    print(f"done: {trainer.state.global_step} optimizer steps, {st['updates']} topology updates "
          f"({st['skipped_updates']} skipped), density {st['density']:.4f}, "
          f"mean training loss of this run {result.training_loss:.4f}"
          + (f", resumed from {rigl.resumed_from}" if rigl.resumed_from else ""))
    trainer.save_model(os.path.join(args.output_dir, "final"))


if __name__ == "__main__":
    main()
