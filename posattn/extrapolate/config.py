"""The study's configuration, vocabulary, and the two registries that define what it compares.

:data:`STUDY_PES` (name -> :class:`StudyPE`) is the one place that knows the PE models: their
labels, the ``pe=`` argument each one passes to :func:`posattn.attention`, the learnable module
(if any) each attention layer owns, and which models are also evaluated with the RoPE methods.
:data:`ROPE_METHODS` (name -> :class:`RoPEMethod`) is the one place for the inference-time RoPE
extensions (PI, NTK, dynamic NTK, YaRN). The model, the driver, the CLI, the tables and the plot
all read these two dicts; adding an entry adds it everywhere.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

import posattn

DOC = 256   # document separator (between source files)
KEY = 257   # passkey marker
VALUE0 = 258  # first value token (passkey values and recall values)
N_VALUES = 32
VOCAB = VALUE0 + N_VALUES    # the study's vocabulary (Config.vocab adds the recall symbols)
RKEY0 = VOCAB   # first recall-key symbol (only with Config.recall): keys are strings over N_RKEYS
N_RKEYS = 8


# ------------------------------------------------------------------------------------------------
# Registries
# ------------------------------------------------------------------------------------------------


def _module_params(module: nn.Module) -> Dict[str, list]:
    """Default report of a PE module's learned values: every parameter, as nested lists."""
    return {n: p.detach().float().cpu().tolist() for n, p in module.named_parameters()}


@dataclass(frozen=True)
class StudyPE:
    """One PE model of the study.

    label: its name in logs, tables and the plot.
    spec: ``(module, cfg, rope_options) -> posattn.PE``, the ``pe=`` argument of every attention
        call (evaluated at every forward, so learnable parameters stay in the graph). ``module`` is
        this layer's instance of ``module(cfg)`` (None without one); ``rope_options`` holds the
        keyword arguments of the active RoPE method for ``posattn.RoPE`` ({} when none is active;
        only models with ``rope_methods`` ever get a non-empty one).
    module: ``cfg -> nn.Module`` holding the PE's learnable parameters, one per attention layer
        (None: nothing learnable). It is built after the layer's projections, from the global RNG
        (seeded by ``build_model``), and is excluded from the shared weight init, so the models
        differ only in it.
    params: ``module -> dict`` of learned values recorded per layer in results.json
        (``pe_params``); by default every parameter of ``module``.
    rope_methods: also evaluate this model with every RoPE method of ``Config.rope_scalings``
        (runs named ``"<pe>+<method>"``).
    default: part of the default ``Config.pes`` (otherwise only run when named, e.g. ``--pes``).
    """

    label: str
    spec: Callable[[Optional[nn.Module], "Config", dict], posattn.PE]
    module: Optional[Callable[["Config"], nn.Module]] = None
    params: Callable[[nn.Module], dict] = _module_params
    rope_methods: bool = False
    default: bool = True


@dataclass(frozen=True)
class RoPEMethod:
    """One inference-time RoPE extension (no retraining).

    label: shown as ``"<PE label> + <label>"``.
    options: ``(eval_len, cfg) -> dict`` of keyword arguments for ``posattn.RoPE`` at that
        evaluation length (e.g. ``{"scaling": posattn.PI(4.0)}``; ``{}`` = plain RoPE).
    chunked: the options depend on the current length (dynamic scalings): perplexity is scored in
        growing prefixes, as generation sees it (see ``evaluate._logits``).
    rule: how ``options`` is chosen, recorded in results.json (``rope_scaling_rule``; methods
        with the same text share one entry). Formatted with ``cfg=`` the study's Config.
    default: part of the default ``Config.rope_scalings``.
    """

    label: str
    options: Callable[[int, "Config"], dict]
    chunked: bool = False
    rule: str = ""
    default: bool = True


def _kerple_params(module: nn.Module) -> Dict[str, List[float]]:
    spec = module.spec()          # clamps first, as every forward does
    r1, r2 = (t.detach().float().cpu().tolist() for t in (spec.r1, spec.r2))
    return {"r1": r1, "r2": r2}


def _kerple(kind: str) -> StudyPE:
    # r1, r2 per head with the paper's init and clamping; trained through posattn's gradients
    return StudyPE(f"KERPLE-{kind}", spec=lambda m, cfg, rope: m.spec(),
                   module=lambda cfg: posattn.nn.KERPLEBias(cfg.n_heads, kind=kind), params=_kerple_params)


class T5Table(nn.Module):
    """A layer's learnable T5 bias table (H, 32 buckets), initialised as transformers' T5
    (normal, std d_model ** -0.5)."""

    def __init__(self, cfg: "Config", num_buckets: int = 32):
        super().__init__()
        self.table = nn.Parameter(torch.randn(cfg.n_heads, num_buckets) * cfg.d_model ** -0.5)


def _fire_params(module: nn.Module) -> Dict[str, object]:
    """FIRE's learned c and L, and its table's measured interpolation error (in units of the
    bias's fp32 rounding: below 1, the kernels' table is exact to fp32; posattn.FIRE)."""
    spec = module.spec()
    return {"c": abs(float(spec.c.detach())), "L": float(spec.L.detach()),
            "interpolation_error": module.interpolation_error()}


STUDY_PES: Dict[str, StudyPE] = {
    "nope": StudyPE("NoPE", spec=lambda m, cfg, rope: posattn.NoPE()),
    "rope": StudyPE("RoPE", spec=lambda m, cfg, rope: posattn.RoPE(base=cfg.rope_base, **rope), rope_methods=True),
    "alibi": StudyPE("ALiBi", spec=lambda m, cfg, rope: posattn.ALiBi()),   # the paper's fixed slopes
    "kerple_log": _kerple("log"),
    "kerple_power": _kerple("power"),
    # T5's decoder buckets (keys after the query share bucket 0; causal anyway), its defaults
    "t5": StudyPE("T5", spec=lambda m, cfg, rope: posattn.T5Bias(m.table, bidirectional=False,
                                                                 max_distance=128),
                  module=T5Table),
    "sandwich": StudyPE("Sandwich", spec=lambda m, cfg, rope: posattn.Sandwich()),  # d_bar 128
    # xPos with the paper's ratio of scale base to training length (512 at 1024: L / 2) and the
    # RoPE model's base; without the paper's blockwise causal attention at evaluation
    "xpos": StudyPE("xPos", spec=lambda m, cfg, rope: posattn.XPos(base=cfg.rope_base,
                                                                  scale_base=cfg.train_len / 2)),
    # FIRE with the paper's width (32), init_c (0.1) and ratio of threshold to training length
    # (init_L 512 at 2048: L / 4); GELU, not the paper's ReLU (posattn.FIRE says why)
    "fire": StudyPE("FIRE", spec=lambda m, cfg, rope: m.spec(),
                    module=lambda cfg: posattn.nn.FIREBias(cfg.n_heads, init_L=cfg.train_len / 4),
                    params=_fire_params),
}


def _stretch(make: Callable[[float, "Config"], posattn.RoPEScaling]) -> Callable[[int, "Config"], dict]:
    """A static scaling with ``factor = eval_len / L``; none at eval_len <= L."""
    def options(eval_len: int, cfg: "Config") -> dict:
        factor = eval_len / cfg.train_len
        return {"scaling": make(factor, cfg)} if factor > 1 else {}
    return options


def _fit(eval_len: int, train_len: int, window: int) -> int:
    """The smallest integer k >= 2 that maps relative positions up to eval_len - 1 into the
    trained range: window + (eval_len - 1 - window) / k <= train_len - 1."""
    return max(2, -(-(eval_len - 1 - window) // (train_len - 1 - window)))


def _extend(make: Callable[[int, "Config", int], "posattn.RoPEExtension"]) -> Callable[[int, "Config"], dict]:
    """A RoPE extension (remapped positions) with window = L / 2; none at eval_len <= L."""
    def options(eval_len: int, cfg: "Config") -> dict:
        if eval_len <= cfg.train_len:
            return {}
        return {"extend": make(eval_len, cfg, cfg.train_len // 2)}
    return options


_EXTEND_RULE = ("window w = L / 2 (none at eval_len = L); ReRoPE: relative positions capped at w; "
                "leaky ReRoPE / Self-Extend: factor / group k = the smallest integer >= 2 with "
                "w + (eval_len - 1 - w) / k <= L - 1")

_STRETCH_RULE = ("factor = eval_len / L (none at eval_len = L); YaRN original_max_position = L; "
                 "one forward per window")

ROPE_METHODS: Dict[str, RoPEMethod] = {
    "pi": RoPEMethod("PI", _stretch(lambda f, cfg: posattn.PI(f)), rule=_STRETCH_RULE),
    "ntk": RoPEMethod("NTK", _stretch(lambda f, cfg: posattn.NTK(f)), rule=_STRETCH_RULE),
    "dynamic_ntk": RoPEMethod(
        "dynamic NTK",
        lambda n, cfg: {"scaling": posattn.DynamicNTK(cfg.dynamic_factor, original_max_position=cfg.train_len)},
        chunked=True,
        rule=("DynamicNTK(factor={cfg.dynamic_factor}, original_max_position=L); perplexity in "
              "growing prefixes: tokens in (c/2, c] predicted by a forward over the first c "
              "tokens (cur_len = c), c = L, 2L, 4L, ..., eval_len; passkey: one forward "
              "(cur_len = eval_len, the same as NTK(eval_len / L))")),
    "yarn": RoPEMethod("YaRN", _stretch(lambda f, cfg: posattn.YaRN(f, original_max_position=cfg.train_len)),
                       rule=_STRETCH_RULE),
    "rerope": RoPEMethod("ReRoPE", _extend(lambda n, cfg, w: posattn.ReRoPE(w)), rule=_EXTEND_RULE),
    "leaky_rerope": RoPEMethod(
        "leaky ReRoPE",
        _extend(lambda n, cfg, w: posattn.LeakyReRoPE(w, _fit(n, cfg.train_len, w))),
        rule=_EXTEND_RULE),
    "self_extend": RoPEMethod(
        "Self-Extend",
        _extend(lambda n, cfg, w: posattn.SelfExtend(_fit(n, cfg.train_len, w), w)),
        rule=_EXTEND_RULE),
    "dca": RoPEMethod(
        "DCA",
        _extend(lambda n, cfg, w: posattn.DualChunk.for_trained_length(cfg.train_len)),
        rule=("DualChunk.for_trained_length(L): chunk_size 3L/4, local_window L/16 (the "
              "authors' defaults; none at eval_len = L)")),
}


def study_pe(name: str) -> StudyPE:
    try:
        return STUDY_PES[name]
    except KeyError:
        raise ValueError(f"pe must be one of {tuple(STUDY_PES)}, got {name!r}") from None


def rope_method(name: str) -> RoPEMethod:
    try:
        return ROPE_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown RoPE scaling {name!r}") from None


def run_keys(pes=None, methods=None) -> List[str]:
    """The result keys a study produces, in order: each PE, then ``"<pe>+<method>"`` for every
    RoPE method after a PE with ``rope_methods`` (all registered when None)."""
    pes = tuple(STUDY_PES) if pes is None else pes
    methods = tuple(ROPE_METHODS) if methods is None else methods
    out = []
    for pe in pes:
        out.append(pe)
        if study_pe(pe).rope_methods:
            out += [f"{pe}+{m}" for m in methods]
    return out


def label(key: str) -> str:
    """Display label of a result key: a PE name or ``"<pe>+<method>"``."""
    pe, _, method = key.partition("+")
    return study_pe(pe).label + (f" + {rope_method(method).label}" if method else "")


def is_method_run(key: str) -> bool:
    return "+" in key


class _Labels(Mapping):
    """``LABELS[key]``: every run key -> its label, read from the registries at each access."""

    def __getitem__(self, key: str) -> str:
        try:
            return label(key)
        except ValueError:
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[str]:
        return iter(run_keys())

    def __len__(self) -> int:
        return len(run_keys())


LABELS: Mapping = _Labels()
# The default names (snapshots at import; the registries above are the source).
PE_NAMES: Tuple[str, ...] = tuple(k for k, v in STUDY_PES.items() if v.default)
ROPE_SCALINGS: Tuple[str, ...] = tuple(k for k, v in ROPE_METHODS.items() if v.default)


def rope_scaling_rules(cfg: "Config") -> Dict[str, str]:
    """``rope_scaling_rule`` of results.json: methods with the same rule share one entry."""
    groups: Dict[str, List[str]] = {}
    for name, m in ROPE_METHODS.items():
        groups.setdefault(m.rule.format(cfg=cfg), []).append(name)
    return {"/".join(names): rule for rule, names in groups.items()}


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass
class Config:
    # model
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    rope_base: float = 10000.0
    # training
    train_len: int = 64
    batch_size: int = 32
    steps: int = 600
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    passkey_frac: float = 1.0
    passkey_len: int = 1             # value tokens per passkey
    passkey_copies: int = 3          # blocks per training window (the last one at the end)
    # multi-token-key recall (data.make_recall), opt-in (--recall): a recall_frac share of the
    # training windows carries recall pairs instead of a passkey, and every run is also evaluated
    # on it. Off by default: it did not train within the CPU budget (docs/extrapolate.md), and
    # off, the vocabulary and the batches are those of the passkey-only study.
    recall: bool = False
    recall_frac: float = 0.25
    recall_key_len: int = 2          # symbols per key
    recall_pairs: int = 3            # key -> value pairs per window: the queried one + distractors
    recall_repeats: int = 2          # training: repeated pairs after the first occurrences (the last at the end)
    # evaluation
    eval_mults: Tuple[int, ...] = (1, 2, 4, 8, 16)
    eval_segments: int = 12          # segments of max_eval_len + 1 held-out tokens, same at every length
    passkey_eval: int = 48           # passkey windows per eval length
    recall_eval: int = 48            # recall windows per eval length
    eval_elems: int = 1 << 23        # B * H * S * S per eval forward (the reference materialises S x S)
    eval_batch_tokens: int = 1 << 19 # B * S per eval forward
    # what to run (default: the registries' default entries, read when a Config is made)
    pes: Tuple[str, ...] = field(
        default_factory=lambda: tuple(k for k, v in STUDY_PES.items() if v.default))
    rope_scalings: Tuple[str, ...] = field(
        default_factory=lambda: tuple(k for k, v in ROPE_METHODS.items() if v.default))
    dynamic_factor: float = 1.0
    # machinery
    seed: int = 0
    device: str = "cpu"
    backend: str = "cpu"             # posattn.attention backend (CPU: exact, O(S) memory)
    amp_bf16: bool = False           # autocast to bf16 (GPU)
    corpus_max_bytes: int = 0        # 0 = the whole corpus
    log_every: int = 50
    name: str = "cpu"

    @property
    def eval_lens(self) -> List[int]:
        return [self.train_len * m for m in self.eval_mults]

    @property
    def vocab(self) -> int:
        """Vocabulary size: bytes, <DOC>, <KEY>, the values, and the recall symbols with ``recall``."""
        return VOCAB + (N_RKEYS if self.recall else 0)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @staticmethod
    def large() -> "Config":
        """GPU configuration: L = 2048, eval to 16L = 32k tokens, Triton kernels, bf16."""
        return Config(n_layers=4, d_model=384, n_heads=6, d_ff=1536, train_len=2048, batch_size=16,
                      steps=3000, lr=1.5e-3, warmup=200, eval_segments=8, passkey_eval=48,
                      eval_elems=1 << 40, device="cuda", backend="triton", amp_bf16=True,
                      log_every=100, name="gpu")

    @staticmethod
    def tiny() -> "Config":
        """Seconds: for tests and smoke runs."""
        return Config(n_layers=1, d_model=32, n_heads=2, d_ff=64, train_len=16, batch_size=4, steps=3,
                      warmup=1, eval_mults=(1, 2), eval_segments=2, passkey_eval=4, recall_eval=4,
                      corpus_max_bytes=200_000, log_every=1, name="tiny")
