"""Train the small MoE that fxpress ships (fxpress/data/tiny_moe/) on real text, on CPU, in minutes.

    python examples/train_moe.py            # the shipped weights: seed 0, 1000 steps x 32 x 128 tokens, 1 thread
    python examples/train_moe.py --steps 20 --out /tmp/tiny_moe   # a quick smoke run

Mixtral architecture (4 layers, hidden 128, 8 experts of width 256 per layer, top-2, about 4.4M
parameters), SmolLM2's tokenizer reduced to the 8191 most frequent tokens of the "train" split
(+ <unk>), trained on the "train" split (the Python library reference) of `fxpress.data`: 4.1M tokens,
about 2.6 epochs with a new shuffle each, AdamW, peak lr 4e-3, 50 warm-up steps, cosine to a tenth.
About 1.6 s a step on one free core (~26 min); 56 min on the shared 2-core machine it was trained on.
Eval perplexity of the shipped weights: 61.8 on the first 64 x 128 "eval" tokens, 44.5 on the whole
split (535 x 128; the previous 360-step weights: 160.6).
A small per-layer load-balancing loss keeps every expert alive while letting them specialise unevenly;
the script reports expert load per layer and how much the routing depends on the token.

    python examples/train_moe.py --arch qwen2_moe --steps 1100   # the second shipped MoE (fxpress/data/tiny_qwen2_moe/)

Qwen2-MoE (4 layers, hidden 128, 8 routed experts of width 256, top-2 without renormalising, plus a
sigmoid-gated shared expert of width 256: about 4.2M parameters) on King James prose
(`fxpress.moe_model.PROSE_TRAIN`: every book except Genesis, Luke and Acts, the "prose_eval",
"prose_calib" and "prose_heldout" splits, and what retells them), SmolLM2's tokenizer reduced to the
4095 most frequent tokens of that text (+ <unk>; 1.7% of the training tokens, 3% of Genesis'); 0.86M
tokens, 1100 steps x 32 x 128 = about 5.3 epochs. 1252 s (21 min) on one core of the shared machine. Eval
perplexity of the shipped weights (fp16 storage, fp32 compute): 33.1 on the first 64 x 128 "prose_eval"
tokens, 30.43 on the whole split (390 x 128).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fxpress.data import token_windows
from fxpress.moe_model import (
    TINY_MOE_DIR,
    TINY_QWEN2_MOE_DIR,
    RemappedTokenizer,
    build_vocab,
    load_tiny_moe,
    save_tiny_moe,
    smollm2_tokenizer,
    tiny_moe_config,
    tiny_qwen2_moe_config,
    train_stream,
)

# arch -> (transformers class, config builder, output folder, training text, eval split, vocabulary size)
ARCHS = {
    "mixtral": ("MixtralForCausalLM", tiny_moe_config, TINY_MOE_DIR, "train", "eval", 8192),
    "qwen2_moe": ("Qwen2MoeForCausalLM", tiny_qwen2_moe_config, TINY_QWEN2_MOE_DIR, "prose_train", "prose_eval", 4096),
}


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def layer_balance(out, config) -> torch.Tensor:
    """Mean over layers of each layer's own load-balancing loss.

    transformers' aux loss balances the experts of all layers pooled together, which lets single
    layers starve some experts; balancing each layer keeps every expert alive, still unevenly used.
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    k = config.num_experts_per_tok
    e = getattr(config, "num_local_experts", None) or config.num_experts
    return torch.stack([load_balancing_loss_func((g,), e, k) for g in out.router_logits]).mean()


@torch.no_grad()
def routing_report(model, windows: torch.Tensor) -> list[dict]:
    """Per layer: the share of top-k assignments each expert gets, and I(token; expert) / H(expert)."""
    out = model(input_ids=windows, output_router_logits=True)
    k = model.config.num_experts_per_tok
    ids = windows.flatten()
    rows = []
    for logits in out.router_logits:
        num_experts = logits.shape[-1]
        chosen = logits.topk(k, dim=-1).indices  # [tokens, k]
        load = torch.bincount(chosen.flatten(), minlength=num_experts).double()
        share = load / load.sum()
        # mutual information between the input token and the chosen expert, over frequent tokens
        tok = ids.repeat_interleave(k)
        exp = chosen.flatten()
        joint = torch.zeros(int(ids.max()) + 1, num_experts, dtype=torch.float64)
        joint.index_put_((tok, exp), torch.ones_like(tok, dtype=torch.float64), accumulate=True)
        joint = joint[joint.sum(1) >= 20]
        p = joint / joint.sum()
        pt, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
        mi = float((p[p > 0] * (p[p > 0] / (pt @ pe)[p > 0]).log()).sum())
        he = float(-(pe[pe > 0] * pe[pe > 0].log()).sum())
        rows.append({"share": share.tolist(), "cv": float(share.std() / share.mean()),
                     "max_over_min": float(share.max() / share.min()) if share.min() > 0 else math.inf,
                     "token_expert_mi": mi / he})
    return rows


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 16) -> float:
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        logits = model(input_ids=x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total, count = total + float(loss), count + x[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="mixtral")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=None, help="default: 8192 (mixtral), 4096 (qwen2_moe)")
    parser.add_argument("--out", type=Path, default=None, help="default: the arch's shipped folder")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is fastest on a shared machine)")
    parser.add_argument("--eval-every", type=int, default=250, help="print eval perplexity every N steps (0: never)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cls_name, make_config, folder, text, eval_split, vocab = ARCHS[args.arch]
    out_dir = args.out if args.out is not None else folder
    base = smollm2_tokenizer()
    kept = build_vocab(base, args.vocab or vocab, text)
    tokenizer = RemappedTokenizer(base, kept)
    ids = train_stream(tokenizer, text)
    train = ids[: ids.numel() // args.seq * args.seq].view(-1, args.seq)
    evalw = token_windows(tokenizer, eval_split, args.seq, max_windows=64)
    print(f"train windows {tuple(train.shape)}, <unk> share {float((train == 0).float().mean()):.3f}")

    import transformers

    config = make_config(len(tokenizer))
    config._experts_implementation = "grouped_mm"
    model = getattr(transformers, cls_name)(config)
    print(f"parameters {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    epochs = -(-args.steps * args.batch // len(train))
    order = torch.cat([torch.randperm(len(train), generator=gen) for _ in range(epochs)])  # a new shuffle per epoch
    start = time.time()
    model.train()
    bar = tqdm(range(args.steps), desc="train moe")
    for step in bar:
        idx = order[step * args.batch : (step + 1) * args.batch]
        x = train[idx]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=50)
        out = model(input_ids=x, labels=x, output_router_logits=True)
        loss = out.loss - config.router_aux_loss_coef * out.aux_loss + config.router_aux_loss_coef * layer_balance(out, config)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            model.eval()
            print(f"step {step + 1}: eval perplexity {perplexity(model, evalw[:16]):.2f}", flush=True)
            model.train()
    model.eval()
    print(f"trained {args.steps} steps x {args.batch * args.seq} tokens in {time.time() - start:.0f} s")

    save_tiny_moe(model, kept, out_dir)
    model, tokenizer = load_tiny_moe(out_dir)  # measure what ships (fp16 storage, fp32 compute)
    print(f"eval perplexity ({len(evalw)} x {args.seq} tokens): {perplexity(model, evalw):.2f}")
    whole = token_windows(tokenizer, eval_split, args.seq)
    print(f"eval perplexity, whole \"{eval_split}\" split ({len(whole)} x {args.seq} tokens): {perplexity(model, whole):.2f}")
    print("expert load per layer (share of top-2 assignments on eval text):")
    for layer, row in enumerate(routing_report(model, evalw)):
        shares = " ".join(f"{s:.3f}" for s in row["share"])
        print(f"  layer {layer}: [{shares}]  cv {row['cv']:.2f}  max/min {row['max_over_min']:.1f}  "
              f"I(token;expert)/H(expert) {row['token_expert_mi']:.2f}")


if __name__ == "__main__":
    main()
