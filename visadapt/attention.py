"""Which attention kernel timm's attention modules run: PyTorch SDPA, the unfused reference, or xformers.

timm's attention modules carry a ``fused_attn`` flag: ``True`` computes ``F.scaled_dot_product_attention``
(flash / memory-efficient kernels on CUDA), ``False`` the textbook ``softmax(q k^T * scale) v`` the reference
PETL code runs (it materialises the ``(B, heads, N, N)`` attention matrix, several times slower on a GPU).
:func:`set_attention` puts every timm attention module of a model on one path:

* ``"sdpa"``: ``fused_attn = True`` everywhere (also on Swin's window attention, which timm leaves unfused by
  default as "experimental");
* ``"eager"``: ``fused_attn = False`` everywhere, the reference code's way (for side-by-side benchmarks);
* ``"xformers"``: ``xformers.ops.memory_efficient_attention`` with the module's own ``qkv`` / norms / ``proj``,
  but only where :func:`xformers_usable` says its kernels run on the device and dtype in use. Where they do
  not (xformers absent, no CUDA, or a wheel built for another torch, which raises "No operator found" at the
  first call), the model gets SDPA and ONE notice line says why. Module classes the xformers forward does not
  cover (anything but timm's plain ``Attention``, e.g. Swin's ``WindowAttention`` with its position bias) run
  SDPA, also said in one line.

Nothing is replaced: parameter and state-dict names stay as they were, and adapters hooked on ``qkv`` /
``proj`` (:mod:`visadapt.inject`) run on every path. :func:`attention_report` says which path each module
takes.
"""
from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

import torch
from torch import nn

BACKENDS = ("sdpa", "eager", "xformers")
#: marks a module whose forward :func:`set_attention` replaced with the xformers forward
_XFORMERS_MARK = "_visadapt_xformers_attention"

# ------------------------------------------------------------------------------------------------ xformers probe

_XFORMERS_PROBES: dict[tuple[str, torch.dtype | None], tuple[bool, str]] = {}
_NOT_CUDA = "visadapt runs xformers attention on CUDA only; the model is on {device}"


def xformers_usable(device: str | torch.device = "cuda", dtype: torch.dtype | None = None, *,
                    cache: dict | None = None, not_cuda: str = _NOT_CUDA) -> tuple[bool, str]:
    """``(True, version)`` when xformers' ``memory_efficient_attention`` really runs on ``device``, else
    ``(False, reason)``. A tiny attention call is run rather than trusting the import: xformers wheels are built
    for one torch version and raise "No operator found" on the first call under another. Its kernels are used
    on CUDA only (``not_cuda``, formatted with ``device``, is the reason given elsewhere). Cached per device and
    dtype in ``cache`` (default: this module's; the default dtype is float16 on CUDA, else float32).
    """
    cache = _XFORMERS_PROBES if cache is None else cache
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype)
    if key in cache:
        return cache[key]
    result = _probe_xformers(device, dtype, not_cuda)
    cache[key] = result
    return result


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _probe_xformers(device: torch.device, dtype: torch.dtype | None,
                    not_cuda: str = _NOT_CUDA) -> tuple[bool, str]:
    """Import xformers and run one ``(1, 2, 1, 40)`` attention on ``device``; ``(usable, reason)``."""
    try:
        import xformers
        import xformers.ops
    except ModuleNotFoundError:
        return False, "xformers is not installed"
    except Exception as err:  # noqa: BLE001 - a wheel for another torch can fail at import already
        return False, f"xformers failed to import ({_first_line(err)})"
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    try:
        # (batch, tokens, heads, head dim); fixed values, not randn: probing must not move the seeded RNG
        query = torch.linspace(-1.0, 1.0, 80, device=device, dtype=dtype).reshape(1, 2, 1, 40)
        out = xformers.ops.memory_efficient_attention(query, query, query)
        if out.shape != query.shape or not torch.isfinite(out).all():
            return False, "xformers memory_efficient_attention returned a wrong result on a test input"
    except Exception as err:  # noqa: BLE001 - whatever the kernel raises means "not usable here"; it is reported
        return False, f"xformers {getattr(xformers, '__version__', '?')} kernels do not run here ({_first_line(err)})"
    if device.type != "cuda":
        return False, not_cuda.format(device=device)
    return True, f"xformers {getattr(xformers, '__version__', '?')}"


# ------------------------------------------------------------------------------------------------ timm modules

def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every timm attention module of ``model``: those with timm's ``fused_attn`` flag."""
    return [(name, module) for name, module in model.named_modules() if hasattr(module, "fused_attn")]


def attention_path(module: nn.Module) -> str:
    """The path a timm attention module runs: ``"xformers"``, ``"sdpa"`` or ``"eager"``."""
    if getattr(module, _XFORMERS_MARK, False):
        return "xformers"
    return "sdpa" if module.fused_attn else "eager"


@dataclasses.dataclass
class AttentionReport:
    """Which path each timm attention module takes: ``paths`` maps ``"sdpa"`` / ``"eager"`` / ``"xformers"``
    to the module names on it (only paths with modules appear). ``notices``: what :func:`set_attention` could
    not do as asked (one line each), empty when everything runs as requested."""

    paths: dict[str, list[str]]
    notices: list[str] = dataclasses.field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {path: len(names) for path, names in self.paths.items()}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        if not self.total:
            return "attention: no timm attention modules"
        return "attention: " + ", ".join(f"{n} {path}" for path, n in sorted(self.counts.items()))


def attention_report(model: nn.Module) -> AttentionReport:
    """How many of ``model``'s timm attention modules run which path, and which ones."""
    paths: dict[str, list[str]] = {}
    for name, module in attention_modules(model):
        paths.setdefault(attention_path(module), []).append(name or type(module).__name__)
    return AttentionReport(paths)


def _timm_attention_class() -> type | None:
    try:
        from timm.layers.attention import Attention
    except ImportError:  # timm is a dependency, but a model from elsewhere may reach here without it
        return None
    return Attention


def _xformers_supports(module: nn.Module) -> bool:
    """Only timm's plain ``Attention`` (not subclasses: their forward may differ) with the layout the xformers
    forward below reads."""
    cls = _timm_attention_class()
    return (cls is not None and type(module) is cls
            and all(hasattr(module, a) for a in ("qkv", "q_norm", "k_norm", "norm", "proj", "attn_drop",
                                                    "proj_drop", "num_heads", "head_dim", "attn_dim")))


def _xformers_attention_forward(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                                is_causal: bool = False) -> torch.Tensor:
    """timm ``Attention.forward`` on xformers' kernel. ``x`` ``(B, N, C)`` -> ``(B, N, C_out)``.

    Same computation as timm's SDPA path (scale ``head_dim ** -0.5``, dropout on the attention weights in
    training), in xformers' ``(B, N, heads, head_dim)`` layout, which the ``qkv`` output already has, so no
    transposes. A mask or causal call goes to timm's own SDPA forward, which handles them.
    """
    if attn_mask is not None or is_causal:
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    import xformers.ops

    batch, tokens, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).unbind(2)
    q, k = self.q_norm(q), self.k_norm(k)  # over head_dim, the last axis in both layouts
    out = xformers.ops.memory_efficient_attention(q, k, v, p=self.attn_drop.p if self.training else 0.0)
    out = self.norm(out.reshape(batch, tokens, self.attn_dim))
    if gate is not None:
        out = out * gate
    return self.proj_drop(self.proj(out))


def _set_module_path(module: nn.Module, path: str) -> None:
    if getattr(module, _XFORMERS_MARK, False):
        del module.forward  # the instance attribute; the class's forward shows through again
        delattr(module, _XFORMERS_MARK)
    module.fused_attn = path != "eager"
    if path == "xformers":
        module.forward = types.MethodType(_xformers_attention_forward, module)
        setattr(module, _XFORMERS_MARK, True)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def set_attention(model: nn.Module, backend: str = "sdpa", *, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, notice: Callable[[str], None] | None = print) -> AttentionReport:
    """Put every timm attention module of ``model`` on ``backend`` (``"sdpa"``, ``"eager"`` or ``"xformers"``).

    For ``"xformers"``, ``device`` (default: where the model's parameters are) and ``dtype`` (the compute
    dtype: the autocast dtype, else the parameters') decide whether xformers' kernels run
    (:func:`xformers_usable`); where they do not, or for module classes the xformers forward does not cover,
    SDPA is used and ``notice`` (default ``print``; ``None``: silent) gets one line per reason. Returns the
    :func:`attention_report` after the change, with those notices. A model without timm attention modules is
    left as it is.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    modules = attention_modules(model)
    notices: list[str] = []
    if backend == "xformers" and modules:
        device = torch.device(device) if device is not None else _model_device(model)
        usable, reason = xformers_usable(device, dtype)
        if not usable:
            notices.append(f"xformers attention is not usable on {device} ({reason}); using PyTorch SDPA "
                           f"attention instead")
            backend = "sdpa"
    for _, module in modules:
        path = backend
        if backend == "xformers" and not _xformers_supports(module):
            path = "sdpa"
        _set_module_path(module, path)
    if backend == "xformers":
        other = sorted({type(m).__name__ for _, m in modules if not _xformers_supports(m)})
        if other:
            count = sum(1 for _, m in modules if not _xformers_supports(m))
            notices.append(f"xformers attention covers timm's Attention only; {count} {'/'.join(other)} modules "
                           f"run PyTorch SDPA attention")
    if notice is not None:
        for line in notices:
            notice(f"notice: {line}")
    report = attention_report(model)
    report.notices = notices
    return report
