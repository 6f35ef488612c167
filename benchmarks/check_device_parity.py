"""Does a checkpoint compute the same on the CPU and on another device (a GPU)? Run it on a GPU machine.

The test suite runs on CPUs (CI has no GPU); this is the check to run once where there is one. With the
same weights on both devices it compares, in float32:
  A. uncached logits of a batch of held-out prompts (max |difference|, argmax agreement);
  B. greedy engine generations (cached, absorbed MLA decode): how many are token-for-token identical;
  C. on the device, its cached greedy tokens against its own uncached argmax (teacher forced);
  D. held-out pass@1 at the R1 evaluation settings, as `nanoseek eval` computes it;
  E. gradients of a cross-entropy loss (worst relative error per parameter) and the parameters after one
     fused AdamW step.

    python benchmarks/check_device_parity.py runs/r1/cold_start/model            # --device cuda --n 50
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from nanoseek import LLM, SamplingParams, from_pretrained
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.rl import EvalConfig, evaluate
from nanoseek.rl.data import prompt_ids, task_examples


def greedy(model, tok, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    llm = LLM(model, tokenizer=tok, max_num_seqs=64, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outs]


def grads_and_step(model, ids: torch.Tensor) -> tuple[dict, dict]:
    """Gradients of next-token cross entropy on `ids`, then the parameters after one fused AdamW step."""
    model.train()
    logits = model(ids)
    F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True).step()
    return grads, {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="checkpoint folder (with tokenizer.json)")
    p.add_argument("--device", default="cuda", help="the device compared with the CPU (default: cuda)")
    p.add_argument("--n", type=int, default=50, help="held-out problems per task for D (default: 50)")
    args = p.parse_args()
    dev = args.device
    tok = Tokenizer.load(args.model)
    problems = task_examples(["arithmetic", "linear"], "test", args.n, 1, 0)
    prompts = [prompt_ids(q, tok, "chat") for q in problems]
    models = {d: from_pretrained(args.model, device=d).eval() for d in ("cpu", dev)}

    L = min(len(r) for r in prompts[:8])
    ids = torch.tensor([r[:L] for r in prompts[:8]])
    with torch.no_grad():
        lc, ld = models["cpu"](ids), models[dev](ids.to(dev)).cpu()
    print(f"A uncached logits: max |diff| {(lc - ld).abs().max():.2e}, "
          f"argmax agreement {(lc.argmax(-1) == ld.argmax(-1)).float().mean():.4f}")

    outs = {d: greedy(m, tok, prompts[:32], 200) for d, m in models.items()}
    same = sum(a == b for a, b in zip(outs["cpu"], outs[dev]))
    print(f"B greedy engine generations: {same}/{len(outs['cpu'])} identical")

    differ = 0
    for prompt, completion in list(zip(prompts, outs[dev]))[:8]:
        with torch.no_grad():
            logits = models[dev](torch.tensor([prompt + completion], device=dev))[0]
        differ += logits[len(prompt) - 1:-1].argmax(-1).cpu().tolist() != completion
    print(f"C {dev} cached greedy vs its uncached argmax: {differ}/8 rows differ")

    for d, m in models.items():
        t = time.time()
        r = evaluate(m, tok, problems, EvalConfig())
        print(f"D pass@1 on {d}: " + ", ".join(f"{task} {v['pass@1']:.3f}" for task, v in r["tasks"].items())
              + f" ({time.time() - t:.0f} s)")

    ids = torch.tensor([r[:L] for r in prompts[:16]])
    (gc, pc), (gd, pd) = (grads_and_step(from_pretrained(args.model, device=d), ids.to(d)) for d in ("cpu", dev))
    rel = sorted(((float((g - gd[n]).norm() / (g.norm() + 1e-12)), n) for n, g in gc.items()), reverse=True)
    print(f"E gradients: worst relative error {rel[0][0]:.1e} ({rel[0][1]}); same parameters with a gradient: "
          f"{set(gc) == set(gd)}; after one fused AdamW step max |param diff| "
          f"{max(float((pc[n] - pd[n]).abs().max()) for n in pc):.1e}")


if __name__ == "__main__":
    main()
