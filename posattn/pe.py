"""Positional-encoding specs: the small records the kernels and the reference consume.

Every PE is a function of token positions. The kernel boundary is tiny:

* RoPE (any scaling)  -> ``inv_freq`` (rotary_dim // 2,) float64 and one attention factor
  (it multiplies cos and sin, so the rotated part of the logits is scaled by factor**2).
* ALiBi               -> ``slopes`` (H,)
* KERPLE log / power  -> ``r1`` (H,), ``r2`` (H,)
* NoPE                -> nothing

Pure torch, no Triton: the reference and the kernels share only this math.

Validation is split in two, so that errors surface as early as the information allows:

* constructors check what is known without the inputs (scalar factors, types, list contents);
* :meth:`PE.check` checks what depends on the call (head count, head dim, device), and is what the
  public ``posattn.attention`` calls before launching anything.

Both raise ``TypeError`` / ``ValueError`` naming the argument (never ``assert``: ``python -O``
strips those).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Optional, Tuple, Union

import torch

Number = Union[int, float]

__all__ = [
    "PE", "NoPE", "RoPE", "XPos", "ALiBi", "KERPLE", "T5Bias", "Sandwich", "FIRE", "t5_bucket",
    "RoPEScaling", "PI", "NTK", "DynamicNTK", "YaRN", "Llama3", "LongRoPE",
    "RoPEExtension", "ReRoPE", "LeakyReRoPE", "SelfExtend", "DualChunk",
    "alibi_slopes", "resolve_pe", "REGISTRY", "registered", "axes",
]


# --------------------------------------------------------------------------------------------
# Validation helpers (all raise TypeError / ValueError naming the argument)
# --------------------------------------------------------------------------------------------


def _is_real(x) -> bool:
    # bool is an int subclass; True as a "factor" is almost certainly a bug, so refuse it.
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _positive_float(name: str, x, *, allow_none: bool = False, minimum_exclusive: float = 0.0):
    """``x`` as a float, checked finite and > ``minimum_exclusive`` (or None when allowed)."""
    if x is None and allow_none:
        return None
    if not _is_real(x):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r}")
    x = float(x)
    if not math.isfinite(x) or x <= minimum_exclusive:
        raise ValueError(f"{name} must be a finite number > {minimum_exclusive:g}, got {x!r}")
    return x


def _nonneg_float(name: str, x, *, allow_none: bool = False):
    if x is None and allow_none:
        return None
    if not _is_real(x):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r}")
    x = float(x)
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
    return x


def _positive_int(name: str, x) -> int:
    """A positive integer; integral floats (e.g. 4096.0 from a JSON config) are accepted."""
    if isinstance(x, bool) or not (isinstance(x, numbers.Integral) or (isinstance(x, float) and x.is_integer())):
        raise TypeError(f"{name} must be a positive integer, got {type(x).__name__} {x!r}")
    x = int(x)
    if x <= 0:
        raise ValueError(f"{name} must be a positive integer, got {x}")
    return x


def _cur_len(x) -> Optional[int]:
    """``cur_len`` (max position + 1): None, a Python int or a 0-d integer tensor -> int or None.

    Any int is accepted: empty inputs give 0 (max position -1), and everything <= L0 simply means
    "not longer than the original context" (unscaled / short factors).
    """
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"cur_len must be an int (max position + 1), got a {x.dtype} tensor of shape "
                            f"{tuple(x.shape)}")
        x = int(x.item())
    elif isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"cur_len must be an int (max position + 1) or None, got {type(x).__name__} {x!r}")
    return int(x)


def _same_device(actual: torch.device, expected) -> bool:
    expected = torch.device(expected)
    if actual.type != expected.type:
        return False
    # "cuda" (no index) means the current device; a tensor always carries an index.
    if expected.index is None and actual.type == "cuda":
        return actual.index == torch.cuda.current_device()
    return expected.index is None or actual.index == expected.index


def _all_true(cond: torch.Tensor) -> bool:
    """``bool(cond.all())``; True where values cannot be read: meta tensors, CUDA tensors while
    a CUDA graph is being captured (a host sync is illegal then), and under torch.compile
    (a data-dependent branch would break the graph; the check runs on eager calls)."""
    if torch.compiler.is_compiling():
        return True
    if cond.device.type == "meta" or (cond.is_cuda and torch.cuda.is_current_stream_capturing()):
        return True
    return bool(cond.all())


def _check_head_vector(name: str, t, num_heads: int, device, *, positive: bool) -> None:
    """A per-head parameter: a floating tensor of shape exactly (num_heads,) on ``device``, finite
    (and > 0 when ``positive``). Nothing is broadcast: a (1,) or (B, H) tensor is refused, because
    silently broadcasting one slope to every head hides a wrong head count."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a floating torch.Tensor of shape (num_heads,) = ({num_heads},), "
                        f"got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32 recommended), got dtype {t.dtype}")
    if tuple(t.shape) != (num_heads,):
        raise ValueError(f"{name} must have shape (num_heads,) = ({num_heads},), got {tuple(t.shape)}")
    if not _same_device(t.device, device):
        raise ValueError(f"{name} must be on the inputs' device {torch.device(device)}, got {t.device}")
    # One host sync per tensor per call; these are H-element vectors, and a NaN here would
    # otherwise surface as a NaN output far from its cause. detach(): keep it out of autograd.
    td = t.detach()
    ok = torch.isfinite(td) & (td > 0) if positive else torch.isfinite(td)
    if not _all_true(ok):
        if not bool(torch.isfinite(td).all()):
            raise ValueError(f"{name} must be finite, got {td.tolist()}")
        raise ValueError(f"{name} must be > 0 for every head, got {td.tolist()}")


def _check_tensor_type(name: str, t) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32 recommended), got dtype {t.dtype}")


def _check_dims(num_heads, head_dim) -> None:
    _positive_int("num_heads", num_heads)
    _positive_int("head_dim", head_dim)


class PE:
    """Base class of every positional-encoding spec.

    A spec says everything the rest of posattn needs of it (the registry below enumerates them):

    * ``name``: its short ``pe=`` string (REGISTRY below names every kernel kind, e.g.
      KERPLE's "kerple_log" / "kerple_power");
    * its kernel axes: ``rotary`` ("none" | "rope") and ``bias`` ("none" | "alibi" |
      "kerple_log" | "kerple_power" | "t5"), which kernels/rotary.py and kernels/bias.py implement;
    * ``tile_family``: the tile-config family (kernels/configs.py);
    * ``causal_only``: whether it is defined for causal attention only (xPos);
    * :meth:`bias_params`: its per-head parameters as one (H, P) tensor (the kernels' one
      parameter channel; autograd flows through it back into the spec's own tensors);
    * :meth:`bias_buckets`: for a table bias (T5), the table column per relative position;
    * :meth:`reference_bias`: the bias the naive reference adds (posattn.reference); a bias
      that depends on more than k - q (``relative_only`` False: FIRE's normaliser reads q)
      implements :meth:`reference_bias_at` instead;
    * :meth:`tensors`: the tensors its bias reads (those that require grad get gradients).
    """

    name: str = "?"
    rotary: str = "none"
    bias: str = "none"
    tile_family: str = "none"
    causal_only: bool = False  # defined for decoders only: check_mask refuses causal=False
    relative_only: bool = True  # the bias is a function of k - q alone (reference_bias)

    def bias_params(self, num_heads: int, device) -> Optional[torch.Tensor]:
        """(num_heads, P) per-head bias parameters, or None for a PE without a bias."""
        return None

    def reference_bias(self, num_heads: int, rel: torch.Tensor) -> Optional[torch.Tensor]:
        """The additive bias (B, H, Sq, Sk) from the signed relative position
        ``rel = k_pos - q_pos`` (B, 1, Sq, Sk) in the math dtype, or None. Written for
        clarity: the oracle the kernels are tested against."""
        return None

    def reference_bias_at(self, num_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor,
                          dtype) -> Optional[torch.Tensor]:
        """The additive bias (B, H, Sq, Sk) in ``dtype`` from integer positions q_pos (B, Sq)
        and k_pos (B, Sk). By default :meth:`reference_bias` of k - q."""
        rel = (k_pos[:, None, :] - q_pos[:, :, None]).to(dtype)[:, None]  # (B, 1, Sq, Sk)
        return self.reference_bias(num_heads, rel)

    def bias_buckets(self) -> Optional[torch.Tensor]:
        """For a bias that is a per-head table looked up by relative position (T5): the
        table column of every ``k_pos - q_pos`` in ``[-R, R]``, int64 (2R + 1,) on the CPU,
        saturated beyond (a position further than R has the bucket of +-R). The kernels
        read the table through it; None for a bias computed from a formula."""
        return None

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        """The tensors this spec's bias is computed from (those that require grad are the
        learnable PE parameters; a backend returns their gradients). Empty by default."""
        return ()

    def check(self, num_heads: int, head_dim: int, device: torch.device) -> None:
        """Validate this spec against a call's query head count, head dim and device.

        Raises ``TypeError`` / ``ValueError`` naming the offending argument. No-op by default.
        """

    def check_mask(self, causal: bool, window=None) -> None:
        """Validate this spec against a call's mask (``window``: the checked ``(left, right)``
        or None): a PE defined for decoders only raises ``ValueError`` when ``causal`` is
        False. No-op by default."""

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"{type(self).__name__}()"


class NoPE(PE):
    """No positional encoding: plain attention."""

    name = "none"

    def check(self, num_heads: int, head_dim: int, device: torch.device) -> None:
        """Nothing to check."""


# --------------------------------------------------------------------------------------------
# RoPE and its scalings
#
# Every scaling is written to give the same inverse frequencies and attention factor as Hugging
# Face transformers' ``modeling_rope_utils`` for the same parameters (checkpoints were trained
# with those), but in float64 (transformers computes in float32).
# --------------------------------------------------------------------------------------------


def _default_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    """``base ** (-2j / d)``, j = 0 .. d/2 - 1: float64 (d/2,) on the CPU."""
    return 1.0 / (float(base) ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))


class RoPEScaling:
    """A RoPE frequency scaling. Subclasses implement :meth:`apply`.

    ``apply(inv_freq, base, rotary_dim, cur_len)`` takes the default inverse frequencies
    (float64, (rotary_dim // 2,)) and returns ``(inv_freq', attention_factor)``.
    ``cur_len`` is max position + 1 (only length-dependent scalings read it).
    """

    needs_cur_len = False

    def check(self, rotary_dim: int) -> None:
        """Validate what depends on the rotary dim (e.g. LongRoPE list lengths). No-op by default."""

    def apply(self, inv_freq: torch.Tensor, base: float, rotary_dim: int,
              cur_len: Optional[int]) -> Tuple[torch.Tensor, float]:
        raise NotImplementedError

    def _fields(self) -> dict:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._fields().items())})"


class _AtLength(RoPEScaling):
    """A length-dependent scaling evaluated at a fixed ``cur_len`` (RoPE.at_length)."""

    needs_cur_len = False

    def __init__(self, inner: RoPEScaling, cur_len: int):
        self.inner, self.cur_len = inner, cur_len

    def check(self, rotary_dim):
        self.inner.check(rotary_dim)

    def apply(self, inv_freq, base, rotary_dim, cur_len):
        return self.inner.apply(inv_freq, base, rotary_dim, self.cur_len)

    def _fields(self):
        return {"inner": self.inner, "cur_len": self.cur_len}


def _ntk_exponent(rotary_dim: int, who: str) -> float:
    # base' = base * s ** (d / (d - 2)): the exponent is undefined for d = 2.
    if rotary_dim <= 2:
        raise ValueError(f"{who} needs rotary_dim > 2 (the NTK exponent is d/(d-2)), got rotary_dim={rotary_dim}")
    return rotary_dim / (rotary_dim - 2)


class PI(RoPEScaling):
    """Position interpolation (transformers ``"linear"``): ``inv_freq / factor``; attention factor 1."""

    def __init__(self, factor: float):
        self.factor = _positive_float("factor", factor)

    def apply(self, inv_freq, base, rotary_dim, cur_len):
        return inv_freq / self.factor, 1.0

    def _fields(self):
        return {"factor": self.factor}


class NTK(RoPEScaling):
    """Static NTK-aware scaling (bloc97): ``base' = base * factor ** (d / (d - 2))``.

    Not a transformers rope type (transformers has only the dynamic variant); attention factor 1.
    """

    def __init__(self, factor: float):
        self.factor = _positive_float("factor", factor)

    def check(self, rotary_dim):
        _ntk_exponent(rotary_dim, "NTK")

    def apply(self, inv_freq, base, rotary_dim, cur_len):
        new_base = base * self.factor ** _ntk_exponent(rotary_dim, "NTK")
        return _default_inv_freq(new_base, rotary_dim), 1.0

    def _fields(self):
        return {"factor": self.factor}


class DynamicNTK(RoPEScaling):
    """Dynamic NTK scaling (transformers ``"dynamic"``).

    With ``L = max(cur_len, L0)``: ``base' = base * ((factor * L / L0) - (factor - 1)) ** (d / (d - 2))``.
    Up to ``L0`` (and for ``cur_len=None``) the frequencies are exactly the unscaled ones.
    Attention factor 1.

    Note: transformers caches the grown frequencies and only recomputes them when the sequence
    grows further (or drops back under L0); this function is the stateless version, equal to it
    whenever ``cur_len`` is the longest length seen so far.
    """

    needs_cur_len = True

    def __init__(self, factor: float, original_max_position: int):
        self.factor = _positive_float("factor", factor)
        self.original_max_position = _positive_int("original_max_position", original_max_position)

    def check(self, rotary_dim):
        _ntk_exponent(rotary_dim, "DynamicNTK")

    def apply(self, inv_freq, base, rotary_dim, cur_len):
        exponent = _ntk_exponent(rotary_dim, "DynamicNTK")
        cur_len = _cur_len(cur_len)
        L0 = self.original_max_position
        if cur_len is None or cur_len <= L0:
            # The formula gives base' = base here; return the input exactly rather than risk a
            # rounding difference from factor * L0 / L0.
            return inv_freq, 1.0
        new_base = base * ((self.factor * cur_len / L0) - (self.factor - 1)) ** exponent
        return _default_inv_freq(new_base, rotary_dim), 1.0

    def _fields(self):
        return {"factor": self.factor, "original_max_position": self.original_max_position}


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's ``get_mscale``: ``0.1 * mscale * ln(scale) + 1``, or 1 for scale <= 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


class YaRN(RoPEScaling):
    """YaRN (Peng et al. 2023; transformers ``"yarn"``).

    High-frequency dims (many rotations within ``L0``) keep their frequency, low-frequency dims are
    interpolated (``inv / factor``), with a linear ramp between the dims where a wavelength fits
    ``beta_fast`` and ``beta_slow`` times into ``L0``.

    Args:
        factor: context extension factor (> 0).
        original_max_position: ``L0``, the pretraining context length.
        beta_fast, beta_slow: ramp bounds in rotations (> 0, ``beta_fast >= beta_slow``).
        attention_factor: explicit attention factor; default derived from ``factor`` (and
            ``mscale`` / ``mscale_all_dim``, DeepSeek style, when both are non-zero).
        mscale, mscale_all_dim: ``>= 0``; 0 or None means "not given", as in transformers.
        truncate: floor/ceil the ramp bounds to whole dims (transformers' default).
    """

    def __init__(self, factor: float, original_max_position: int, beta_fast: float = 32,
                 beta_slow: float = 1, attention_factor: Optional[float] = None,
                 mscale: Optional[float] = None, mscale_all_dim: Optional[float] = None,
                 truncate: bool = True):
        self.factor = _positive_float("factor", factor)
        self.original_max_position = _positive_int("original_max_position", original_max_position)
        self.beta_fast = _positive_float("beta_fast", beta_fast)
        self.beta_slow = _positive_float("beta_slow", beta_slow)
        if self.beta_fast < self.beta_slow:
            # transformers only warns; the ramp would then run backwards (low > high).
            raise ValueError(f"beta_fast must be >= beta_slow, got beta_fast={self.beta_fast}, "
                             f"beta_slow={self.beta_slow}")
        self.attention_factor = _positive_float("attention_factor", attention_factor, allow_none=True)
        self.mscale = _nonneg_float("mscale", mscale, allow_none=True)
        self.mscale_all_dim = _nonneg_float("mscale_all_dim", mscale_all_dim, allow_none=True)
        if not isinstance(truncate, bool):
            raise TypeError(f"truncate must be a bool, got {type(truncate).__name__} {truncate!r}")
        self.truncate = truncate

    def get_attention_factor(self) -> float:
        """The logit multiplier's square root (it scales cos and sin)."""
        if self.attention_factor is not None:
            return self.attention_factor
        # Truthiness, as transformers: mscale = 0 counts as "not given".
        if self.mscale and self.mscale_all_dim:
            return (_yarn_get_mscale(self.factor, self.mscale)
                    / _yarn_get_mscale(self.factor, self.mscale_all_dim))
        return _yarn_get_mscale(self.factor)

    def correction_range(self, base: float, rotary_dim: int) -> Tuple[float, float]:
        """``(low, high)`` ramp bounds in dim-pair index, clamped to ``[0, d - 1]``."""
        d, L0 = rotary_dim, self.original_max_position

        def corr(rotations: float) -> float:
            # The pair index j whose wavelength 2*pi*base**(2j/d) fits `rotations` times into L0.
            return d * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = corr(self.beta_fast), corr(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, d - 1)

    def apply(self, inv_freq, base, rotary_dim, cur_len):
        if base == 1.0:
            raise ValueError("YaRN needs base != 1 (its correction range divides by ln(base))")
        low, high = self.correction_range(base, rotary_dim)
        if low == high:
            high += 0.001  # as transformers: avoid a zero-width ramp
        j = torch.arange(rotary_dim // 2, dtype=torch.float64)
        ramp = ((j - low) / (high - low)).clamp(0.0, 1.0)  # 0: keep (extrapolate), 1: interpolate
        inv = (inv_freq / self.factor) * ramp + inv_freq * (1.0 - ramp)
        return inv, float(self.get_attention_factor())

    def _fields(self):
        return {"factor": self.factor, "original_max_position": self.original_max_position,
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
                "attention_factor": self.attention_factor, "mscale": self.mscale,
                "mscale_all_dim": self.mscale_all_dim, "truncate": self.truncate}


class Llama3(RoPEScaling):
    """Llama 3.1 scaling (transformers ``"llama3"``): three wavelength bands.

    With ``λ = 2π / inv``: ``λ < L0 / high_freq_factor`` keeps ``inv``; ``λ > L0 / low_freq_factor``
    uses ``inv / factor``; between, ``s = (L0/λ - low) / (high - low)`` blends
    ``(1 - s) * inv / factor + s * inv``. Attention factor 1.
    """

    def __init__(self, factor: float, original_max_position: int, low_freq_factor: float = 1.0,
                 high_freq_factor: float = 4.0):
        self.factor = _positive_float("factor", factor)
        self.original_max_position = _positive_int("original_max_position", original_max_position)
        self.low_freq_factor = _positive_float("low_freq_factor", low_freq_factor)
        self.high_freq_factor = _positive_float("high_freq_factor", high_freq_factor)
        if self.high_freq_factor <= self.low_freq_factor:
            # The blend divides by (high - low).
            raise ValueError(f"high_freq_factor must be > low_freq_factor, got high_freq_factor="
                             f"{self.high_freq_factor}, low_freq_factor={self.low_freq_factor}")

    def apply(self, inv_freq, base, rotary_dim, cur_len):
        L0, f = self.original_max_position, self.factor
        lo, hi = self.low_freq_factor, self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        long_wave = wavelen > L0 / lo     # low frequency: interpolate fully
        short_wave = wavelen < L0 / hi    # high frequency: keep
        s = (L0 / wavelen - lo) / (hi - lo)
        blended = (1 - s) * inv_freq / f + s * inv_freq
        inv = torch.where(long_wave, inv_freq / f, torch.where(short_wave, inv_freq, blended))
        return inv, 1.0

    def _fields(self):
        return {"factor": self.factor, "original_max_position": self.original_max_position,
                "low_freq_factor": self.low_freq_factor, "high_freq_factor": self.high_freq_factor}


def _factor_list(name: str, values) -> torch.Tensor:
    """A LongRoPE rescale list -> float64 CPU tensor, each entry finite and > 0."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or not (values.is_floating_point() or values.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a 1-D list/tensor of numbers, got a {values.dtype} tensor of "
                            f"shape {tuple(values.shape)}")
        t = values.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        bad = [v for v in values if not _is_real(v)]
        if bad:
            raise TypeError(f"{name} must be a list of numbers, got entries {bad[:3]!r}")
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    else:
        raise TypeError(f"{name} must be a list of numbers, got {type(values).__name__}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError(f"{name} entries must be finite and > 0, got {t.tolist()}")
    return t


class LongRoPE(RoPEScaling):
    """LongRoPE (Phi-3 style; transformers ``"longrope"``): per-dim rescale factors.

    ``ext = long_factor if cur_len > L0 else short_factor`` (``cur_len=None``: short);
    ``inv'_j = inv_j / ext_j``. Both lists must have ``rotary_dim // 2`` entries (checked when the
    rotary dim is known: :meth:`check` / :meth:`apply`).

    Attention factor: ``attention_factor`` if given, else ``sqrt(1 + ln f / ln L0)`` with
    ``f = factor`` (1 if ``f <= 1`` or ``factor`` is None). :meth:`RoPE.from_hf_config` fills
    ``factor`` with ``max_position_embeddings / original_max_position_embeddings`` when the config
    has none, as transformers does.
    """

    needs_cur_len = True

    def __init__(self, short_factor, long_factor, original_max_position: int,
                 factor: Optional[float] = None, attention_factor: Optional[float] = None):
        self.short_factor = _factor_list("short_factor", short_factor)
        self.long_factor = _factor_list("long_factor", long_factor)
        self.original_max_position = _positive_int("original_max_position", original_max_position)
        self.factor = _positive_float("factor", factor, allow_none=True)
        self.attention_factor = _positive_float("attention_factor", attention_factor, allow_none=True)

    def get_attention_factor(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        f = self.factor
        if f is None or f <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(f) / math.log(self.original_max_position))

    def check(self, rotary_dim):
        for name, t in (("short_factor", self.short_factor), ("long_factor", self.long_factor)):
            if t.numel() != rotary_dim // 2:
                raise ValueError(f"LongRoPE {name} must have rotary_dim // 2 = {rotary_dim // 2} entries, "
                                 f"got {t.numel()}")

    def apply(self, inv_freq, base, rotary_dim, cur_len):
        self.check(rotary_dim)
        cur_len = _cur_len(cur_len)
        use_long = cur_len is not None and cur_len > self.original_max_position
        ext = self.long_factor if use_long else self.short_factor
        return inv_freq / ext, float(self.get_attention_factor())

    def _fields(self):
        def short(t):  # keep reprs (and test ids) readable: real models have 32-64 entries
            return t.tolist() if t.numel() <= 6 else f"<{t.numel()} values>"
        return {"short_factor": short(self.short_factor), "long_factor": short(self.long_factor),
                "original_max_position": self.original_max_position, "factor": self.factor,
                "attention_factor": self.attention_factor}


def _cfg_get(config, key: str, default=None):
    """Read ``key`` from a dict or from an attribute-style config (transformers PretrainedConfig)."""
    if isinstance(config, Mapping):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


class RoPEExtension:
    """A training-free context extension by remapped RoPE positions (ReRoPE, leaky ReRoPE,
    Self-Extend, Dual Chunk Attention). Causal attention only (the methods are defined for
    decoders). ``posattn.RoPE(..., extend=...)`` takes one.

    Every (query, key) pair falls in one *region* by ``g = q_pos // unit - k_pos // unit``
    (floor division; ``unit`` 1 for the distance methods, the chunk length for DCA): region 0,
    ``g < window``, keeps the model's RoPE as trained; the pairs beyond are the *far* regions,
    ``n_far`` of them (region ``min(g - window + 1, n_far)``), each attended with the query
    rotated at :meth:`far_positions` (``piece`` = region - 1) and the key at its far position
    (the same for every far region), with the model's frequencies times ``freq_scale``.
    Subclasses say which positions: the affine ones by :meth:`far_map`.
    """

    window: int
    unit = 1  # positions are grouped by floor(pos / unit) for the regions
    n_far = 1  # how many far regions (each its own query rotation)

    @property
    def freq_scale(self) -> float:
        """The far rotations' frequencies are the model's times this (far_map's last entry)."""
        return float(self.far_map()[5])

    def far_map(self) -> Tuple[int, int, int, int, int, float]:
        """(a_q, b_q, a_k, b_k, group, freq_scale): far positions ``(a pos + b) // group`` (one
        far region; integers but the last)."""
        raise NotImplementedError

    def key_map(self) -> Tuple[int, int, int, int]:
        """(a, b, group, mod) of the keys' far position ``((a pos + b) // group) mod mod``
        (mod 0: none): what a kernel needs to rotate a key at its far position in the tile."""
        _, _, a_k, b_k, group, _ = self.far_map()
        return a_k, b_k, group, 0

    def far_positions(self, pos: torch.Tensor, query: bool, piece: int = 0) -> torch.Tensor:
        """The far rotation's positions of integer ``pos`` (int64, floor division): a key's, or
        a query's in far region ``piece + 1``."""
        a_q, b_q, a_k, b_k, group, _ = self.far_map()
        a, b = (a_q, b_q) if query else (a_k, b_k)
        return torch.div(a * pos.to(torch.int64) + b, group, rounding_mode="floor")

    def region(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """The region (0: near, 1 .. n_far: far) of every pair of broadcast int64 positions."""
        u = self.unit
        g = (torch.div(q_pos, u, rounding_mode="floor") - torch.div(k_pos, u, rounding_mode="floor"))
        return (g - self.window + 1).clamp(0, self.n_far)

    def piece_mask(self, r: int):
        """Region ``r`` as a mask an attention call already has: ``(vis, left, right)`` such
        that a causal pair is in region r iff ``v(q) - left <= v(k) <= v(q) + right`` (None:
        unbounded), with ``v = vis`` (a function of int64 positions; None: the positions
        themselves). For ``unit`` 1 that is a window on the distance. Otherwise v(p) =
        2 unit (p // unit) + p mod unit spreads the chunks apart, so that v(q) - v(k) =
        2 unit g + (q mod unit - k mod unit) lies in a range of its own for every g; v keeps
        the order of positions (causal masks are unchanged) and the distance of two
        positions in one chunk (a rotation at v(p) is the model's RoPE inside a chunk)."""
        u = self.unit
        g_lo = None if r == 0 else self.window + r - 1  # region r: g_lo <= g < g_hi
        g_hi = None if r == self.n_far else self.window + r
        if u == 1:
            return (None, None if g_hi is None else g_hi - 1,
                    None if g_lo is None else -g_lo)

        def vis(p):
            p = p.to(torch.int64)
            return 2 * u * torch.div(p, u, rounding_mode="floor") + torch.remainder(p, u)

        return (vis, None if g_hi is None else 2 * u * (g_hi - 1) + u - 1,
                None if g_lo is None else -(2 * u * g_lo - u + 1))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class ReRoPE(RoPEExtension):
    """ReRoPE (Su, 2023, kexue.fm/archives/9708; bojone/rerope): relative position
    ``min(q - k, window)``. Keys at least ``window`` back are attended with the query rotated
    at ``window`` and the key not rotated, the reference code's second pass."""

    def __init__(self, window: int):
        self.window = _positive_int("window", window)

    def far_map(self):
        return 0, self.window, 0, 0, 1, 1.0


class LeakyReRoPE(RoPEExtension):
    """Leaky ReRoPE (Su, 2023; bojone/rerope's leaky patch): relative position ``q - k`` below
    ``window`` and ``window + (q - k - window) / factor`` beyond, the far pass rotating the
    query at ``q + window (factor - 1)`` and the key at ``k``, both with the frequencies
    divided by ``factor`` (its linearly scaled RoPE). ``factor``: an integer >= 2 (16 in the
    reference code), so that every far position is an integer."""

    def __init__(self, window: int, factor: int = 16):
        self.window = _positive_int("window", window)
        self.factor = _positive_int("factor", factor)
        if self.factor < 2:
            raise ValueError(f"factor must be >= 2 (1 is plain RoPE), got {self.factor}")

    def far_map(self):
        return 1, self.window * (self.factor - 1), 1, 0, 1, 1.0 / self.factor


class SelfExtend(RoPEExtension):
    """Self-Extend (Jin et al. 2024, "LLM Maybe LongLM", arXiv 2401.01325; datamllab/LongLM):
    neighbour attention with the model's positions for ``q - k < window``, grouped attention
    beyond: the key at ``k // group``, the query at ``q // group + window - window // group``
    (the shift that makes the two regions meet at the window's edge), the frequencies
    unchanged."""

    def __init__(self, group: int, window: int):
        self.group = _positive_int("group", group)
        self.window = _positive_int("window", window)
        if self.group < 2:
            raise ValueError(f"group must be >= 2 (1 is plain RoPE), got {self.group}")

    def far_map(self):
        G, W = self.group, self.window
        # q // G + W - W // G == (q + G (W - W // G)) // G: one floor division
        return 1, G * (W - W // G), 1, 0, G, 1.0


class DualChunk(RoPEExtension):
    """Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of Large
    Language Models", arXiv 2402.17463, section 3; HKUNLP/ChunkLlama's reference code).

    Positions are cut into chunks of ``chunk_len = chunk_size - local_window``; every key is
    rotated at ``k mod chunk_len``. A query attends to the keys of its own chunk with relative
    positions as trained (intra-chunk: it sits at ``q mod chunk_len``), to the previous chunk's
    keys rotated at ``min(q mod chunk_len + chunk_len, chunk_size)`` (successive-chunk), and
    to every older key at ``min(2 chunk_len - 1, chunk_size)`` (inter-chunk): no relative
    position exceeds ``chunk_size``. The authors' defaults for a model trained on ``n``
    positions: :meth:`for_trained_length`. Regions go by chunk index, not distance (a key
    one position back is in the previous chunk when the query opens a chunk).
    """

    window = 1  # region 0: the query's own chunk (g = 0)
    n_far = 2  # successive (g = 1), inter (g >= 2)
    freq_scale = 1.0  # (no far_map: its positions are not affine)

    def __init__(self, chunk_size: int, local_window: int):
        self.chunk_size = _positive_int("chunk_size", chunk_size)
        if isinstance(local_window, bool) or not isinstance(local_window, numbers.Integral):
            raise TypeError(f"local_window must be an int, got {type(local_window).__name__} "
                            f"{local_window!r}")
        self.local_window = int(local_window)
        if not 0 <= self.local_window < self.chunk_size:
            raise ValueError(f"local_window must be in [0, chunk_size={self.chunk_size}), "
                             f"got {self.local_window}")

    @property
    def unit(self) -> int:
        """chunk_len = chunk_size - local_window: the regions' unit."""
        return self.chunk_size - self.local_window

    @classmethod
    def for_trained_length(cls, n: int, local_window: Optional[int] = None) -> "DualChunk":
        """ChunkLlama's choice for a model trained on ``n`` positions: chunk_size = 3n // 4,
        local_window = n // 16 unless given."""
        n = _positive_int("n", n)
        return cls(3 * n // 4, n // 16 if local_window is None else local_window)

    def key_map(self):
        return 1, 0, 1, self.unit

    def far_positions(self, pos, query, piece=0):
        L, C = self.unit, self.chunk_size
        k = torch.remainder(pos.to(torch.int64), L)
        if not query:
            return k
        if piece == 0:  # successive chunk
            return torch.clamp(k + L, max=C)
        return torch.full_like(k, min(2 * L - 1, C))  # inter chunk


class RoPE(PE):
    """Rotary position embedding.

    Args:
        base: rope_theta (finite, > 1).
        scaling: ``None`` or a :class:`RoPEScaling` (PI, NTK, DynamicNTK, YaRN, Llama3, LongRoPE).
        rotary_dim: number of leading head dims rotated (even, <= head_dim); ``None`` = head_dim.
        interleaved: ``False`` = GPT-NeoX/Llama half-split pairs (j, j + d/2);
            ``True`` = GPT-J interleaved pairs (2j, 2j + 1).
        extend: ``None`` or a :class:`RoPEExtension` (ReRoPE, LeakyReRoPE, SelfExtend,
            DualChunk): remapped positions for the keys beyond its window or chunk (causal attention; every
            backend and ring attention, gradients included; not yet torch.compile).
    """

    rotary = "rope"
    tile_family = "rope"
    xpos = False  # XPos: RoPE with a per-pair decay (kernels: the XPOS constexpr)

    name = "rope"

    def __init__(self, base: float = 10000.0, scaling: Optional[RoPEScaling] = None,
                 rotary_dim: Optional[int] = None, interleaved: bool = False,
                 extend: Optional[RoPEExtension] = None):
        if extend is not None and not isinstance(extend, RoPEExtension):
            raise TypeError(f"extend must be None or a RoPEExtension (ReRoPE, LeakyReRoPE, "
                            f"SelfExtend, DualChunk), got {type(extend).__name__}")
        self.extend = extend
        # base <= 1 would make wavelengths shrink with the dim index (and YaRN divides by ln base).
        self.base = _positive_float("base", base, minimum_exclusive=1.0)
        if scaling is not None and not isinstance(scaling, RoPEScaling):
            raise TypeError(f"scaling must be None or a RoPEScaling (PI, NTK, DynamicNTK, YaRN, Llama3, "
                            f"LongRoPE), got {type(scaling).__name__}")
        self.scaling = scaling
        if rotary_dim is not None and (isinstance(rotary_dim, bool) or not isinstance(rotary_dim, numbers.Integral)):
            raise TypeError(f"rotary_dim must be an int or None, got {type(rotary_dim).__name__} {rotary_dim!r}")
        # Its value (even, <= head_dim) is checked against the head dim in resolve_rotary_dim / check.
        self.rotary_dim = None if rotary_dim is None else int(rotary_dim)
        self.interleaved = bool(interleaved)

    @property
    def needs_cur_len(self) -> bool:
        return self.scaling is not None and self.scaling.needs_cur_len

    def resolve_rotary_dim(self, head_dim: int) -> int:
        d = head_dim if self.rotary_dim is None else self.rotary_dim
        if d <= 0 or d % 2 or d > head_dim:
            raise ValueError(f"rotary_dim must be even and in [2, head_dim={head_dim}], got {d}")
        return d

    def with_extend(self, extend: Optional[RoPEExtension]) -> "RoPE":
        """This RoPE with another extension (None: none), everything else the same."""
        return RoPE(self.base, self.scaling, self.rotary_dim, self.interleaved, extend)

    def check_mask(self, causal: bool, window=None) -> None:
        """An extension (ReRoPE, Self-Extend, DCA) is defined for causal attention only; DCA's
        chunk regions take no sliding window (its backward masks by chunk, not distance)."""
        if self.extend is not None and not causal:
            raise ValueError(f"RoPE(extend={self.extend!r}) needs causal=True: the method is "
                             f"defined for decoders (keys at or before their query)")
        if self.extend is not None and self.extend.unit > 1 and window is not None:
            raise ValueError(f"RoPE(extend={self.extend!r}) takes no window (got window="
                             f"{window!r}): its regions are chunks, not distances")

    def check(self, num_heads: int, head_dim: int, device: torch.device) -> None:
        """rotary_dim even and <= head_dim; scaling parameters that depend on it (LongRoPE lists)."""
        _check_dims(num_heads, head_dim)
        d = self.resolve_rotary_dim(head_dim)
        if self.scaling is not None:
            self.scaling.check(d)

    def frequencies(self, head_dim: int, cur_len: Optional[int] = None) -> Tuple[torch.Tensor, float]:
        """Return ``(inv_freq float64 (rotary_dim // 2,), attention_factor)`` on the CPU.

        ``cur_len`` = max position + 1; read only by DynamicNTK and LongRoPE (None: unscaled /
        short factors).
        """
        d = self.resolve_rotary_dim(head_dim)
        inv = _default_inv_freq(self.base, d)
        if self.scaling is None:
            return inv, 1.0
        self.scaling.check(d)
        inv, factor = self.scaling.apply(inv, self.base, d, cur_len)
        return inv, float(factor)

    def at_length(self, cur_len: int) -> "RoPE":
        """This RoPE with a length-dependent scaling (DynamicNTK, LongRoPE) frozen at
        ``cur_len`` (max position + 1): its frequencies no longer depend on the positions of
        a call. For a caller that attends in pieces (ring attention over shards, a KV cache
        read in chunks) and must rotate every piece as the whole sequence would be. Specs
        without such a scaling are returned unchanged."""
        if not self.needs_cur_len:
            return self
        cur_len = _positive_int("cur_len", cur_len)
        return RoPE(self.base, _AtLength(self.scaling, cur_len), self.rotary_dim, self.interleaved,
                    self.extend)

    @classmethod
    def from_hf_config(cls, config, *, layer_type: Optional[str] = None,
                       interleaved: Optional[bool] = None) -> "RoPE":
        """Build the RoPE spec of a Hugging Face transformers model config.

        ``config``: a ``PretrainedConfig``-like object (attributes) or a plain dict (``config.json``).
        Reads ``rope_parameters`` (transformers >= 5) or ``rope_scaling`` (older), with ``rope_type``
        or the legacy ``type`` key (default / linear / dynamic / yarn / llama3 / longrope);
        ``rope_theta`` (inside the RoPE dict or at top level, default 10000); ``head_dim`` (or
        ``hidden_size // num_attention_heads``) and ``partial_rotary_factor`` (GPT-NeoX:
        ``rotary_pct``), giving ``rotary_dim = int(head_dim * partial_rotary_factor)``; without one,
        a GPT-J style ``rotary_dim`` is read, else the whole head is rotated.

        ``L0`` follows transformers: for dynamic it is ``max_position_embeddings``; for yarn /
        llama3 / longrope a top-level ``original_max_position_embeddings`` (Phi-3 style) wins, then
        the RoPE dict's, then ``max_position_embeddings``.

        Args:
            layer_type: for per-layer RoPE dicts (e.g. ``{"full_attention": {...},
                "sliding_attention": {...}}``), which one to read.
            interleaved: pair layout; None reads the config's ``rope_interleave``, else True only
                for ``model_type == "gptj"`` (Llama-family models use the half-split layout).
                Multi-head latent attention (DeepSeek-V2/V3) rotates only ``qk_rope_head_dim``: pass
                a config whose ``head_dim`` is that (transformers' config objects already do).
        """
        rope = _cfg_get(config, "rope_parameters") or _cfg_get(config, "rope_scaling") or {}
        if not isinstance(rope, Mapping):
            raise TypeError(f"config rope_parameters / rope_scaling must be a dict, got {type(rope).__name__}")
        nested = [k for k, v in rope.items() if isinstance(v, Mapping)]
        if nested:
            if layer_type is None:
                raise ValueError(f"config has per-layer RoPE parameters {sorted(nested)}; pass layer_type=")
            if layer_type not in rope:
                raise ValueError(f"layer_type {layer_type!r} not in the config's RoPE parameters {sorted(nested)}")
            rope = rope[layer_type] or {}
        elif layer_type is not None:
            raise ValueError(f"layer_type={layer_type!r} given but the config's RoPE parameters are not per layer")

        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type == "su":  # Phi-3's early name for LongRoPE
            rope_type = "longrope"

        base = rope.get("rope_theta")
        if base is None:
            base = _cfg_get(config, "rope_theta", _cfg_get(config, "default_theta", 10000.0))

        head_dim = _cfg_get(config, "head_dim")
        if head_dim is None:
            # GPT-2 / GPT-J config.json spell them n_embd / n_head.
            hidden = _cfg_get(config, "hidden_size", _cfg_get(config, "n_embd"))
            heads = _cfg_get(config, "num_attention_heads", _cfg_get(config, "n_head"))
            if hidden is None or heads is None:
                raise ValueError("config needs head_dim, or hidden_size and num_attention_heads")
            head_dim = _positive_int("hidden_size", hidden) // _positive_int("num_attention_heads", heads)
        head_dim = _positive_int("head_dim", head_dim)
        partial = rope.get("partial_rotary_factor")
        if partial is None:
            partial = _cfg_get(config, "partial_rotary_factor")
        if partial is None:
            partial = _cfg_get(config, "rotary_pct")  # GPT-NeoX's name for it in config.json
        if partial is not None:
            partial = _positive_float("partial_rotary_factor", partial)
            rotary_dim = int(head_dim * partial)
            if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
                raise ValueError(f"partial_rotary_factor={partial} with head_dim={head_dim} gives rotary_dim="
                                 f"{rotary_dim}; it must be even and in [2, head_dim]")
        else:
            # GPT-J stores the rotated width itself.
            rotary_dim = _positive_int("rotary_dim", _cfg_get(config, "rotary_dim", head_dim))
            if rotary_dim % 2 or rotary_dim > head_dim:
                raise ValueError(f"config rotary_dim={rotary_dim} must be even and <= head_dim={head_dim}")

        max_pos = _cfg_get(config, "max_position_embeddings")

        def orig_max() -> int:
            value = _cfg_get(config, "original_max_position_embeddings")
            if value is None:
                value = rope.get("original_max_position_embeddings")
            if value is None:
                value = max_pos
            if value is None:
                raise ValueError(f"rope_type {rope_type!r} needs original_max_position_embeddings or "
                                 f"max_position_embeddings in the config")
            return _positive_int("original_max_position_embeddings", value)

        def factor_or_ratio(L0: int) -> Optional[float]:
            # DeepSeek-V3 / Phi-3: with no explicit factor, the extension ratio is max / original.
            f = rope.get("factor")
            if f is None and max_pos is not None:
                f = _positive_int("max_position_embeddings", max_pos) / L0
            return f

        scaling: Optional[RoPEScaling]
        if rope_type == "default":
            scaling = None
        elif rope_type == "linear":
            scaling = PI(rope.get("factor"))
        elif rope_type == "dynamic":
            # transformers' dynamic NTK measures growth against max_position_embeddings.
            L0 = max_pos if max_pos is not None else rope.get("original_max_position_embeddings")
            if L0 is None:
                raise ValueError("rope_type 'dynamic' needs max_position_embeddings in the config")
            scaling = DynamicNTK(rope.get("factor"), L0)
        elif rope_type == "yarn":
            L0 = orig_max()
            f = factor_or_ratio(L0)
            if f is None:
                raise ValueError("rope_type 'yarn' needs factor (or max_position_embeddings) in the config")
            truncate = rope.get("truncate")
            scaling = YaRN(f, L0,
                           beta_fast=rope.get("beta_fast") or 32,  # `or`: transformers treats 0 as unset
                           beta_slow=rope.get("beta_slow") or 1,
                           attention_factor=rope.get("attention_factor"),
                           mscale=rope.get("mscale"), mscale_all_dim=rope.get("mscale_all_dim"),
                           truncate=True if truncate is None else truncate)
        elif rope_type == "llama3":
            scaling = Llama3(rope.get("factor"), orig_max(),
                             low_freq_factor=rope.get("low_freq_factor", 1.0),
                             high_freq_factor=rope.get("high_freq_factor", 4.0))
        elif rope_type == "longrope":
            L0 = orig_max()
            scaling = LongRoPE(rope.get("short_factor"), rope.get("long_factor"), L0,
                               factor=factor_or_ratio(L0), attention_factor=rope.get("attention_factor"))
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, linear, dynamic, yarn, "
                             f"llama3, longrope")

        if interleaved is None:
            # GPT-J rotates interleaved pairs; DeepSeek-V3-style configs say so with rope_interleave.
            interleaved = bool(_cfg_get(config, "rope_interleave", _cfg_get(config, "model_type") == "gptj"))
        spec = cls(base=base, scaling=scaling, rotary_dim=None if rotary_dim == head_dim else rotary_dim,
                   interleaved=interleaved)
        if scaling is not None:
            scaling.check(rotary_dim)  # e.g. LongRoPE list lengths vs the config's head dim
        return spec

    def __repr__(self) -> str:
        return (f"RoPE(base={self.base}, scaling={self.scaling!r}, rotary_dim={self.rotary_dim}, "
                f"interleaved={self.interleaved})")


# --------------------------------------------------------------------------------------------
# Bias PEs
# --------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes (float64, (num_heads,)) by the paper's rule, non-powers of two included.

    For n a power of two: ``2 ** (-8 h / n)``, h = 1..n. Otherwise, with c the largest power of two
    below n: the slopes for c, then every other slope for 2c, the first n - c of them.
    """

    def pow2(n: int):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    num_heads = _positive_int("num_heads", num_heads)
    c = 2 ** int(math.floor(math.log2(num_heads)))
    s = pow2(c)
    if c != num_heads:
        s = s + pow2(2 * c)[0::2][: num_heads - c]
    return torch.tensor(s, dtype=torch.float64)



class XPos(RoPE):
    """xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer", arXiv 2212.10554, section
    3.2; microsoft/torchscale's XPOS): RoPE whose pair j of a query at q and a key at k is also
    scaled by ``zeta_j ** ((q - k) / scale_base)``, ``zeta_j = (2j / d + 0.4) / 1.4`` (d the
    rotary dim): attention decays with distance, more in the fast-rotating pairs. Causal
    attention only (a ValueError otherwise: the factor grows for keys after the query).
    Half-split pairs by default, as posattn.RoPE; ``interleaved=True`` pairs dims as
    torchscale does (for its checkpoints). RoPE's scalings apply to its angles. The kernels take the factor relative to each block (never overflowing at any
    position); with explicit positions a block of rows (up to 128) must span at most
    :attr:`EXPLICIT_SPAN` positions for its dtype (checked, a ValueError).
    """

    xpos = True
    causal_only = True
    name = "xpos"
    # explicit positions: the largest span of positions in 128 consecutive rows the Triton
    # kernels take (their factors zeta_0 ** (+-span / scale_base) must stay well inside the
    # input dtype's normal range: fp16 2**+-8, bf16 / fp32 2**+-64), at scale_base 512
    EXPLICIT_SPAN = {torch.float16: 2048, torch.bfloat16: 16384, torch.float32: 16384}

    def __init__(self, base: float = 10000.0, scale_base: float = 512.0,
                 scaling: Optional[RoPEScaling] = None, rotary_dim: Optional[int] = None,
                 interleaved: bool = False):
        super().__init__(base, scaling, rotary_dim, interleaved)
        self.scale_base = _positive_float("scale_base", scale_base)

    def decay(self, head_dim: int) -> torch.Tensor:
        """log2(zeta_j) / scale_base, float64 (rotary_dim // 2,)."""
        d = self.resolve_rotary_dim(head_dim)
        zeta = (torch.arange(0, d, 2, dtype=torch.float64) + 0.4 * d) / (1.4 * d)
        return torch.log2(zeta) / self.scale_base

    def max_span(self, dtype: torch.dtype) -> int:
        """The explicit-position span per block the kernels take (EXPLICIT_SPAN, scaled to
        this scale_base)."""
        return int(self.EXPLICIT_SPAN.get(dtype, 16384) * self.scale_base / 512.0)

    def check_mask(self, causal: bool, window=None) -> None:
        if not causal:
            raise ValueError("XPos needs causal=True: its factor zeta^((q - k) / scale_base) "
                             "grows without bound for keys after the query")

    def with_extend(self, extend):
        if extend is not None:
            raise ValueError("XPos takes no RoPE extension")
        return self

    def __repr__(self) -> str:
        return (f"XPos(base={self.base}, scale_base={self.scale_base}, scaling={self.scaling!r}, "
                f"rotary_dim={self.rotary_dim}, interleaved={self.interleaved})")

    def at_length(self, cur_len: int) -> "XPos":
        if not self.needs_cur_len:
            return self
        return XPos(self.base, self.scale_base, _AtLength(self.scaling, _positive_int("cur_len", cur_len)),
                    self.rotary_dim, self.interleaved)


class ALiBi(PE):
    """ALiBi: bias ``-slope[h] * |q_pos - k_pos|`` added to the scaled logits.

    Args:
        slopes: ``None`` (the paper's slopes for the query head count) or a floating tensor (Hq,)
            on the inputs' device, which may require grad (trainable ALiBi).
    """

    name = "alibi"
    bias = "alibi"
    tile_family = "alibi"

    def __init__(self, slopes: Optional[torch.Tensor] = None):
        if slopes is not None:
            if not isinstance(slopes, torch.Tensor):
                raise TypeError(f"slopes must be None or a floating torch.Tensor (num_heads,), "
                                f"got {type(slopes).__name__}")
            _check_tensor_type("slopes", slopes)
        self.slopes = slopes

    def check(self, num_heads: int, head_dim: int, device: torch.device) -> None:
        """User slopes: floating, shape exactly (num_heads,), on ``device``, finite."""
        _check_dims(num_heads, head_dim)
        if self.slopes is not None:
            _check_head_vector("slopes", self.slopes, num_heads, device, positive=False)

    def get_slopes(self, num_heads: int, device) -> torch.Tensor:
        """(num_heads,) slopes: the paper's in fp32 on ``device``, or the user tensor as is (autograd)."""
        if self.slopes is None:
            return alibi_slopes(num_heads).to(device=device, dtype=torch.float32)
        return self.slopes

    def bias_params(self, num_heads: int, device) -> torch.Tensor:
        return self.get_slopes(num_heads, device)[:, None]

    def reference_bias(self, num_heads: int, rel: torch.Tensor) -> torch.Tensor:
        slopes = self.get_slopes(num_heads, rel.device).to(rel.dtype)
        return -slopes[:, None, None] * rel.abs()

    def tensors(self):
        return () if self.slopes is None else (self.slopes,)

    def __repr__(self) -> str:
        if self.slopes is None:
            return "ALiBi()"
        return f"ALiBi(slopes=<tensor {tuple(self.slopes.shape)} {self.slopes.dtype}>)"


_KERPLE_KINDS = ("log", "power")


def _kerple_param(name: str, x):
    if isinstance(x, torch.Tensor):
        _check_tensor_type(name, x)
        return x
    return _positive_float(name, x)


class KERPLE(PE):
    """KERPLE bias (Chi et al. 2022), per query head.

    kind="log":   ``-r1 * log(1 + r2 * |Δ|)``;  kind="power": ``-r1 * |Δ| ** r2``.
    ``r1``/``r2``: a float (same for every head) or a floating tensor (Hq,) that may require grad;
    both must be > 0 (the kernel family is conditionally positive definite only then).
    For trainable parameters initialised and clamped like the paper's code see
    :class:`posattn.nn.KERPLEBias`.
    """

    name = "kerple"
    tile_family = "kerple"

    def __init__(self, kind: str = "log", r1: Union[Number, torch.Tensor] = 1.0,
                 r2: Union[Number, torch.Tensor] = 1.0):
        if kind not in _KERPLE_KINDS:
            raise ValueError(f"kind must be one of {_KERPLE_KINDS}, got {kind!r}")
        self.kind = kind
        self.r1 = _kerple_param("r1", r1)
        self.r2 = _kerple_param("r2", r2)

    def check(self, num_heads: int, head_dim: int, device: torch.device) -> None:
        """kind valid; tensor r1 / r2: floating, shape exactly (num_heads,), on ``device``, finite, > 0."""
        _check_dims(num_heads, head_dim)
        if self.kind not in _KERPLE_KINDS:
            raise ValueError(f"kind must be one of {_KERPLE_KINDS}, got {self.kind!r}")
        for name in ("r1", "r2"):
            x = getattr(self, name)
            if isinstance(x, torch.Tensor):
                _check_head_vector(name, x, num_heads, device, positive=True)
            else:
                _positive_float(name, x)

    def get_params(self, num_heads: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(r1, r2)``, each (num_heads,): floats expanded to fp32 on ``device``; tensors as is."""
        def as_tensor(x):
            if isinstance(x, torch.Tensor):
                return x
            return torch.full((num_heads,), float(x), device=device, dtype=torch.float32)
        return as_tensor(self.r1), as_tensor(self.r2)

    @property
    def bias(self) -> str:  # the kernel's bias kind: "kerple_log" or "kerple_power"
        return "kerple_" + self.kind

    def bias_params(self, num_heads: int, device) -> torch.Tensor:
        r1, r2 = self.get_params(num_heads, device)
        return torch.stack((r1, r2.to(r1.dtype)), dim=1)

    def tensors(self):
        return tuple(x for x in (self.r1, self.r2) if isinstance(x, torch.Tensor))

    def reference_bias(self, num_heads: int, rel: torch.Tensor) -> torch.Tensor:
        dist = rel.abs()
        r1, r2 = (t.to(dist.dtype)[:, None, None] for t in self.get_params(num_heads, dist.device))
        if self.kind == "log":
            return -r1 * torch.log1p(r2 * dist)
        # |d|**r2 written as exp(r2 log|d|) away from 0, and 0 at d = 0, so d/dr2 stays finite there.
        pos = dist > 0
        logd = torch.log(torch.where(pos, dist, torch.ones_like(dist)))
        return -r1 * torch.where(pos, torch.exp(r2 * logd), torch.zeros_like(dist))

    def __repr__(self) -> str:
        def show(x):
            return f"<tensor {tuple(x.shape)} {x.dtype}>" if isinstance(x, torch.Tensor) else repr(x)
        return f"KERPLE(kind={self.kind!r}, r1={show(self.r1)}, r2={show(self.r2)})"


def t5_bucket(rel: torch.Tensor, num_buckets: int = 32, bidirectional: bool = True,
              max_distance: int = 128) -> torch.Tensor:
    """T5's relative-position bucket of ``rel = k_pos - q_pos`` (any integer tensor) -> int64.

    The rule of Raffel et al. as transformers' ``T5Attention._relative_position_bucket``
    computes it (its checkpoints were trained with exactly these buckets, float32 log
    included): bidirectional halves the buckets by sign (keys after the query, rel > 0, take
    the upper half); unidirectional (a decoder) maps every key after the query to bucket 0
    and uses n = -rel otherwise. Of a half's n_b buckets the first n_b / 2 are exact
    distances, the rest log-spaced up to ``max_distance``, the last one for everything
    beyond.
    """
    rel = rel.to(torch.int64)
    out = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out = out + (rel > 0).to(torch.int64) * num_buckets
        n = rel.abs()
    else:
        n = (-rel).clamp_min(0)
    exact = num_buckets // 2
    # float32, as the reference implementation: a bucket edge is where its rounding puts it
    ratio = torch.log(n.float() / exact) / math.log(max_distance / exact)
    large = exact + (ratio * (num_buckets - exact)).to(torch.int64)
    large = large.clamp_max(num_buckets - 1)
    return out + torch.where(n < exact, n, large)


class T5Bias(PE):
    """T5's bucketed relative-position bias (Raffel et al. 2020): ``table[h, bucket(k - q)]``
    added to the logits, with :func:`t5_bucket`'s buckets.

    Args:
        table: floating tensor (num_heads, num_buckets) on the inputs' device, learnable (its
            gradient is returned, deterministically): T5's ``relative_attention_bias.weight``
            transposed (``.weight.T``: that is (num_buckets, H)).
        bidirectional: encoder-style buckets (True) or decoder-style (False: every key after
            the query shares bucket 0).
        max_distance: distances at or beyond it share the last bucket.

    T5 does not scale its logits: pass ``scale=1.0`` to reproduce a T5 model. In the kernels
    the bias is a table lookup per score (no log per element), so it costs about what KERPLE
    with its distance table costs.
    """

    name = "t5"
    bias = "t5"
    tile_family = "table"  # KERPLE's tiles (a table read per score), but for one (configs.py)

    def __init__(self, table: torch.Tensor, bidirectional: bool = True, max_distance: int = 128):
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"table must be a floating torch.Tensor (num_heads, num_buckets), "
                            f"got {type(table).__name__}")
        _check_tensor_type("table", table)
        if table.dim() != 2 or table.shape[1] < 2:
            raise ValueError(f"table must be 2-D (num_heads, num_buckets) with num_buckets >= 2, "
                             f"got shape {tuple(table.shape)}")
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
        self.table = table
        self.bidirectional = bidirectional
        self.max_distance = _positive_int("max_distance", max_distance)
        half = table.shape[1] // 2 if bidirectional else table.shape[1]
        if half < 2:
            raise ValueError(f"table has {table.shape[1]} buckets: too few for bidirectional={bidirectional} "
                             f"(each direction needs >= 2)")
        if self.max_distance <= half // 2:
            raise ValueError(f"max_distance={self.max_distance} must exceed the exact buckets "
                             f"({half // 2} per direction)")

    @property
    def num_buckets(self) -> int:
        return self.table.shape[1]

    def check(self, num_heads: int, head_dim: int, device: torch.device) -> None:
        """table: floating, shape (num_heads, num_buckets), on ``device``, finite."""
        _check_dims(num_heads, head_dim)
        t = self.table
        if t.shape[0] != num_heads:
            raise ValueError(f"table must have shape (num_heads, num_buckets) = ({num_heads}, "
                             f"{t.shape[1]}), got {tuple(t.shape)}")
        if not _same_device(t.device, device):
            raise ValueError(f"table must be on the inputs' device {torch.device(device)}, got {t.device}")
        if not _all_true(torch.isfinite(t.detach())):
            raise ValueError("table must be finite")

    def radius(self) -> int:
        """R: every |k - q| >= R has the bucket of +-R (the buckets saturate at max_distance;
        the exact buckets end below it, so R = max_distance suffices)."""
        return self.max_distance

    def bias_buckets(self) -> torch.Tensor:
        R = self.radius()
        rel = torch.arange(-R, R + 1, dtype=torch.int64)
        return t5_bucket(rel, self.num_buckets, self.bidirectional, self.max_distance)

    def bias_params(self, num_heads: int, device) -> torch.Tensor:
        return self.table

    def tensors(self):
        return (self.table,)

    def reference_bias(self, num_heads: int, rel: torch.Tensor) -> torch.Tensor:
        # rel is an integer difference cast to the math dtype: exact up to 2**24 in fp32, and
        # every larger distance is in the last bucket anyway
        b = t5_bucket(rel.round().to(torch.int64), self.num_buckets, self.bidirectional,
                      self.max_distance)  # (B, 1, Sq, Sk)
        return self.table.to(rel.dtype)[:, b[:, 0]].transpose(0, 1)  # (B, H, Sq, Sk)

    def __repr__(self) -> str:
        return (f"T5Bias(table=<tensor {tuple(self.table.shape)} {self.table.dtype}>, "
                f"bidirectional={self.bidirectional}, max_distance={self.max_distance})")


class Sandwich(PE):
    """Sandwich (Chi, Fan, Rudnicky, Ramadge, ACL 2023, arXiv 2212.10356): the parameter-free
    bias ``a_h * p_q . p_k``, the dot product of two sinusoidal position embeddings of
    ``d_bar`` dimensions, shifted so that it is 0 at distance 0:

        bias_h(q, k) = a_h * (sum_{i=0}^{d_bar/2 - 1} cos((k - q) * base ** (-2 i / d_bar)) - d_bar / 2),
        a_h = H / (8 h),  h = 1 .. H.

    The sum is the paper's reference construction (its appendix E, as attention-gym's
    ``sandwich`` score mod and its test reproduce it): ALiBi's head factor ``8 h / H`` applied
    as a divisor; ``d_bar`` is the method's own hyperparameter, not the head dim (the paper
    uses 128). The ``- d_bar / 2`` is NeMo's: a constant per row, so the attention is the
    paper's exactly and only the returned LSE differs (by ``a_h d_bar / 2``). It keeps every
    logit near its query small, as for every bias here (0 at distance 0, ``-2 a_h d_bar`` at
    worst): the forward and the backward then round the logits that carry the softmax alike.
    (NeMo also sums i = 1 .. d/2, one octave off the paper's frequencies; this follows the
    paper.) Not monotone in the distance, so never centred on the nearest key; the kernels
    read it from a per-distance table (O(max distance) floats, one row for every head).

    Args:
        d_bar: even embedding width (default 128).
        base: the sinusoids' base (default 10000).
    """

    name = "sandwich"
    bias = "sandwich"
    tile_family = "table"  # T5's tiles: one clamped table read per score, the same work

    def __init__(self, d_bar: int = 128, base: float = 10000.0):
        self.d_bar = _positive_int("d_bar", d_bar)
        if self.d_bar % 2:
            raise ValueError(f"d_bar must be even, got {self.d_bar}")
        self.base = _positive_float("base", base, minimum_exclusive=1.0)

    def frequencies(self) -> torch.Tensor:
        """(d_bar / 2,) float64: base ** (-2 i / d_bar), i = 0 .. d_bar/2 - 1."""
        return _default_inv_freq(self.base, self.d_bar)

    @staticmethod
    def head_scales(num_heads: int) -> torch.Tensor:
        """(num_heads,) float64: a_h = H / (8 h), h = 1 .. H."""
        num_heads = _positive_int("num_heads", num_heads)
        h = torch.arange(1, num_heads + 1, dtype=torch.float64)
        return num_heads / (8.0 * h)

    def check(self, num_heads: int, head_dim: int, device: torch.device) -> None:
        _check_dims(num_heads, head_dim)

    def bias_params(self, num_heads: int, device) -> torch.Tensor:
        """(H, 1 + d_bar/2) float64: a_h, then the frequencies (the kernels' distance table is
        made from them: kernels/bias.py, "Sandwich")."""
        w = self.frequencies()
        a = self.head_scales(num_heads)
        return torch.cat([a[:, None], w[None].expand(num_heads, -1)], 1).to(device)

    def reference_bias(self, num_heads: int, rel: torch.Tensor) -> torch.Tensor:
        # float64 angles whatever the math dtype (rel is an exact integer below 2**24 in
        # fp32; a float32 product of a far distance and a frequency is off by radians)
        r = rel.double()
        total = torch.zeros_like(r)
        for w in self.frequencies().tolist():  # one (B, 1, Sq, Sk) term at a time: no d_bar x
            total += torch.cos(r * w) - 1.0
        a = self.head_scales(num_heads).to(r.device)
        return (a[:, None, None] * total[:, 0][:, None]).to(rel.dtype)  # (B, H, Sq, Sk)

    def __repr__(self) -> str:
        return f"Sandwich(d_bar={self.d_bar}, base={self.base:g})"


# FIRE (Li et al. 2023): a learned function of a normalised distance, tabulated for the kernels
_FIRE_ACTIVATIONS = {
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "tanh": torch.tanh,
}


def _cubic_through(y0, y1, y2, y3):
    """(a0, a1, a2, a3): the power-basis coefficients in t of the cubic through y0..y3 at
    t = 0, 1/3, 2/3, 1, from Newton's forward differences in s = 3t (elementwise ops only:
    no matrix, no solver, no host copy -- CUDA-graph capturable)."""
    d1 = y1 - y0
    d2 = y2 - 2.0 * y1 + y0
    d3 = y3 - 3.0 * y2 + 3.0 * y1 - y0
    # y0 + s d1 + s(s-1)/2 d2 + s(s-1)(s-2)/6 d3, then s = 3t
    return (y0, 3.0 * (d1 - d2 / 2.0 + d3 / 3.0), 9.0 * (d2 / 2.0 - d3 / 2.0), 27.0 * d3 / 6.0)


class FIRE(PE):
    """FIRE, functional interpolation for relative positions (Li et al., ICLR 2024,
    arXiv 2310.04418, eq. (4) and its appendix's reference module): the bias of query
    position q and key position k is

        bias_h(q, k) = f_theta(u)[h],   u = psi(|q - k|) / (psi(max(L, q)) + eps),
        psi(x) = log(|c| x + 1),

    f_theta a two-layer MLP (1 -> width -> H) shared by the heads up to its output layer,
    c and the threshold L learnable. u is in [0, 1) whenever the keys sit at non-negative
    positions before their query (a decoder); where |q - k| passes max(L, q) (a key far after
    its query under causal=False, or at a negative position) posattn saturates u at 1: the
    bias there is f_theta(1), in the reference as in the kernels. At q == L the normaliser
    takes L's branch (its gradient goes to L; the paper's torch.max splits it half and half).

    **Tabulated for the kernels.** Evaluating a width-32 MLP per score would cost ~100
    instructions, more than the attention itself; the kernels instead read f_theta from a
    per-head table of cubics, one per cell of a uniform grid of ``num_cells`` cells over
    [0, 1], each through f_theta's values at 4 equispaced points of its cell (built by torch
    from the MLP on every call, through autograd: the gradients of the cells' coefficients
    flow back into theta). :meth:`interpolation_error` measures the table (in float64)
    against the exact MLP -- the kernels' float32 coefficients and Horner steps add about 2
    units of rounding on top, as any fp32 evaluation of the MLP would: with GELU or SiLU and the default 64 cells it stays below the fp32 rounding of the
    bias for weights up to 8x nn.Linear's initial ones (tanh, steeper, needs 128 cells
    there; tests/test_fire.py). Check it on a trained model; more cells cost the backward's
    gradient walk, not the forward. The
    paper's ReLU is refused: its kinks put an O(cell width) error in the cells that hold
    them, 10^3 times the fp32 rounding at any practical grid, so no table meets the
    requirement; GELU (the default), SiLU or tanh do.

    The reference (posattn.reference) evaluates the MLP exactly, in the math dtype.

    Args:
        w1, b1: (width,) the first layer (``nn.Linear(1, width)``'s weight[:, 0] and bias).
        w2: (H, width), b2: (H,) the output layer.
        c: the log transform's scale (a float or a 0-d tensor; |c| is used, as the paper).
        L: the threshold (a float or a 0-d tensor, > 0): the normaliser is psi(max(L, q)).
        eps: added to the normaliser (the paper's 1e-6).
        activation: "gelu" | "silu" | "tanh".
        num_cells: the table's cells (a power of two, 8 .. 256; default 64; the static
            compile checks use 64).

    Precision: c's gradient loses digits as |c| -> 0 (its two terms cancel): ~2e-4 relative
    at c = 1e-3, as in the naive fp32 formula.

    Use :class:`posattn.nn.FIREBias` to hold the parameters as a module.
    """

    name = "fire"
    bias = "fire"
    tile_family = "fire"  # four table reads and a cubic per score (configs.py)
    relative_only = False  # the bias depends on q as well as on k - q (its normaliser)

    def __init__(self, w1, b1, w2, b2, c=0.1, L=512.0, eps: float = 1e-6,
                 activation: str = "gelu", num_cells: int = 64):
        for name, t, dim in (("w1", w1, 1), ("b1", b1, 1), ("w2", w2, 2), ("b2", b2, 1)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a floating torch.Tensor, got {type(t).__name__}")
            _check_tensor_type(name, t)
            if t.dim() != dim:
                raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
        width = w1.shape[0]
        if b1.shape != (width,) or w2.shape[1] != width or b2.shape != (w2.shape[0],):
            raise ValueError(f"FIRE's MLP shapes disagree: w1 {tuple(w1.shape)}, b1 "
                             f"{tuple(b1.shape)}, w2 {tuple(w2.shape)} (H, width), b2 "
                             f"{tuple(b2.shape)} (H,)")
        self.w1, self.b1, self.w2, self.b2 = w1, b1, w2, b2
        self.c = _fire_scalar("c", c)
        self.L = _fire_scalar("L", L)
        self.eps = _positive_float("eps", eps)  # (> 0: at c = 0 the normaliser is eps)
        if activation not in _FIRE_ACTIVATIONS:
            hint = (" (ReLU's kinks defeat any interpolation table; see the class docstring)"
                    if activation == "relu" else "")
            raise ValueError(f"activation must be one of {sorted(_FIRE_ACTIVATIONS)}, got "
                             f"{activation!r}{hint}")
        self.activation = activation
        n = _positive_int("num_cells", num_cells)
        if n < 8 or n > 256 or n & (n - 1):
            raise ValueError(f"num_cells must be a power of two in [8, 256], got {num_cells}")
        self.num_cells = n

    @property
    def num_heads(self) -> int:
        return self.w2.shape[0]

    def check(self, num_heads: int, head_dim: int, device: torch.device) -> None:
        """The MLP's output width is num_heads; every tensor on ``device`` and finite."""
        _check_dims(num_heads, head_dim)
        if self.num_heads != num_heads:
            raise ValueError(f"w2 must have shape (num_heads, width) = ({num_heads}, "
                             f"{self.w2.shape[1]}), got {tuple(self.w2.shape)}")
        for name in ("w1", "b1", "w2", "b2", "c", "L"):
            t = getattr(self, name)
            if isinstance(t, torch.Tensor):
                if not _same_device(t.device, device):
                    raise ValueError(f"{name} must be on the inputs' device "
                                     f"{torch.device(device)}, got {t.device}")
                if not _all_true(torch.isfinite(t.detach())):
                    raise ValueError(f"{name} must be finite")
        if isinstance(self.L, torch.Tensor) and not _all_true(self.L.detach() > 0):
            raise ValueError("L must be > 0")

    def mlp(self, u: torch.Tensor) -> torch.Tensor:
        """f_theta(u) (..., H) in u's dtype, for u (...) (exactly: the reference's MLP)."""
        dt = u.dtype
        h = _FIRE_ACTIVATIONS[self.activation](u[..., None] * self.w1.to(dt) + self.b1.to(dt))
        return h @ self.w2.to(dt).T + self.b2.to(dt)

    def _scalars(self, dtype, device):
        def t(x):  # (a float: filled on the device, not copied from the host)
            return x.to(device=device, dtype=dtype) if isinstance(x, torch.Tensor) else \
                torch.full((), x, device=device, dtype=dtype)
        return t(self.c).abs(), t(self.L)

    def normalised(self, q_pos: torch.Tensor, k_pos: torch.Tensor, dtype) -> torch.Tensor:
        """u (B, Sq, Sk) in ``dtype`` from integer positions q_pos (B, Sq), k_pos (B, Sk),
        saturated at 1 (differentiable into c and L)."""
        c, L = self._scalars(dtype, q_pos.device)
        qp = q_pos.to(dtype)[:, :, None]
        d = (q_pos[:, :, None] - k_pos[:, None, :]).abs().to(dtype)
        m = torch.where(qp > L, qp, L)  # max(L, q): L's branch at a tie
        u = torch.log(c * d + 1.0) / (torch.log(c * m + 1.0) + self.eps)
        return u.clamp(max=1.0)

    def reference_bias_at(self, num_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor,
                          dtype) -> torch.Tensor:
        """The bias (B, H, Sq, Sk) in ``dtype``: the MLP evaluated exactly at every score."""
        return self.mlp(self.normalised(q_pos, k_pos, dtype)).permute(0, 3, 1, 2)

    def coefficients(self, derivative: bool = False) -> torch.Tensor:
        """(H, num_cells, 4) float64, differentiable into theta: cell i's cubic in
        t = u * num_cells - i, power basis (a0 + a1 t + a2 t^2 + a3 t^3), through f_theta at
        t = 0, 1/3, 2/3, 1. ``derivative``: the same of df/dt = f_theta'(u) / num_cells (the
        exact derivative, by forward mode; not differentiable), for the gradients of c and
        L -- the value table's own slope is an order of h less accurate."""
        n = self.num_cells
        u = torch.arange(3 * n + 1, dtype=torch.float64, device=self.w1.device) / (3 * n)
        if derivative:
            with torch.no_grad():
                _, y = torch.func.jvp(self.mlp, (u,), (torch.full_like(u, 1.0 / n),))
        else:
            y = self.mlp(u)  # (3n + 1, H)
        y = y.T  # (H, 3n + 1)
        return torch.stack(_cubic_through(y[:, 0:-1:3], y[:, 1::3], y[:, 2::3], y[:, 3::3]), -1)

    def bias_params(self, num_heads: int, device) -> torch.Tensor:
        """(H, 4 + 8 num_cells) float32: |c|, L, eps, num_cells, each cell's 4 coefficients,
        then its derivative's 4 (kernels/bias.py, "FIRE"). Through autograd: the kernels'
        gradient of it reaches theta, c and L (the derivative table is data: no gradient)."""
        c, L = self._scalars(torch.float32, device)
        head = torch.stack([c, L, torch.full_like(c, self.eps),
                            torch.full_like(c, float(self.num_cells))])
        coef = self.coefficients().reshape(self.num_heads, -1)
        slope = self.coefficients(derivative=True).reshape(self.num_heads, -1)
        return torch.cat([head[None].expand(self.num_heads, 4),
                          coef.to(device=device, dtype=torch.float32),
                          slope.to(device=device, dtype=torch.float32)], 1)

    def interpolation_error(self, samples_per_cell: int = 64) -> float:
        """max over heads and u in [0, 1] of |table(u) - f_theta(u)|, in units of the fp32
        rounding of the bias (half an ulp at the head's largest |f_theta|): below 1 means the
        table is as good as evaluating the MLP in fp32. Measured in float64 on
        ``samples_per_cell`` points per cell."""
        with torch.no_grad():
            n = self.num_cells
            u = torch.arange(n * samples_per_cell + 1, dtype=torch.float64,
                             device=self.w1.device) / (n * samples_per_cell)
            exact = self.mlp(u)  # (M, H)
            a = self.coefficients()  # (H, n, 4)
            x = u * n
            cell = x.floor().clamp(max=n - 1).long()
            t = (x - cell)[None]
            ac = a[:, cell]  # (H, M, 4)
            table = ac[..., 0] + t * (ac[..., 1] + t * (ac[..., 2] + t * ac[..., 3]))
            err = (table - exact.T).abs().amax(1)
            rounding = 2.0 ** -24 * exact.abs().amax(0).clamp(min=2.0 ** -100)
            return float((err / rounding).max())

    def tensors(self):
        return tuple(t for t in (self.w1, self.b1, self.w2, self.b2, self.c, self.L)
                     if isinstance(t, torch.Tensor))

    def __repr__(self) -> str:
        def show(x):
            return f"{float(x.detach()):g}" if isinstance(x, torch.Tensor) else f"{x:g}"
        return (f"FIRE(heads={self.num_heads}, width={self.w1.shape[0]}, c={show(self.c)}, "
                f"L={show(self.L)}, activation={self.activation!r}, "
                f"num_cells={self.num_cells})")

    @classmethod
    def random(cls, num_heads: int = 8, width: int = 32, seed: int = 0, **kw) -> "FIRE":
        """A FIRE with nn.Linear's default initialisation from a fixed seed (tests, the bench
        and pe="fire"'s default; a model holds its own, posattn.nn.FIREBias)."""
        g = torch.Generator().manual_seed(seed)
        def u(shape, bound):
            return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound
        w1, b1 = u((width,), 1.0), u((width,), 1.0)
        bound = 1.0 / math.sqrt(width)
        return cls(w1.float(), b1.float(), u((num_heads, width), bound).float(),
                   u((num_heads,), bound).float(), **kw)


def _fire_scalar(name: str, x):
    if isinstance(x, torch.Tensor):
        _check_tensor_type(name, x)
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar (a float or a 1-element tensor), got "
                             f"shape {tuple(x.shape)}")
        return x.reshape(())
    if name == "L":
        return _positive_float(name, x)
    if not _is_real(x):  # c: any finite real (its magnitude is used)
        raise TypeError(f"{name} must be a real number or a 0-d tensor, got {type(x).__name__}")
    return _nonneg_float(name, abs(float(x)))


_PE_NAMES = {"none": NoPE, "rope": RoPE, "alibi": ALiBi, "kerple": KERPLE}

# The registry: every kernel PE kind by its one name, with a factory of a default spec.
# Tests, the bench and the compile report enumerate it; nobody keeps a list of PE names.
# A new PE registers here (and implements its axis hooks in kernels/rotary.py or bias.py).
REGISTRY = {
    "none": NoPE,
    "rope": RoPE,
    "alibi": ALiBi,
    "kerple_log": lambda **kw: KERPLE("log", **kw),
    "kerple_power": lambda **kw: KERPLE("power", **kw),
    # a name needs a default spec: T5's table is the model's, so the default is a small random
    # one (8 heads x 32 buckets) -- for tests and the bench, not for a model
    "t5": lambda table=None, num_heads=8, **kw: T5Bias(
        _default_t5_table(num_heads) if table is None else table, **kw),
    "sandwich": Sandwich,
    "xpos": XPos,
    # FIRE's MLP is the model's: the default is nn.Linear's initialisation from a fixed seed
    "fire": lambda num_heads=8, **kw: FIRE.random(num_heads, **kw),
}
# names a user cannot pass as a string: the spec needs the model's data (T5's table)
_NEEDS_DATA = {"t5": "posattn.T5Bias(table)", "fire": "posattn.nn.FIREBias(num_heads).spec()"}


def _default_t5_table(num_heads: int = 8, num_buckets: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(num_heads, num_buckets, generator=g) * 0.5


def registered() -> Tuple[str, ...]:
    """The registered PE names, in registration order."""
    return tuple(REGISTRY)


def axes(name: str) -> Tuple[str, str, str]:
    """(rotary, bias, tile_family) of a registered PE name."""
    spec = REGISTRY[name]()
    return spec.rotary, spec.bias, spec.tile_family


def resolve_pe(pe) -> PE:
    """``str | PE | None`` -> a PE spec instance. Strings are registry names (``"none"``,
    ``"rope"``, ``"alibi"``, ``"kerple_log"``, ``"kerple_power"``) or ``"kerple"`` (KERPLE's
    default kind, log), case-insensitive."""
    if pe is None:
        return NoPE()
    if isinstance(pe, PE):
        return pe
    if isinstance(pe, str):
        name = pe.lower()
        if name in _NEEDS_DATA:
            raise ValueError(f"pe={pe!r} needs the model's parameters: pass {_NEEDS_DATA[name]}")
        if name in REGISTRY:
            return REGISTRY[name]()
        if name in _PE_NAMES:
            return _PE_NAMES[name]()
        known = sorted(set(REGISTRY) | set(_PE_NAMES))
        raise ValueError(f"pe must be one of {known} or a posattn PE spec, got {pe!r}")
    raise TypeError(f"pe must be a str or a posattn PE spec (NoPE, RoPE, ALiBi, KERPLE), got {type(pe).__name__}")
