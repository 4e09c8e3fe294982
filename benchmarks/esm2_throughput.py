"""ESM-2 forward throughput: the jitted Flax port against the torch HF reference, same model, same batches.

    .venv/bin/python benchmarks/esm2_throughput.py [--sizes 8M,35M] [--dtype float32|bfloat16]
        [--n-seqs 64] [--batch-size 16] [--repeats 3] [--attention auto,einsum,...] [--no-torch]

One random-init HF `EsmForMaskedLM` per size is converted with `models.esm2.convert_state_dict`
(the loader's own path), so both sides run identical weights. Inputs are the first `--n-seqs` SCOPe
sequences (cropped to 1022 residues), length-bucketed into batches padded to a multiple of 8; both
sides get the same padded batches. Tokens/s counts real tokens (residues + <cls>/<eos>, no padding)
over the whole set; the time is the best of `--repeats` passes after a warm-up pass (which for JAX
holds the compilation, reported separately). Columns:
  flax full    model.apply -> logits + all L+1 hidden states (what HF returns with output_hidden_states)
  flax pooled  `pooled_hidden_states` (mean over residues per layer: what the pipeline runs)
  torch HF     EsmForMaskedLM(..., output_hidden_states=True) under inference_mode
`--attention` takes a comma-separated list of `models.attention.CHOICES`: each gets its own "flax full"
row, timed in the same interleaved passes as torch, so the ratios of one run compare like with like.
"auto" rows say what the timed choice picked for each batch shape (measured first, outside the timing).
The last column checks that both compute the same thing: max-abs difference of the final hidden state.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import protein_datasets  # noqa: E402
from models import attention, esm2  # noqa: E402
from models import protein_tokenizer as tk  # noqa: E402


def hf_config_dict(config: esm2.ESM2Config) -> dict:
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.embed_dim, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.ffn_dim, position_embedding_type="rotary",
        token_dropout=True, mask_token_id=config.mask_id, pad_token_id=config.pad_id, emb_layer_norm_before=False,
        max_position_embeddings=1026, layer_norm_eps=config.layer_norm_eps, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def interleaved_times(fns: dict, batches, repeats: int) -> tuple[dict, dict]:
    """({name: first pass seconds}, {name: best of `repeats` later passes}) over all batches.

    The passes of the different functions alternate, so that a load change on a shared machine
    hits all of them alike rather than whichever happened to run then.
    """
    first, best = {}, {name: np.inf for name in fns}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn(batches)
        first[name] = time.perf_counter() - t0
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(batches)
            best[name] = min(best[name], time.perf_counter() - t0)
    return first, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="8M,35M")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--n-seqs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attention", default="auto,einsum",
                        help=f"comma-separated, each one of {', '.join(attention.CHOICES)}")
    parser.add_argument("--torch-threads", default=f"1,{os.cpu_count() or 1}",
                        help="thread counts to try for torch; the best is reported (OpenMP with all cores "
                             "collapses on a machine shared with other jobs, one thread then wins)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch reference (e.g. 3B on GPU)")
    parser.add_argument("--data", default=os.environ.get("IDJAX_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    args = parser.parse_args()

    scope = protein_datasets.read_scope_astral(pathlib.Path(args.data) / protein_datasets.SCOPE_ASTRAL_40_207)
    seqs = tk.tokenize_many(list(scope.pairs())[: args.n_seqs], long_policy="crop")
    batches = [b.tokens for b in tk.length_bucketed_batches(seqs, batch_size=args.batch_size, pad_to_multiple=8)]
    n_tokens = int(sum((b != tk.PAD_ID).sum() for b in batches))
    n_padded = int(sum(b.size for b in batches))
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {len(seqs)} SCOPe sequences, "
          f"{len(batches)} batches, {n_tokens} tokens ({n_padded} with padding), dtype {args.dtype}")

    torch = None
    if not args.no_torch:
        import torch
        from transformers import EsmConfig, EsmForMaskedLM

        print(f"torch {torch.__version__}, CPU, trying {args.torch_threads} threads")

    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = []
    ref = None
    for size in args.sizes.split(","):
        base = esm2.get_config(size)
        if torch is not None:
            torch.manual_seed(0)
            ref = EsmForMaskedLM(EsmConfig(**hf_config_dict(base))).eval()
            state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
            if args.dtype == "bfloat16":
                ref = ref.to(torch.bfloat16)
        else:
            state = esm2.to_hf_state_dict(base, esm2.init_params(base))
        impls = args.attention.split(",")
        config, params = esm2.convert_state_dict(state, base.replace(attention_impl=impls[0]), source="hf",
                                                 dtype=args.dtype)
        params = jax.device_put(params)
        applies = {impl: jax.jit(esm2.ESM2(config.replace(attention_impl=impl)).apply) for impl in impls}
        picked = "-"
        if "auto" in impls:  # the timed choice runs (or is read from its cache) here, outside the timing
            picked = ", ".join(sorted({f"T{b.shape[1]}: " + attention.choose(
                (b.shape[0], b.shape[1], config.num_heads, config.head_dim), config.jnp_dtype) for b in batches},
                key=lambda text: int(text[1:].split(":")[0])))

        def run_full(batch_list, apply, params=params):
            outs = [apply({"params": params}, jnp.asarray(batch)) for batch in batch_list]
            jax.block_until_ready(outs)
            return outs

        def run_pooled(batch_list, model=esm2.ESM2(config), params=params):  # noqa: B008 - bound per size
            outs = [esm2.pooled_hidden_states(model, params, batch) for batch in batch_list]
            jax.block_until_ready(outs)
            return outs

        def run_torch(batch_list, ref=ref):
            with torch.inference_mode():
                return [ref(torch.from_numpy(batch).long(), attention_mask=torch.from_numpy(batch != tk.PAD_ID).long(),
                            output_hidden_states=True) for batch in batch_list]

        def with_threads(fn, n):
            def run(batch_list):
                torch.set_num_threads(n)
                return fn(batch_list)
            return run

        fns = {f"full {impl}": functools.partial(run_full, apply=apply) for impl, apply in applies.items()}
        fns["pooled"] = run_pooled
        if torch is not None:
            for n in sorted({int(threads) for threads in args.torch_threads.split(",")}):
                fns[f"torch{n}"] = with_threads(run_torch, n)
        first, best = interleaved_times(fns, batches, args.repeats)
        torch_rate, threads, want = float("nan"), "-", None
        if torch is not None:
            name = min((k for k in best if k.startswith("torch")), key=best.get)
            torch_rate, threads = n_tokens / best[name], name[len("torch"):]
            with torch.inference_mode():
                want = run_torch([batches[-1]])[0].hidden_states[-1].float().numpy()
        for impl, apply in applies.items():
            diff = float("nan")
            if want is not None:
                got = np.asarray(apply({"params": params}, jnp.asarray(batches[-1]))["hidden_states"][-1], np.float32)
                diff = float(np.abs(got - want).max())
            rows.append({"size": size, "impl": impl + (f" ({picked})" if impl == "auto" else ""),
                         "full": n_tokens / best[f"full {impl}"], "pooled": n_tokens / best["pooled"],
                         "torch": torch_rate, "threads": threads, "diff": diff,
                         "compile": first[f"full {impl}"] - best[f"full {impl}"]})
        print(f"  {size}: done", flush=True)

    header = ("| size | dtype | attention | flax full tok/s | flax pooled tok/s | torch HF tok/s (threads) | "
              "flax full / torch | jit compile s | max-abs last state |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"(flax pooled uses attention {impls[0]})")
    print()
    print(header)
    print("|" + "---|" * 9)
    for r in rows:
        ratio = r["full"] / r["torch"] if r["torch"] == r["torch"] else float("nan")
        print(f"| {r['size']} | {args.dtype} | {r['impl']} | {r['full']:,.0f} | {r['pooled']:,.0f} | "
              f"{r['torch']:,.0f} ({r['threads']}) | {ratio:.2f} | {r['compile']:.1f} | {r['diff']:.1e} |")


if __name__ == "__main__":
    main()
