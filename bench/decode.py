"""python -m bench.decode: one decode step (Sq = 1) against a long KV cache, posattn vs SDPA.

    python -m bench.decode               # on a GPU: the shapes below, every PE, OUT/decode.{md,json}
    python -m bench.decode --dry-run     # the plan, without a GPU

A decode step reads the whole K/V cache once and does almost no arithmetic, so it is measured
in GB/s of K+V read (2 * B * Hkv * Sk * D * 2 bytes) against the GPU's HBM bandwidth, with
each step captured in a CUDA graph (triton.testing.do_bench_cudagraph): GPU time, as a
serving engine replays it, not the Python dispatch around a few microseconds of kernels. With
B * Hq programs, too few to fill the GPU, posattn splits the key tiles into runs and merges
them (launch.split_count); the "posattn (no split)" rows force one run, so the pair shows
what the split is worth. SDPA rows have no PE (its ceiling); posattn rows run each PE with
the benchmark's parameters (bench.peers), causal, the query at the end of the cache.

The "kvcache" rows run the serving entry point, posattn.attention_with_kvcache, on the same
keys as a contiguous cache (B, Sk, Hkv, D) and as a paged one (16-token pages in shuffled
order, vLLM's page size): its decode step packs each GQA group's query heads into one
program's rows (launch.pack_gqa), so K and V are read once per group. "flash-attn kvcache" is
flash_attn_with_kvcache where importable (no PE, or ALiBi slopes; its paged path needs
256-token pages, so it runs the contiguous cache). "HBM" is the GB/s over the GPU's peak
bandwidth (bench.envinfo's table; "?" for an unknown GPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch

# (B, Hq, Hkv, Sk): Llama-3-8B-like heads (32 query, 8 KV), one sequence and a small batch
SHAPES = [(1, 32, 8, 8192), (1, 32, 8, 32768), (1, 32, 8, 131072), (8, 32, 8, 32768)]
D = 128
PES = ("none", "rope", "alibi", "kerple")
SDPA_BACKENDS = ("flash", "efficient", "cudnn")


def kv_bytes(B: int, Hkv: int, Sk: int, d: int = D, itemsize: int = 2) -> int:
    return 2 * B * Hkv * Sk * d * itemsize


# peak HBM bandwidth, GB/s, by a substring of the device name
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0}


def peak_gbps(device) -> Optional[float]:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def plan(shapes=SHAPES, pes=PES) -> List[tuple]:
    """(shape, implementation, pe) in the order they are measured."""
    out = []
    for shape in shapes:
        for pe in pes:
            out.append((shape, "posattn", pe))
            out.append((shape, "posattn (no split)", pe))
            out.append((shape, "posattn kvcache", pe))
            out.append((shape, "posattn kvcache paged16", pe))
        for pe in ("none", "alibi"):
            if pe in pes:
                out.append((shape, "flash-attn kvcache", pe))
        for backend in SDPA_BACKENDS:
            out.append((shape, f"sdpa-{backend}", "none"))
    return out


def _call(impl: str, pe: str, q, k, v) -> Callable[[], torch.Tensor]:
    """The timed step: posattn with the PE (split-K as the launcher decides, or forced off), or
    SDPA on one backend with no PE (GQA through enable_gqa, no mask: one query at the end
    sees every key)."""
    import torch.nn.functional as F

    import posattn
    from posattn.kernels import launch

    from .peers import _sdpa_backend, pe_spec

    if impl.startswith("posattn kvcache"):
        spec = pe_spec(pe, q.shape[1], q.device)
        B, Sk = k.shape[0], k.shape[2]
        lens = torch.full((B,), Sk - 1, device=q.device, dtype=torch.int32)  # + the 1 new token
        qb = q.transpose(1, 2)  # (B, 1, Hq, D)
        kc, vc = k.transpose(1, 2), v.transpose(1, 2)  # (B, Sk, Hkv, D) views
        table = None
        if impl.endswith("paged16"):  # the same keys in 16-token pages, in shuffled order
            per = -(-Sk // 16)
            n = B * per
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(q.device)
            pad = per * 16 - Sk  # (the last page's tail: never read)
            kc, vc = (torch.nn.functional.pad(c, (0, 0, 0, 0, 0, pad)).reshape(n, 16, *c.shape[2:])
                      [perm.argsort()].contiguous() for c in (kc, vc))
            table = perm.view(B, per).to(torch.int32)

        def run():
            return posattn.attention_with_kvcache(qb, kc, vc, cache_seqlens=lens, block_table=table,
                                                  pe=spec, backend="triton")
        return run
    if impl == "flash-attn kvcache":
        from .peers import Unavailable, alibi_params

        try:
            from flash_attn import flash_attn_with_kvcache
        except ImportError as exc:
            raise Unavailable("unavailable", f"flash_attn is not installed ({exc})") from exc

        B, Sk = k.shape[0], k.shape[2]
        lens = torch.full((B,), Sk, device=q.device, dtype=torch.int32)
        qb, kc, vc = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        slopes = alibi_params(q.shape[1], q.device) if pe == "alibi" else None

        def run():
            return flash_attn_with_kvcache(qb, kc, vc, cache_seqlens=lens, causal=True,
                                           alibi_slopes=slopes)
        return run
    if impl.startswith("posattn"):
        spec = pe_spec(pe, q.shape[1], q.device)
        forced = 1 if impl.endswith("(no split)") else None

        def run():
            old, launch.FORCE_SPLITS = launch.FORCE_SPLITS, forced
            try:
                return posattn.attention(q, k, v, spec, causal=True, backend="triton")
            finally:
                launch.FORCE_SPLITS = old
        return run

    from torch.nn.attention import sdpa_kernel

    backend = _sdpa_backend(impl.split("-", 1)[1])

    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return run


def measure_all(items, device, timer: Callable, out_of_time=lambda: False, echo=print,
                each=lambda rows: None) -> List[dict]:
    """One row per item: ms and GB/s, or the status and reason it did not run; each SDPA row
    also has max |out - posattn's|, no PE (a fast but wrong ceiling would show). ``each``
    gets the rows after every measurement (to write them as they come)."""
    from .measure import classify_failure, free_memory

    rows, cache, ref = [], {}, {}
    for (B, Hq, Hkv, Sk), impl, pe in items:
        row = dict(B=B, Hq=Hq, Hkv=Hkv, Sk=Sk, D=D, impl=impl, pe=pe, status="ok", reason="",
                   ms=None, gbps=None, max_abs_diff=None)
        key = (B, Hq, Hkv, Sk)
        if out_of_time():
            row.update(status="skipped", reason="time budget used up")
        else:
            try:
                if key not in cache:
                    cache.clear()
                    ref.clear()
                    free_memory()
                    g = torch.Generator(device=device).manual_seed(Sk + B)
                    dt = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float16
                    cache[key] = [torch.randn(s, generator=g, device=device, dtype=dt)
                                  for s in ((B, Hq, 1, D), (B, Hkv, Sk, D), (B, Hkv, Sk, D))]
                q, k, v = cache[key]
                fn = _call(impl, pe, q, k, v)
                with torch.no_grad():
                    out = fn()  # compile / warm up
                    if impl == "posattn" and pe == "none":
                        ref[key] = out
                    elif impl.startswith("sdpa") and key in ref:
                        row["max_abs_diff"] = float((out.float() - ref[key].float()).abs().max())
                    ms = timer(fn)
                row.update(ms=ms, gbps=kv_bytes(B, Hkv, Sk) / (ms * 1e-3) / 1e9)
                peak = peak_gbps(device)
                row["hbm"] = row["gbps"] / peak if peak else None
            except Exception as exc:  # noqa: BLE001 - every failure becomes a row
                row["status"], row["reason"] = classify_failure(exc)
        rows.append(row)
        each(rows)
        if echo:
            echo(_line(row))
    return rows


def _line(r: dict) -> str:
    head = f"B={r['B']} Hq={r['Hq']} Hkv={r['Hkv']} Sk={r['Sk']:<6} {r['impl']:<20} {r['pe']:<7}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['reason']}"
    diff = "" if r.get("max_abs_diff") is None else f"  Δ={r['max_abs_diff']:.1e}"
    return f"{head} {r['ms'] * 1e3:9.1f} us {r['gbps']:7.0f} GB/s{diff}"


def markdown(rows: List[dict], env: dict) -> str:
    lines = [f"# Decode step (Sq = 1), D={D}, bf16, causal, query at the end of the cache", "",
             f"{env.get('gpu', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}; "
             "GB/s = K+V bytes read / time; each step timed inside a CUDA graph (GPU time, not "
             "Python dispatch); Δ = max |out − posattn's| (no PE).", "",
             "| B | Hq/Hkv | Sk | impl | PE | µs | GB/s | HBM | Δ | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        us = "—" if r["ms"] is None else f"{r['ms'] * 1e3:.1f}"
        gb = "—" if r["gbps"] is None else f"{r['gbps']:.0f}"
        hbm = "?" if r.get("hbm") is None else f"{100 * r['hbm']:.0f} %"
        diff = "—" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.1e}"
        st = "ok" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append(f"| {r['B']} | {r['Hq']}/{r['Hkv']} | {r['Sk']} | {r['impl']} | {r['pe']} | "
                     f"{us} | {gb} | {hbm} | {diff} | {st} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/bench", help="folder for decode.md / decode.json")
    ap.add_argument("--pes", default=",".join(PES))
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop starting measurements after this long (the rest are not run)")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    items = plan(pes=[p for p in args.pes.split(",") if p])
    if args.dry_run:
        for (B, Hq, Hkv, Sk), impl, pe in items:
            print(f"B={B} Hq={Hq} Hkv={Hkv} Sk={Sk:<6} {impl:<20} {pe}")
        return 0
    if not torch.cuda.is_available():
        print("python -m bench.decode needs a CUDA GPU (none found); --dry-run prints the plan")
        return 2
    from triton.testing import do_bench_cudagraph

    from .envinfo import environment

    t0 = time.perf_counter()
    env = environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(rows):  # after every row: a step cut short by its timeout keeps what it measured
        (out / "decode.md").write_text(markdown(rows, env))
        (out / "decode.json").write_text(json.dumps(dict(environment=env, results=rows), indent=1))

    # Inside a CUDA graph: a decode step's kernels take microseconds, less than the Python
    # around them, which do_bench would time too (its L2 flush does not hide 100+ us).
    measure_all(items, "cuda", lambda fn: float(do_bench_cudagraph(fn, rep=20, return_mode="median")),
                lambda: bool(args.max_seconds) and time.perf_counter() - t0 > args.max_seconds,
                each=write)
    print(f"wrote {out}/decode.md, decode.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
