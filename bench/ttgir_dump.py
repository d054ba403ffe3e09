"""Dump the normalised TTGIR of a fixed set of kernel launches, to prove a refactor changed
no generated code: run it before and after, then ``diff -r BEFORE AFTER``.

    python -m bench.ttgir_dump /tmp/before      # on the old tree
    python -m bench.ttgir_dump /tmp/after       # on the new tree
    diff -r /tmp/before /tmp/after              # empty: the same code, up to value names

Compiles the launches the launchers make (bench.compile_report.captured_launch) for sm_90 on
this CPU machine; value names, locations and the order of constants are normalised away
(``sort`` the files if only constants moved). Needs TRITON_INTERPRET unset.
"""
import argparse
import os
import re
import sys

CASES = (  # (kernel, pe, head_dim, causal, explicit, part, options)
    ("fwd", "none", 128, True, False, "split", {}),
    ("fwd", "alibi", 64, True, False, "both", dict(window=(100, 0))),
    ("fwd", "rope", 64, False, False, "both", dict(varlen=True, softcap=5.0)),
    ("fwd", "kerple_power", 64, True, True, "both", {}),
    ("bwd_dq", "kerple_log", 64, True, False, "both", {}),
    ("bwd_dq", "rope", 64, True, False, "both", dict(window=(9, 3))),
    ("bwd_dq", "t5", 128, True, False, "both", {}),  # the table gradient
    ("bwd_dkdv", "alibi", 64, True, False, "both", dict(window=(50, None))),
    ("bwd_dkdv", "rope", 128, True, True, "dk", {}),
)


def normalise(ttgir: str) -> str:
    text = re.sub(r" loc\([^)]*\)", "", ttgir)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#loc"))
    return re.sub(r"%[A-Za-z0-9_]+", "%v", text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="directory to write one .ttgir per case into")
    ap.add_argument("--arch", type=int, default=90, choices=(80, 90))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("bench.ttgir_dump compiles real kernels: unset TRITON_INTERPRET")
    from bench.compile_report import compile_kernel

    os.makedirs(args.out, exist_ok=True)
    for kernel, pe, hd, causal, explicit, part, opts in CASES:
        ck, _, _ = compile_kernel(kernel, pe, hd, causal, explicit, arch=args.arch, part=part,
                                  **opts)
        tag = "-".join([kernel, pe, f"d{hd}", "causal" if causal else "full",
                        "explicit" if explicit else "contig", part]
                       + [f"{k}{v}".replace(" ", "") for k, v in opts.items()])
        with open(os.path.join(args.out, tag + ".ttgir"), "w") as f:
            f.write(normalise(ck.asm["ttgir"]))
        print(tag, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
