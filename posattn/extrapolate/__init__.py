"""Length-extrapolation study: small byte-level LMs that differ only in their PE.

    python -m posattn.extrapolate                 # CPU default: 5 models, ~5 min on 2 cores
    python -m posattn.extrapolate --large         # GPU: L = 2048, eval to 32k, Triton kernels
    python -m posattn.extrapolate --tiny          # seconds: smoke test of the whole pipeline

Five decoder-only transformers, identical except for the positional encoding (NoPE, RoPE, ALiBi,
KERPLE-log, KERPLE-power; the KERPLE r1/r2 are trained through posattn's gradients), are trained
at one length L with the same seed, the same initial weights and the same batches, then evaluated
at L, 2L, 4L, 8L and 16L. RoPE is also evaluated with inference-time scalings (no retraining):

* PI, NTK, YaRN: ``factor = eval_len / L`` (YaRN with ``original_max_position = L``), one forward
  per window, as a perplexity evaluation in transformers does.
* DynamicNTK(factor=1, original_max_position=L). transformers' rule ``base * (factor * cur_len
  / L - (factor - 1)) ** (d / (d - 2))`` with factor = 1 stretches the frequencies exactly to the
  length seen so far (``cur_len / L``), and not at all up to L. One forward over a whole window
  would make it identical to static NTK(eval_len / L), so perplexity is scored as generation
  sees it, in growing prefixes: the tokens of ``(c/2, c]`` are predicted by a forward over the
  first ``c`` tokens (no KV cache), ``c = L, 2L, 4L, ..., eval_len``; each token thus sees the
  dynamic frequencies for a cur_len between its own context length and twice it, and the first
  L tokens see the unscaled model. (Chunks of L instead of doubling cost S/L forwards per window;
  too slow for the CPU budget.) The passkey query is the window's last token, so there
  cur_len = eval_len and dynamic NTK equals NTK(eval_len / L) by construction.

Data (nothing downloaded): the Python standard library's own ``.py`` files, as bytes, split *by
file* into train and held-out (crc32 of the relative path, 1 in 10 held out), concatenated with a
document token between files. Metrics:

* held-out byte perplexity, over the same tokens at every eval length (fixed segments of 16L+1
  tokens cut into non-overlapping windows of the eval length), plus the perplexity of only the
  tokens past position L;
* passkey retrieval: ``<KEY><V>`` (``<V>`` one of 32 value tokens that occur nowhere else) hidden
  in held-out text at a controlled distance; the window ends with ``<KEY>`` and the model must
  produce ``<V>`` (accuracy; chance 1/32). Every training window carries three copies of one
  passkey block at random places, the last at its end (two retrieval examples at distances < L;
  the inserts replace 6 of 65 bytes, the rest is text). One value token makes it a one-hop
  lookup that a 2-layer model learns within the CPU budget; a multi-token passkey
  (``passkey_len``) needs an induction circuit (previous-token head + copy), which 400-600 CPU
  steps did not form in our trials.
* multi-token-key recall (opt-in, ``--recall``): pairs ``k_1 k_2 <V>`` (keys over 8 extra
  symbols) planted in held-out text, each distractor sharing all but one symbol with the queried
  key; the window ends with the queried key and the model must produce its ``<V>`` (chance 1/3
  by pairs, 1/2 matching one symbol). Off by default: it did not train within the CPU budget
  (docs/extrapolate.md records what was tried).

Outputs in ``--out`` (default ``results/extrapolate_cpu``, ``results/extrapolate_gpu`` with
``--large``): ``results.md`` (tables), ``results.json`` (every figure, the configuration, the
corpus hash and the environment) and ``ppl_vs_length.png``.

Every attention call goes through :func:`posattn.attention` with ``causal=True`` (CPU: backend
"cpu", blockwise on torch's CPU kernels, O(S) memory; ``--large``: backend "triton", so no silent
fallback).

Modules: ``config`` (Config, the vocabulary, and the registries :data:`STUDY_PES` -- the PE
models -- and :data:`ROPE_METHODS` -- the inference-time RoPE methods; a PE or a method is added
to the study by one entry there), ``data`` (corpus, windows, passkeys, eval sets), ``model``
(ByteLM), ``train``, ``evaluate``, ``report`` (tables, plot, environment), ``study`` (run_study
and the command line, run by ``__main__``).
"""
from .config import (DOC, KEY, LABELS, N_RKEYS, N_VALUES, PE_NAMES, RKEY0, ROPE_METHODS, ROPE_SCALINGS, STUDY_PES,
                     VALUE0, VOCAB, Config, RoPEMethod, StudyPE, is_method_run, label, rope_method, rope_scaling_rules,
                     run_keys, study_pe)
from .data import (Corpus, corpus_files, eval_segments, is_heldout, load_corpus, make_passkey, make_recall,
                   passkey_distance, passkey_eval_set, random_windows, recall_distance, recall_eval_set, recall_keys,
                   train_batch)
from .model import Attention, Block, ByteLM, build_model
from .train import lm_loss, train_model
from .evaluate import eval_passkey, eval_perplexity, eval_recall, evaluate, rope_options_for, rope_scaling_for
from .report import environment, markdown_tables, plot, write_outputs
from .study import main, run_study
# private helpers of the single-module version, still reachable as ex._name (the tests use some)
from .data import _SKIP_DIRS, _spaced_positions  # noqa: F401
from .train import _autocast  # noqa: F401
from .evaluate import _eval_batch, _logits  # noqa: F401
from .report import _fmt_ppl  # noqa: F401

__all__ = [
    "DOC", "KEY", "LABELS", "N_RKEYS", "N_VALUES", "PE_NAMES", "RKEY0", "ROPE_METHODS", "ROPE_SCALINGS",
    "STUDY_PES", "VALUE0", "VOCAB", "Config", "RoPEMethod", "StudyPE", "is_method_run", "label", "rope_method", "rope_scaling_rules",
    "run_keys", "study_pe",
    "Corpus", "corpus_files", "eval_segments", "is_heldout", "load_corpus", "make_passkey", "make_recall",
    "passkey_distance", "passkey_eval_set", "random_windows", "recall_distance", "recall_eval_set", "recall_keys",
    "train_batch",
    "Attention", "Block", "ByteLM", "build_model",
    "lm_loss", "train_model",
    "eval_passkey", "eval_perplexity", "eval_recall", "evaluate", "rope_options_for", "rope_scaling_for",
    "environment", "markdown_tables", "plot", "write_outputs",
    "main", "run_study",
]
