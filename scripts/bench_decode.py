"""Decode throughput on the real model: jaxsample's on-device loop vs transformers.generate.

    .venv/bin/python scripts/bench_decode.py          # -> results/bench_decode_<platform>.json
    .venv/bin/python scripts/bench_decode.py --quick    # batch 1 only, no transformers
    # on a machine without the model file (the GPU runs): random weights of the same shape
    .venv/bin/python scripts/bench_decode.py --export-metadata meta.json      # here, once
    python3 scripts/bench_decode.py --random-weights meta.json --hf-random    # there

In one run it measures:
- this machine's limits: memory read bandwidth and float32 matmul FLOP/s (through XLA);
- jaxsample: tokens/s at batch 1, 8, 32 with 64 new tokens per row (temperature 0.8,
  top_p 0.9, top_k 50, repetition_penalty 1.1; end-of-sequence ignored so every row makes
  64 tokens), compile time apart, prefill apart, and the share of a step spent in the sampler;
- the same model file and settings through Hugging Face transformers' generate() on
  PyTorch CPU, in its own virtual environment (.venv-bench: torch==2.13.0, transformers,
  gguf), made by this script when missing; --no-hf skips it. With ``--hf-random`` it runs in
  this interpreter instead, on a randomly initialised transformers Llama of the same shape
  (for a machine whose own torch has a GPU and no model file).
``--random-weights META.json`` replaces the model file's weights by random ones of the same
shape (the tokenizer and configuration come from the file's metadata, exported with
``--export-metadata``): the speed of a step does not depend on the weights' values (the end of
sequence is ignored), only the sampler share is then measured on other logits.
Each decode figure is also given as a fraction of its roofline: batch 1 is bound by reading
every weight once per step (bandwidth / weight bytes), large batches by matmul FLOP/s
(FLOP/s / (2 * parameters) tokens per second).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1)
PROMPT = "Write a short story about a robot learning to paint."


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_limits() -> dict:
    """Memory read bandwidth (GB/s) and float32 matmul FLOP/s, both through XLA."""
    n = 64 * 1024 * 1024  # 256 MiB of float32: far beyond the caches
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(lambda a: jnp.sum(a))
    total(x).block_until_ready()
    t = _median_time(lambda: total(x), 7)
    bandwidth = n * 4 / t
    m = 2048
    a = jnp.ones((m, m), jnp.float32)
    mm = jax.jit(lambda p, q: p @ q)
    mm(a, a).block_until_ready()
    t = _median_time(lambda: mm(a, a), 7)
    flops = 2 * m**3 / t
    return {"read_bandwidth_GBps": bandwidth / 1e9, "matmul_f32_GFLOPs": flops / 1e9}


def load_engine(random_weights: str | None):
    """The default model, or random weights of its shape from exported metadata."""
    from jaxsample.api import Engine

    if random_weights is None:
        return Engine.load()
    import types

    from flax import nnx

    from jaxsample.model import Llama, LlamaConfig, Tokenizer

    with open(random_weights) as f:
        meta = json.load(f)
    cfg = LlamaConfig.from_gguf_metadata(meta, tie_embeddings=True)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    model.embed[...] = model.embed[...] * 0.05  # logits of a realistic spread
    tok = Tokenizer.from_gguf(types.SimpleNamespace(metadata=meta))
    return Engine(model, tok, model_name="random-weights")


def export_metadata(path: str) -> None:
    from jaxsample.model import default_model_path, read_gguf

    meta = read_gguf(default_model_path()).metadata
    keep = {k: v for k, v in meta.items() if k.startswith(("llama.", "tokenizer.", "general."))}
    with open(path, "w") as f:
        json.dump(keep, f)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")


def sampler_in_loop(rows, hist, allowed, logits, n: int = 16):
    """Seconds per call of the sampler inside a jitted fori_loop (as in the decode loop,
    where XLA reuses its buffers), and of one standalone call (fresh buffers each time)."""
    from jaxsample.sampler import sample_rows

    @jax.jit
    def loop(logits, rows, hist, allowed):
        def body(i, acc):  # the logits change each step so nothing is hoisted out
            x = logits + i.astype(jnp.float32) * 1e-30
            return acc + sample_rows(x, rows, hist, allowed, i).token

        return jax.lax.fori_loop(0, n, body, jnp.zeros(logits.shape[0], jnp.int32))

    samp = jax.jit(sample_rows)
    loop(logits, rows, hist, allowed).block_until_ready()
    samp(logits, rows, hist, allowed, 0).token.block_until_ready()
    in_loop = _median_time(lambda: loop(logits, rows, hist, allowed), 7) / n
    alone = _median_time(lambda: samp(logits, rows, hist, allowed, 0).token, 20)
    return in_loop, alone


def bench_jaxsample(engine, batches, new_tokens: int, repeats: int) -> dict:
    from jaxsample import SamplingParams, pack_rows
    from jaxsample.decode import decode
    from jaxsample.sampler import History

    model = engine.model
    cfg = model.config
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx_state(model)))
    prompt = engine.encode_input([{"role": "user", "content": PROMPT}])
    out = {"parameters": n_params, "prompt_tokens": len(prompt), "batches": {}}
    cache = model.init_cache(1, len(prompt))
    prompt_logits, _ = model.prefill(
        jnp.asarray([prompt], jnp.int32), jnp.asarray([len(prompt)], jnp.int32), cache
    )
    for b in batches:
        plist = [SamplingParams(seed=i, **SETTINGS) for i in range(b)]
        rows = pack_rows(plist, vocab_size=cfg.vocab_size, seeds=list(range(b)))
        constraints = engine.constraints(plist)

        def run(n=new_tokens, rows=rows, constraints=constraints, b=b):
            return decode(model, [prompt] * b, rows, [n] * b, constraints, eos_id=-1)

        t0 = time.perf_counter()
        first = run()
        compile_s = time.perf_counter() - t0
        assert int(first.n_tokens.min()) == new_tokens
        total = _median_time(run, repeats)
        # prefill alone: the same program with one new token
        run(1)
        t1 = _median_time(lambda: run(1), repeats)
        step = (total - t1) / (new_tokens - 1)
        # the sampler alone on this batch's shapes
        rows_d = jax.tree.map(jnp.asarray, rows)
        logits = jnp.tile(prompt_logits, (b, 1))  # the model's real next-token logits
        hist = History(
            counts=jnp.zeros((b, cfg.vocab_size), jnp.int32),
            in_prompt=jnp.zeros((b, cfg.vocab_size), jnp.bool_),
        )
        allowed = jnp.ones((b, cfg.vocab_size), jnp.bool_)
        t_s, t_alone = sampler_in_loop(rows_d, hist, allowed, logits)
        out["batches"][str(b)] = {
            "compile_s": compile_s,
            "seconds": total,
            "tokens_per_s": b * new_tokens / total,
            "decode_tokens_per_s": b / step,
            "prefill_s": t1,
            "step_ms": step * 1e3,
            "sampler_ms": t_s * 1e3,
            "sampler_standalone_ms": t_alone * 1e3,
            "sampler_share": t_s / step,
        }
        print(
            f"# jaxsample batch {b}: {b * new_tokens / total:.1f} tok/s "
            f"(compile {compile_s:.1f} s, step {step * 1e3:.1f} ms, sampler {t_s * 1e3:.2f} ms)",
            file=sys.stderr,
            flush=True,
        )
    return out


def bench_constraints_in_loop(engine, batch: int, new_tokens: int, rounds: int) -> dict:
    """Per-step decode time of the same batch: plain rows, JSON-mode rows, rows with 4 stop
    strings each (stop strings that never occur, so every row runs the whole budget)."""
    from jaxsample import SamplingParams, pack_rows
    from jaxsample.decode import decode

    cfg = engine.model.config
    prompt = engine.encode_input([{"role": "user", "content": PROMPT}])
    variants = {
        "plain": {},
        "json_object": {"response_format": {"type": "json_object"}},
        "stop_x4": {"stop": ["\u0001a", "\u0001b", "\u0001c", "\u0001d"]},
    }
    out = {"batch": batch, "rounds": rounds}
    runs = {}
    for name, extra in variants.items():
        plist = [SamplingParams(seed=i, **SETTINGS, **extra) for i in range(batch)]
        rows = pack_rows(plist, vocab_size=cfg.vocab_size, seeds=list(range(batch)))
        constraints = engine.constraints(plist)

        def run(n, rows=rows, constraints=constraints):
            # eos_id=-1: no row ends early, every configuration runs the same number of steps
            return decode(engine.model, [prompt] * batch, rows, [n] * batch, constraints, eos_id=-1)

        run(new_tokens), run(1)
        runs[name] = run
    # Round-robin: each round times every variant once, back to back, so that the machine's
    # drift hits them alike; the ratio is the median over rounds of each round's ratio.
    steps = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in runs.items():
            total = _median_time(lambda run=run: run(new_tokens), 1)
            first = _median_time(lambda run=run: run(1), 1)
            steps[name].append((total - first) / (new_tokens - 1) * 1e3)
    for name in variants:
        out[name] = {
            "step_ms": statistics.median(steps[name]),
            "step_ms_rounds": steps[name],
            "ratio_to_plain": statistics.median(
                [a / b for a, b in zip(steps[name], steps["plain"], strict=True)]
            ),
        }
    plain = out["plain"]["step_ms"]
    print(
        f"# constraints at batch {batch}: plain {plain:.1f} ms/step, JSON "
        f"{out['json_object']['ratio_to_plain']:.3f}x, 4 stop strings "
        f"{out['stop_x4']['ratio_to_plain']:.3f}x",
        file=sys.stderr,
        flush=True,
    )
    return out


def nnx_state(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def ensure_hf_venv() -> str:
    venv = os.path.join(ROOT, ".venv-bench")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run(
            [py, "-m", "pip", "install", "-q", "transformers", "accelerate", "gguf", "numpy"],
            check=True,
        )
    return py


def bench_hf(batches, new_tokens: int, repeats: int) -> dict:
    from jaxsample.model import default_model_path

    py = ensure_hf_venv()
    cmd = [
        py,
        os.path.join(ROOT, "scripts", "bench_decode_hf.py"),
        "--gguf",
        default_model_path(),
        "--batches",
        ",".join(map(str, batches)),
        "--new-tokens",
        str(new_tokens),
        "--repeats",
        str(repeats),
    ]
    res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_hf_random(cfg, prompt, batches, new_tokens: int, repeats: int) -> dict:
    """transformers' generate() on a random Llama of the same shape, in this interpreter
    (on its GPU when torch sees one)."""
    import torch
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.context_length,
        tie_word_embeddings=True,
        bos_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=torch.float32).eval()
    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "weights": "random (same shape)",
        "batches": {},
    }
    for b in batches:
        ids = torch.tensor([prompt] * b, device=device)
        times = []
        for r in range(repeats + 1):
            torch.manual_seed(r)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    **SETTINGS,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=cfg.eos_id,
                )
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            assert gen.shape[1] - ids.shape[1] == new_tokens
            if r > 0:  # the first run warms up
                times.append(dt)
        med = statistics.median(times)
        out["batches"][str(b)] = {"seconds": med, "tokens_per_s": b * new_tokens / med}
        print(f"# hf batch {b}: {b * new_tokens / med:.1f} tok/s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 1 only, no transformers")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--constraint-rounds", type=int, default=7)
    ap.add_argument("--only-constraints", action="store_true", help="just that section")
    ap.add_argument("--random-weights", default=None, metavar="META.json")
    ap.add_argument("--export-metadata", default=None, metavar="META.json")
    ap.add_argument("--hf-random", action="store_true", help="transformers in this interpreter")
    args = ap.parse_args()
    if args.export_metadata:
        export_metadata(args.export_metadata)
        return
    batches = [1] if args.quick else [int(x) for x in args.batches.split(",")]
    device = jax.devices()[0]
    result = {
        "platform": device.platform,
        "device": str(device.device_kind),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "settings": SETTINGS,
        "new_tokens": args.new_tokens,
    }
    result["weights"] = "random (same shape)" if args.random_weights else "model file"
    result["limits"] = machine_limits()
    engine = load_engine(args.random_weights)
    if args.only_constraints:
        result["constraints"] = bench_constraints_in_loop(
            engine, 8, args.new_tokens, args.constraint_rounds
        )
        out = args.out or os.path.join(
            ROOT, "results", f"bench_decode_constraints_{result['platform']}.json"
        )
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {out}")
        return
    result["jaxsample"] = bench_jaxsample(engine, batches, args.new_tokens, args.repeats)
    if not args.quick:
        result["constraints"] = bench_constraints_in_loop(
            engine, 8, args.new_tokens, args.constraint_rounds
        )
    if args.hf_random:
        prompt = engine.encode_input([{"role": "user", "content": PROMPT}])
        try:
            result["transformers"] = bench_hf_random(
                engine.model.config, prompt, batches, args.new_tokens, args.repeats
            )
        except Exception as err:  # keep the jaxsample figures even if this side fails
            print(f"# transformers side failed: {err!r}", file=sys.stderr, flush=True)
    elif not (args.quick or args.no_hf):
        result["transformers"] = bench_hf(batches, args.new_tokens, args.repeats)

    lim = result["limits"]
    n_params = result["jaxsample"]["parameters"]
    bw_bound = lim["read_bandwidth_GBps"] * 1e9 / (4 * n_params)  # tokens/s at batch 1
    flop_bound = lim["matmul_f32_GFLOPs"] * 1e9 / (2 * n_params)  # tokens/s, compute bound
    print(
        f"\nmachine: read bandwidth {lim['read_bandwidth_GBps']:.1f} GB/s, "
        f"f32 matmul {lim['matmul_f32_GFLOPs']:.1f} GFLOP/s, model {n_params / 1e6:.1f} M params"
    )
    header = (
        f"{'batch':>5} | {'jaxsample tok/s':>15} | {'decode tok/s':>12} | {'HF tok/s':>9} | "
        f"{'ratio':>6} | {'roofline':>8} | {'step ms':>7} | {'sampler':>7} | {'compile s':>9}"
    )
    print(header)
    print("-" * len(header))
    for b in batches:
        j = result["jaxsample"]["batches"][str(b)]
        hf = result.get("transformers", {}).get("batches", {}).get(str(b))
        bound = min(bw_bound * b, flop_bound)
        j["roofline_tokens_per_s"] = bound
        j["fraction_of_roofline"] = j["decode_tokens_per_s"] / bound
        ratio = j["tokens_per_s"] / hf["tokens_per_s"] if hf else float("nan")
        j["ratio_vs_transformers"] = ratio
        print(
            f"{b:>5} | {j['tokens_per_s']:>15.1f} | {j['decode_tokens_per_s']:>12.1f} | "
            f"{(hf['tokens_per_s'] if hf else float('nan')):>9.1f} | {ratio:>6.2f} | "
            f"{j['fraction_of_roofline']:>8.2f} | {j['step_ms']:>7.1f} | "
            f"{100 * j['sampler_share']:>6.1f}% | {j['compile_s']:>9.1f}"
        )
    if "constraints" in result:
        c = result["constraints"]
        print(
            f"\nconstraints in the loop (batch {c['batch']}): plain step "
            f"{c['plain']['step_ms']:.1f} ms; JSON mode {c['json_object']['step_ms']:.1f} ms "
            f"({c['json_object']['ratio_to_plain']:.3f}x); 4 stop strings per row "
            f"{c['stop_x4']['step_ms']:.1f} ms ({c['stop_x4']['ratio_to_plain']:.3f}x)"
        )
    out = args.out or os.path.join(ROOT, "results", f"bench_decode_{result['platform']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
