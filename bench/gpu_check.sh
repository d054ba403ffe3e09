#!/usr/bin/env bash
# The GPU check, in one command, on a machine with CUDA torch + triton and no network:
#
#     bash bench/gpu_check.sh OUTDIR
#
#   1. setup  install posattn (pip --no-deps --no-build-isolation --no-index, editable), versions
#   2. tests  the whole test suite, compiled (TRITON_INTERPRET unset, so bf16 runs too)
#   3. main   python -m posattn (checks every PE compiled, then its short timing table)
#   4. tune   python -m bench.tune (D=128, S=8k: the shipped tiles against statically vetted
#             candidates, per kernel and PE; writes OUTDIR/tune/tiles.json with the winners)
#   5. bench  python -m bench --quick (D=128, S=8k and 2k, every PE and peer), with
#             POSATTN_TILES=OUTDIR/tune/tiles.json when the tuner picked any tile (bench.md
#             says which); copy the picks into kernels/configs.py to ship them
#   6. tma    the forward without TMA key tiles (POSATTN_TMA=0: the pointer path, and for
#             ALiBi / KERPLE its 128x64 tile), none / ALiBi / KERPLE at D=128, S=8k, non-causal,
#             into OUTDIR/tma_off/: set against the same rows of bench.md it says whether
#             TMA (kernels/launch.py) earns its place
#   7. decode python -m bench.decode (Sq = 1 against 8k-128k caches, none / ALiBi, with and
#             without split-K, vs SDPA): OUTDIR/decode.md
#   8. ring   python -m bench.ring on this GPU alone (W = 1, S = 16k, ALiBi: the ring's own cost
#             over one posattn call; W > 1 needs more GPUs): OUTDIR/ring/ring.md
#   9. rope   RoPE's two strategies side by side (kernels/launch.py, "RoPE strategies"):
#             POSATTN_ROPE=tile, then =once, each `python -m bench --pes none,rope` at D=128,
#             S=8k and 2k, fwd and fwd+bwd, posattn and rotation+SDPA: OUTDIR/rope_{tile,once}/
#             bench.md. Set against each other they place launch.ROPE_ONCE_MIN_VISITS.
#
# Every step runs under `timeout`; its log is kept when it fails or times out, and the next step
# still runs. OUTDIR gets setup.log tests.log main.log tune.log tune/{tune.md,tune.json,tiles.json}
# bench.log bench.md bench.json bench_d128.png tma.log tma_off/bench.md decode.log decode.md
# ring.log ring/ring.md rope_tile.log rope_once.log rope_{tile,once}/bench.md
# summary.txt; the summary
# is printed last. Exit status 1 if any step failed. Budget (seconds, override by environment):
# SETUP_TIMEOUT=30 TESTS_TIMEOUT=170 MAIN_TIMEOUT=75 TUNE_TIMEOUT=70 (TUNE_MINUTES=0.8: stop
# starting measurements) BENCH_TIMEOUT=130 (BENCH_MINUTES=1.4: the bench stops starting new
# measurements and writes what it has) TMA_TIMEOUT=25 DECODE_TIMEOUT=30 RING_TIMEOUT=20 ROPE_TIMEOUT=20 (each of two). Worst case ~9.8 min,
# meant to fit one 600 s device call; typically less. Compiling dominates the first three steps: the suite
# reaches ~1,100 kernel specialisations (1-2 s each), `python -m posattn` ~43 (its checks and
# its D=128 timing table, which also warms the bench's kernels).
# TEST_WORKERS (pytest-xdist, if installed; default nproc - 2, at most 14; 0 = serial),
# PYTEST_ARGS (extra pytest arguments), PYTHON (default python3), SKIP="tests main" (steps to
# leave out, e.g. to rerun only the bench).
set -u

OUTDIR=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

PY=${PYTHON:-python3}
SETUP_TIMEOUT=${SETUP_TIMEOUT:-30}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-170}
MAIN_TIMEOUT=${MAIN_TIMEOUT:-75}
TUNE_TIMEOUT=${TUNE_TIMEOUT:-70}
TUNE_MINUTES=${TUNE_MINUTES:-0.8}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-130}
BENCH_MINUTES=${BENCH_MINUTES:-1.4}
TMA_TIMEOUT=${TMA_TIMEOUT:-25}
DECODE_TIMEOUT=${DECODE_TIMEOUT:-30}
RING_TIMEOUT=${RING_TIMEOUT:-20}
ROPE_TIMEOUT=${ROPE_TIMEOUT:-20}
NPROC=$(nproc 2>/dev/null || echo 4)
TEST_WORKERS=${TEST_WORKERS:-$(( NPROC > 16 ? 14 : (NPROC > 3 ? NPROC - 2 : 1) ))}
PYTEST_ARGS=${PYTEST_ARGS:-}
SKIP=${SKIP:-}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 MPLBACKEND=Agg
unset TRITON_INTERPRET

SUMMARY="$OUTDIR/summary.txt"
T0=$(date +%s)
FAILED=0
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S CMD... : run CMD in the repo root (bench/ is not installed) under timeout,
# output to OUTDIR/NAME.log.
step() {
    local name=$1 limit=$2 rc t
    shift 2
    case " $SKIP " in *" $name "*) note "$(printf '%-6s skipped (SKIP)' "$name")"; return 0 ;; esac
    t=$(date +%s)
    echo "== $name (limit ${limit}s, at +$((t - T0))s): $*"
    (cd "$REPO" && timeout -k 15 "$limit" "$@") >"$OUTDIR/$name.log" 2>&1
    rc=$?
    tail -n 4 "$OUTDIR/$name.log" | awk '{print "   | " $0}'
    local verdict="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMED OUT"; elif [ "$rc" -ne 0 ]; then verdict="FAILED"; fi
    [ "$verdict" = ok ] || FAILED=1
    note "$(printf '%-6s %-9s rc=%-3s %4ss' "$name" "$verdict" "$rc" "$(($(date +%s) - t))")"
    return $rc
}

setup() {
    nvidia-smi || echo "nvidia-smi failed"
    "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
import triton; print("triton", triton.__version__)
EOF
    # Editable, so that `python -m bench` / pytest run from the repo root import this tree with its
    # posattn.kernels mapping. If pip cannot build here (e.g. an old setuptools without
    # bdist_wheel and no `wheel`), try a plain install, and failing that run from the source
    # tree anyway: posattn/__init__.py finds ../kernels itself (tests/test_main_cmd.py).
    "$PY" -m pip install --no-deps --no-build-isolation --no-index -e "$REPO" \
        || "$PY" -m pip install --no-deps --no-build-isolation --no-index "$REPO" \
        || echo "pip could not install posattn; running from the source tree"
    return 0
}

note "gpu_check $(date -u +%FT%TZ) repo $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
export -f setup
export PY REPO
step setup "$SETUP_TIMEOUT" bash -c setup
grep -q '^pip could not install' "$OUTDIR/setup.log" && note "setup  WARNING: pip could not install posattn; running from the source tree (see setup.log)"
(cd "$REPO" && "$PY" -c "import posattn, posattn.kernels, posattn._triton; print('import ok:', posattn.__file__)") \
    >>"$OUTDIR/setup.log" 2>&1 || note "setup  WARNING: posattn (with posattn.kernels) does not import; see setup.log"

XDIST=()
if [ "$TEST_WORKERS" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "$TEST_WORKERS"); fi
# Most informative first: on a GPU every new constexpr combination is a JIT compile, so the
# suite may not finish inside TESTS_TIMEOUT; -v streams each test's verdict into tests.log so a
# run cut short still says what passed and what failed. The tests that only CUDA runs come
# first (the CPU CI has run everything else in the interpreter). test_compile_static is left
# out: it compiles for sm_90/sm_80 without a GPU (~150 compiles), and CI runs it.
STATIC_TESTS="test_compile_static.py"
TEST_FILES=()
for f in test_cuda_graph.py test_compile.py test_kernels.py test_robustness.py test_tma.py \
         test_tune.py test_large_offsets.py test_main_cmd.py test_api.py test_reference.py \
         test_pe.py test_extrapolate.py; do
    [ -f "$REPO/tests/$f" ] && TEST_FILES+=("$REPO/tests/$f")
done
for f in "$REPO"/tests/test_*.py; do  # anything not listed above (hypothesis last of all)
    case " $STATIC_TESTS " in *" $(basename "$f") "*) continue ;; esac
    case " ${TEST_FILES[*]} " in *" $f "*) ;; *) TEST_FILES+=("$f") ;; esac
done
# shellcheck disable=SC2086
step tests "$TESTS_TIMEOUT" "$PY" -m pytest "${TEST_FILES[@]}" -v -rfEs --durations=10 -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} $PYTEST_ARGS
step main "$MAIN_TIMEOUT" "$PY" -m posattn
step tune "$TUNE_TIMEOUT" "$PY" -m bench.tune --max-minutes "$TUNE_MINUTES" --out "$OUTDIR/tune"
TILES="$OUTDIR/tune/tiles.json"
# only a file posattn itself reads back with at least one tile (a broken one would make every
# posattn row of the bench an error)
if [ -f "$TILES" ] && (cd "$REPO" && "$PY" -c "import sys; from posattn.kernels.configs import load_tiles; sys.exit(0 if load_tiles(sys.argv[1]) else 1)" "$TILES") 2>/dev/null; then
    note "tune   picked tiles: the bench runs with POSATTN_TILES=$TILES"
    export POSATTN_TILES="$TILES"
fi
step bench "$BENCH_TIMEOUT" "$PY" -m bench --quick --max-minutes "$BENCH_MINUTES" --out "$OUTDIR"
unset POSATTN_TILES
step tma "$TMA_TIMEOUT" env POSATTN_TMA=0 "$PY" -m bench --pes none,alibi,kerple --seqlens 8k \
    --head-dims 128 --modes fwd --causal false --impls posattn --no-plot --max-minutes 0.3 \
    --out "$OUTDIR/tma_off"
step decode "$DECODE_TIMEOUT" "$PY" -m bench.decode --pes none,alibi --max-seconds 20 --out "$OUTDIR"
step ring "$RING_TIMEOUT" "$PY" -m bench.ring --world 1 --seqlen 16k --pes alibi --warmup 1 --reps 3 \
    --out "$OUTDIR/ring"
for strategy in tile once; do
    step "rope_$strategy" "$ROPE_TIMEOUT" env POSATTN_ROPE=$strategy "$PY" -m bench --pes none,rope \
        --seqlens 8k,2k --head-dims 128 --impls posattn,rope+sdpa-flash --no-plot --max-minutes 0.25 \
        --out "$OUTDIR/rope_$strategy"
done

{
    echo
    if [ -f "$OUTDIR/tests.log" ]; then
        line=$(grep -E '^=* ?[0-9]+ (passed|failed)|no tests ran' "$OUTDIR/tests.log" | tail -n 1)
        if [ -z "$line" ]; then  # cut short: count the streamed verdicts
            line="no pytest summary (timed out or crashed); so far $(grep -c ' PASSED ' "$OUTDIR/tests.log") passed, $(grep -c ' FAILED ' "$OUTDIR/tests.log") failed, $(grep -c ' SKIPPED ' "$OUTDIR/tests.log") skipped"
        fi
        echo "tests: $line"
        grep -E '^(FAILED|ERROR) | FAILED ' "$OUTDIR/tests.log" | head -n 15 | sed 's/^/  /'
    fi
    if [ -f "$OUTDIR/main.log" ]; then
        line=$(grep -E 'checks passed' "$OUTDIR/main.log" | tail -n 1)
        echo "main:  ${line:-no result line (see main.log)}"
        grep -E 'FAIL' "$OUTDIR/main.log" | head -n 10 | sed 's/^/  /'
    fi
    if [ -f "$OUTDIR/tune/tune.md" ]; then
        echo "tune:  $(grep -c ' ok ' "$OUTDIR/tune.log" 2>/dev/null || echo 0) tiles timed; picks:"
        awk '/^## Picks/{on=1; next} /^## /{on=0} on && /^\|/' "$OUTDIR/tune/tune.md"
        grep -E '^none: ' "$OUTDIR/tune/tune.md" | sed 's/^/  /'
    fi
    if [ -f "$OUTDIR/bench.md" ]; then
        echo "bench: $(grep -E '^## Targets' "$OUTDIR/bench.md" | sed 's/^## //')"
        awk '/^## Targets/{on=1; next} /^## Results/{on=0} on && /^\|/' "$OUTDIR/bench.md"
    else
        echo "bench: no bench.md written (see bench.log)"
    fi
    if [ -f "$OUTDIR/tma_off/bench.md" ]; then  # compare with bench.md's posattn fwd rows
        echo "tma:   the forward with POSATTN_TMA=0 (D=128, S=8k, non-causal):"
        grep -E '^\| (none|alibi|kerple) +\| posattn ' "$OUTDIR/tma_off/bench.md" | sed 's/^/  /'
    fi
    if [ -f "$OUTDIR/decode.md" ]; then
        echo "decode: Sq=1, GB/s of K+V read (posattn with / without split-K, SDPA):"
        grep -E '^\| [0-9]' "$OUTDIR/decode.md" | sed 's/^/  /'
    fi
    if [ -f "$OUTDIR/ring/ring.md" ]; then
        echo "ring:  W=1, S=16k (step = ring_attention fwd+bwd):"
        grep -E '^\| [0-9]' "$OUTDIR/ring/ring.md" | sed 's/^/  /'
    fi
    for strategy in tile once; do
        if [ -f "$OUTDIR/rope_$strategy/bench.md" ]; then
            echo "rope:  POSATTN_ROPE=$strategy (D=128; none and rope, posattn and rotation+SDPA):"
            grep -E '^\| (none|rope) +\| (posattn|rope\+sdpa-flash) ' "$OUTDIR/rope_$strategy/bench.md" | sed 's/^/  /'
        fi
    done
    echo "total $(($(date +%s) - T0)) s; logs and results in $OUTDIR"
} >>"$SUMMARY"
echo
echo "================ summary ================"
cat "$SUMMARY"
exit $FAILED
