"""Train a GPT-2-shaped model with RigL twice, computing dense and then sparse, and print each one's tokens/s.

    python examples/gpt2_sparse_compute.py                       # GPT-2-small-shaped, 6 layers: minutes on a CPU
    python examples/gpt2_sparse_compute.py --tiny                # a toy model, seconds
    python examples/gpt2_sparse_compute.py --steps 200 --delta 100 --density 0.05

The model is transformers' GPT2LMHeadModel built from a GPT2Config (n_embd 768, 6 layers, 12 heads, 256
positions, a vocabulary of 8192, no dropout: nothing is downloaded). The data are synthetic and learnable: a
fixed-seed table of vocab/16 random 8-token phrases, strung together at random, so within a phrase the next token is
predictable and the loss falls from ln(vocab).

Both runs start from the same weights, draw the same masks (the same seed before the scheduler) and see the same
batches; they differ only in `compute`:

    pruner = RigLScheduler(model, optimizer, dense_allocation=0.1, T_end=..., delta=...,
                           ignore_linear_layers=False, compute="sparse")

With compute="sparse" the sparse Conv1D projections (attention's c_attn/c_proj, the MLP's c_fc/c_proj) compute
forward and backward over their active weights only, and the dense weight gradient only in the step before each
topology update (RigL's growth scores need it); `pruner.summary()` says which layers compute sparsely. The first
c_attn stays dense (the uniform rule) and the lm_head, tied to the token embedding, stays dense. The training is
the same: the two runs end with the same masks (up to fp32 summation order, which can flip a near-tie).

tokens/s are over the timed steps (all but the first, a warm-up), the window steps (the dense weight gradient
for the growth scores, then the topology update) included at their real frequency (one in --delta), and also
split into the two kinds of step. As in rigl-torch, a window also opens before T_end when T_end is a multiple of
--delta, with no update after it (the update needs step < T_end), so there can be one window step more than
updates. This is a demonstration, one mode after the other on a machine that may be
busy; `python -m rigl_fast.bench.compute` measures the same comparison interleaved, with repeats.
"""
import argparse
import copy
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rigl_fast import RigLScheduler

PHRASE_LEN = 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="training steps per mode (the first is a warm-up)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (also n_positions)")
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--density", type=float, default=0.1, help="dense_allocation of the sparse layers")
    p.add_argument("--delta", type=int, default=20, help="steps between topology updates")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate. Default: 1e-3, 1e-2 with --tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a toy model and a few steps: seconds (overrides the sizes)")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch, args.seq, args.n_embd, args.n_layer, args.n_head, args.vocab, args.delta = \
            12, 4, 32, 64, 2, 4, 256, 3
    if args.lr is None:
        args.lr = 1e-2 if args.tiny else 1e-3
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head}")
    if args.steps < 2:
        p.error("--steps must be >= 2: the first step is a warm-up, not timed")
    return args


def make_model(args):
    v = args.vocab
    cfg = GPT2Config(n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head, n_positions=args.seq,
                     vocab_size=v, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=v - 1,
                     eos_token_id=v - 1)
    return GPT2LMHeadModel(cfg).train()


def batch_at(step, phrases, args):
    """The batch of `step`: random phrases strung together, the same in both runs (seeded by the step)."""
    g = torch.Generator().manual_seed(args.seed * 100_003 + step)
    per_row = -(-args.seq // PHRASE_LEN)
    picks = torch.randint(len(phrases), (args.batch, per_row), generator=g)
    return phrases[picks].reshape(args.batch, -1)[:, :args.seq]


def train(mode, base, phrases, args):
    """One run: returns what main() prints and the final masks."""
    model = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    torch.manual_seed(args.seed + 1)  # the masks: the same draw in both runs
    pruner = RigLScheduler(model, optimizer, dense_allocation=args.density, T_end=int(0.75 * args.steps),
                           delta=args.delta, ignore_linear_layers=False, compute=mode)
    tokens = args.batch * args.seq
    times = {"plain": [], "window": []}
    losses = []
    for step in range(args.steps):
        ids = batch_at(step, phrases, args)
        window = pruner.check_if_backward_hook_should_accumulate_grad()  # the dense-gradient step before an update
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if pruner():  # False at a topology update: that step's optimizer step is skipped
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t
        if step > 0:  # step 0 is the warm-up
            times["window" if window else "plain"].append(elapsed)
        losses.append(loss.item())
    out = dict(mode=mode, summary=pruner.summary(), updates=pruner.stats()["updates"], first=losses[0],
               last=losses[-1],
               tok_s=tokens * (args.steps - 1) / sum(times["plain"] + times["window"]),
               plain=tokens * len(times["plain"]) / sum(times["plain"]) if times["plain"] else None,
               window=tokens * len(times["window"]) / sum(times["window"]) if times["window"] else None,
               n_window=len(times["window"]))
    masks = [None if m is None else m.clone() for m in pruner.backward_masks]
    pruner.remove()
    return out, masks


def mask_agreement(a, b):
    """(active weights in both runs / active weights, positions that differ) over the sparse layers."""
    both = active = differ = 0
    for m, n in zip(a, b):
        if m is not None:
            both += int((m & n).sum())
            active += int(m.sum())
            differ += int((m != n).sum())
    return both / max(active, 1), differ


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    base = make_model(args)
    # vocab / 16 phrases of 8 tokens: about one token in two appears in a phrase, most of them once
    phrases = torch.randint(args.vocab, (max(2, args.vocab // 16), PHRASE_LEN),
                            generator=torch.Generator().manual_seed(args.seed))
    n_params = sum(p.numel() for p in base.parameters())
    print(f"GPT-2: n_embd {args.n_embd}, {args.n_layer} layers, {args.n_head} heads, vocab {args.vocab}, "
          f"{n_params / 1e6:.1f}M parameters; batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens "
          f"a step; {args.steps} steps per mode, density {args.density:g}, delta {args.delta}, AdamW lr {args.lr:g}; "
          f"{torch.get_num_threads()} thread(s)")
    results, masks = {}, {}
    for mode in ("dense", "sparse"):
        results[mode], masks[mode] = train(mode, base, phrases, args)
        r = results[mode]
        if mode == "sparse":
            print("\npruner.summary() under compute='sparse':\n" + r["summary"] + "\n")
        split = (f"plain steps {r['plain']:.0f} tokens/s" if r["plain"] else "no plain step") + (
            f", {r['n_window']} window step(s) (dense weight gradient) {r['window']:.0f} tokens/s"
            if r["window"] else "")
        print(f"{mode:>6} compute: {r['tok_s']:.0f} tokens/s over {args.steps - 1} timed steps ({split}); "
              f"loss {r['first']:.3f} -> {r['last']:.3f}; topology updates {r['updates']}")
    agree, differ = mask_agreement(masks["dense"], masks["sparse"])
    print(f"final masks: {agree:.4f} of the active weights agree between the two runs ({differ} positions differ)")
    print(f"sparse/dense tokens per second: {results['sparse']['tok_s'] / results['dense']['tok_s']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
