#!/usr/bin/env python3
"""hf_moe_baseline.py — the Hugging Face transformers baseline for MoE Engine's GPU numbers.

Builds a Mixtral-8x7B-shaped model (hidden 4096, intermediate 14336, 32 heads, 8 kv heads,
8 experts top-2, vocab 32000, rope_theta 1e6) with --layers N random bf16 layers on CUDA and
measures, for each experts implementation this transformers version offers (eager,
grouped_mm, batched_mm, ... detected at run time; ones that fail are skipped with a note) and
attention implementation sdpa:
  - prefill: one forward over batch B x S tokens (default 4 x 2048), use_cache=False;
  - decode: batch-1 tokens/s over --decode-steps steps with a KV cache after a short prompt.
Also measures the two rooflines of the machine: device-to-device copy bandwidth (bytes read +
written) and an 8192^3 bf16 matmul in TFLOP/s. Timing uses torch.cuda.Event after warm-ups;
the median of the repeats is reported. Prints one JSON line (last line of output).

Needs torch (2.11) and transformers (5.x); runs on a GPU machine only.
"""
import argparse
import inspect
import json
import statistics
import sys
import time


def cuda_time_ms(fn, warmup=2, repeat=5):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rooflines():
    import torch

    out = {}
    n = 1 << 30  # 1 GiB per buffer
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    a.random_(0, 255)
    b = torch.empty_like(a)
    ms = cuda_time_ms(lambda: b.copy_(a), warmup=3, repeat=10)
    out["d2d_copy_GBps"] = round(2 * n / ms / 1e6, 1)
    del a, b
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    ms = cuda_time_ms(lambda: x @ y, warmup=3, repeat=10)
    out["bf16_matmul_8192_TFLOPs"] = round(2 * m ** 3 / ms / 1e9, 1)
    del x, y
    torch.cuda.empty_cache()
    return out


def experts_impl_candidates(transformers):
    """The experts implementations this transformers version knows, best guess first."""
    names = []
    try:
        from transformers.integrations import moe as moe_integration  # transformers 5.x

        for attr in ("ALL_EXPERTS_FUNCTIONS", "EXPERTS_FUNCTIONS", "ALL_EXPERTS_IMPLEMENTATIONS"):
            reg = getattr(moe_integration, attr, None)
            if reg is not None:
                try:
                    names.extend(list(reg.keys()))
                except Exception:  # a registry object without keys()
                    names.extend([k for k in dir(reg) if not k.startswith("_")])
                break
    except Exception:
        pass
    for n in ("eager", "grouped_mm", "batched_mm"):
        if n not in names:
            names.append(n)
    return names


def build_model(layers, experts_impl, attn_impl):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        sliding_window=None,
        router_aux_loss_coef=0.0,
    )
    cfg._attn_implementation = attn_impl
    note = None
    if experts_impl is not None:
        # transformers 5 exposes the choice as config.experts_implementation (a property over
        # _experts_implementation); set both spellings where they exist.
        set_any = False
        for attr in ("experts_implementation", "_experts_implementation"):
            try:
                setattr(cfg, attr, experts_impl)
                set_any = True
            except Exception as e:  # validation of unknown names
                note = f"{attr}: {e}"
        if not set_any:
            raise RuntimeError(f"cannot set experts implementation {experts_impl}: {note}")
    kwargs = {}
    sig = inspect.signature(MixtralForCausalLM._from_config)
    if "torch_dtype" in sig.parameters:
        kwargs["torch_dtype"] = torch.bfloat16
    elif "dtype" in sig.parameters:
        kwargs["dtype"] = torch.bfloat16
    with torch.device("cuda"):
        model = MixtralForCausalLM._from_config(cfg, **kwargs)
    model = model.to(torch.bfloat16).eval()
    # Random, non-zero weights (init may leave some buffers zero): normal(0, 0.02) everywhere.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def measure(model, batch, seq, prompt, steps):
    import torch

    res = {}
    with torch.no_grad():
        ids = torch.randint(0, 32000, (batch, seq), device="cuda")
        fwd = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)
        try:
            fwd()
        except TypeError:  # older signature without logits_to_keep
            fwd = lambda: model(input_ids=ids, use_cache=False)
        ms = cuda_time_ms(fwd, warmup=1, repeat=3)
        res["prefill_ms"] = round(ms, 2)
        res["prefill_tokens_per_s"] = round(batch * seq / ms * 1e3, 1)
        del ids
        torch.cuda.empty_cache()

        # Decode: batch 1, a short prompt, then `steps` greedy steps with the KV cache.
        from transformers import DynamicCache

        prompt_ids = torch.randint(0, 32000, (1, prompt), device="cuda")

        def decode_run():
            cache = DynamicCache()
            out = model(input_ids=prompt_ids, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            cache = out.past_key_values
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        decode_run()  # warm-up
        times = [decode_run() for _ in range(3)]
        ms = statistics.median(times)
        res["decode_ms_per_token"] = round(ms / steps, 3)
        res["decode_tokens_per_s"] = round(steps / ms * 1e3, 1)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--experts", default="auto", help="comma list of experts implementations, or auto")
    ap.add_argument("--no-roofline", action="store_true")
    args = ap.parse_args()

    import torch
    import transformers

    result = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "layers": args.layers,
        "prefill_shape": [args.batch, args.seq],
        "decode_steps": args.decode_steps,
        "attn_implementation": "sdpa",
        "runs": {},
        "notes": [],
    }
    if not args.no_roofline:
        result.update(rooflines())
    impls = experts_impl_candidates(transformers) if args.experts == "auto" else args.experts.split(",")
    for impl in impls:
        t0 = time.time()
        model = None
        try:
            model = build_model(args.layers, impl, "sdpa")
            r = measure(model, args.batch, args.seq, args.prompt, args.decode_steps)
            r["wall_s"] = round(time.time() - t0, 1)
            result["runs"][impl] = r
            print(f"# {impl}: {r}", file=sys.stderr, flush=True)
        except Exception as e:  # an implementation this version or GPU cannot run
            result["notes"].append(f"experts implementation {impl!r} skipped: {type(e).__name__}: {str(e)[:300]}")
            print(f"# {impl}: skipped ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        finally:
            del model
            torch.cuda.empty_cache()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
