#!/usr/bin/env python
"""One training step of TRL DPO vs T-REG vs RRPO on a tiny Llama with a 32k vocabulary (issue 16 item 2).

Contenders (same model init, same batch of B pairs, LoRA on the attention/MLP projections, frozen LM head):

- ``dpo``: TRL 1.16 ``DPOTrainer`` itself (sigmoid loss, fused LM head, adapter-off reference);
- ``treg``: genalign's :class:`PreferenceTrainer` with T-REG (TRL's fused head for policy and reference);
- ``rrpo``: genalign's RRPO, one chunked pass per chunk (``token_stats_chunked``): policy and reference logits
  once per completion position, p·W once, q·W once per chosen position, no LM-head matmul in backward;
- ``rrpo_two_pass``: the computation before issue 16 (checkpointed log-prob chunks + a separate checkpointed KL
  pass that recomputes both projections in backward), kept here to show the change in the same run.

Measured:

- **LM-head FLOPs** with ``torch.profiler`` (``with_flops=True, record_shapes=True``): the FLOPs of every
  ``aten::mm`` / ``aten::addmm`` / ``aten::bmm`` event that has the vocabulary size V in an input shape, over one
  forward + backward. The backward is counted as the matmul events the autograd engine runs (each recorded like a
  forward op: 2·M·N·K), so recomputation inside checkpointed chunks and gradient matmuls are included; element-wise
  softmax work is not counted (the profiler gives FLOPs for matmuls/convolutions only).
- **time**: contenders interleaved in a shuffled order for ``--rounds`` rounds, process CPU time and wall time of
  one step; the median of per-round ratios to ``dpo`` is reported.
- **memory rise**: VmHWM after the step minus VmRSS before it (peak RSS reset through ``/proc/self/clear_refs``),
  MiB, one measurement per contender after warm-up (Linux only; otherwise not reported).

Usage: OMP_NUM_THREADS=1 python benchmarks/lm_step.py [--rounds 10] [--pairs 4] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402


def rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs with ~30-token completions that differ in one number."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        c = a + b
        wrong = c + rng.choice([-10, -1, 1, 10])
        out.append({"prompt": f"{a}+{b}=", "chosen": f"the answer is {c}, since {a} plus {b} is {c}.",
                    "rejected": f"the answer is {wrong}, since {a} plus {b} is {wrong}."})
    return out


def build(name: str, vocab: int, n_pairs: int, out_dir: str):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    from genalign.objectives.rrpo import RRPO
    from genalign.objectives.treg import TREG, compute_token_rewards
    from genalign.pipelines.language import build_char_tokenizer, lora_config
    from genalign.pipelines.lm_head import lm_head_params, token_kl_chunked, token_logps_chunked
    from genalign.training.lm import PreferenceTrainer

    class RRPOTwoPass(RRPO):
        """RRPO with the pre-issue-16 LM-head computation (two checkpointed chunk loops)."""

        def lm_loss(self, fwd):
            T, cs = fwd.mask.size(1), self.config.kl_chunk_size
            ref_h = fwd.reference_forward(return_last_hidden_state=True).last_hidden_state[:, -(T + 1):-1]
            h = fwd.model(**fwd.model_kwargs, return_last_hidden_state=True).last_hidden_state[:, -(T + 1):-1]
            w, b = lm_head_params(fwd.t.accelerator.unwrap_model(fwd.t.model))
            tgt, B = fwd.inputs["input_ids"][..., 1:], h.size(0) // 2
            logps = token_logps_chunked(h, w, tgt, fwd.mask, cs, b)
            with torch.no_grad():
                ref = token_logps_chunked(ref_h, w, tgt, fwd.mask, cs, b)
            kl = token_kl_chunked(h[:B], ref_h[:B], w, fwd.mask[:B], cs, lm_head_bias=b)
            fwd.token_logps_and_kl = lambda _cs: (logps, ref, kl)
            return super().lm_loss(fwd)

    tok = build_char_tokenizer()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ds = Dataset.from_list(rows(n_pairs))
    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=n_pairs, max_steps=1, report_to="none",
                     save_strategy="no", use_cpu=True, bf16=False, max_length=128, logging_steps=1)
    lora = lora_config(r=8, alpha=16)
    if name == "dpo":
        tr = DPOTrainer(model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    else:
        obj = {"treg": TREG, "rrpo": RRPO, "rrpo_two_pass": RRPOTwoPass}[name].from_params(kl_chunk_size=1024) \
            if name != "treg" else TREG()
        if name == "treg":
            ds = compute_token_rewards(model, tok, ds, "good: {prompt}", "bad: {prompt}")
        tr = PreferenceTrainer(model, args=args, objective=obj, train_dataset=ds, processing_class=tok,
                               peft_config=lora)
    batch = next(iter(tr.get_train_dataloader()))
    tr.model.train()

    def step():
        loss = tr.compute_loss(tr.model, batch)
        loss.backward()
        tr.model.zero_grad(set_to_none=True)
        return loss.detach()

    return step, int(batch["completion_mask"].sum())


def lm_head_flops(step, vocab: int) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        step()
    total = 0
    for e in prof.events():
        if e.name in ("aten::mm", "aten::addmm", "aten::bmm") and e.flops and \
                any(vocab in (s or []) for s in e.input_shapes):
            total += e.flops
    return total


def _status(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def memory_rise(step) -> float | None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter
    except OSError:
        return None
    before = _status("VmRSS")
    step()
    peak = _status("VmHWM")
    return None if before is None or peak is None else peak - before


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--contenders", default="dpo,treg,rrpo,rrpo_two_pass")
    a = ap.parse_args()
    torch.set_num_threads(1)
    names = a.contenders.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        steps, positions = {}, {}
        for n in names:
            steps[n], positions[n] = build(n, a.vocab, a.pairs, os.path.join(tmp, n))
            steps[n]()  # warm-up
        flops = {n: lm_head_flops(steps[n], a.vocab) for n in names}
        mem = {n: memory_rise(steps[n]) for n in names}
        cpu = {n: [] for n in names}
        wall = {n: [] for n in names}
        rng = random.Random(0)
        for _ in range(a.rounds):
            order = names[:]
            rng.shuffle(order)
            for n in order:
                c0, w0 = time.process_time(), time.perf_counter()
                steps[n]()
                cpu[n].append(time.process_time() - c0)
                wall[n].append(time.perf_counter() - w0)
    base = "dpo" if "dpo" in names else names[0]
    print(f"tiny Llama (hidden 64, 2 layers, vocab {a.vocab}), {a.pairs} pairs, "
          f"{positions[base]} completion tokens per step, 1 torch thread, {a.rounds} interleaved rounds")
    hdr = (f"{'contender':<15} {'LM-head GFLOP':>13} {'x ' + base:>8} {'CPU s (med)':>12} {'x ' + base + ' CPU':>11} "
           f"{'wall s':>8} {'mem rise MiB':>13}")
    print(hdr)
    print("-" * len(hdr))
    for n in names:
        ratio = statistics.median(c / b for c, b in zip(cpu[n], cpu[base]))
        m = "n/a" if mem[n] is None else f"{mem[n]:.1f}"
        print(f"{n:<15} {flops[n] / 1e9:>13.4f} {flops[n] / flops[base]:>8.3f} {statistics.median(cpu[n]):>12.4f} "
              f"{ratio:>11.3f} {statistics.median(wall[n]):>8.4f} {m:>13}")
    print("LM-head FLOPs: profiler FLOPs of aten::mm/addmm/bmm events with the vocabulary in an input shape, "
          "forward + backward (backward = the matmuls autograd runs, incl. checkpoint recomputation).")


if __name__ == "__main__":
    main()
