"""dopd-kernels: fused, memory-lean losses for Dual On-policy Distillation and vanilla OPD.

Public API:
    dopd_loss, fused_linear_dopd_loss         — DOPD from logits, or from hidden states + lm_head
    opd_loss, fused_linear_opd_loss           — reverse KL / forward KL / JS × sampled / top-K / full
    route, token_logprobs                     — routing and sampled-token log-probs for separate passes
    DOPDConfig, OPDConfig, Regime, DOPDOutput, OPDOutput, Thresholds
    DOPDLoss, FusedLinearDOPDLoss, OPDLoss, FusedLinearOPDLoss   — nn.Module faces
    LMHead                                    — a model's output head (weight, bias, scale, soft-cap, vocab_size)
    available_backends, TorchBackend

Importing the package registers the losses as `torch.library` custom ops (`torch.ops.dopd_kernels.*`,
see `ops.py`), so a `torch.compile(fullgraph=True)` step can include them.
"""

from .api import dopd_loss, fused_linear_dopd_loss, fused_linear_opd_loss, opd_loss, token_logprobs
from .backends import available_backends
from .backends.torch_chunked import TorchBackend
from .config import DOPDConfig, DOPDOutput, OPDConfig, OPDOutput, Regime, Thresholds
from .heads import LMHead
from .modules import DOPDLoss, FusedLinearDOPDLoss, FusedLinearOPDLoss, OPDLoss
from .routing import route

__version__ = "0.1.0"

__all__ = [
    "dopd_loss",
    "fused_linear_dopd_loss",
    "opd_loss",
    "fused_linear_opd_loss",
    "token_logprobs",
    "route",
    "available_backends",
    "TorchBackend",
    "LMHead",
    "DOPDConfig",
    "OPDConfig",
    "DOPDOutput",
    "OPDOutput",
    "Regime",
    "Thresholds",
    "DOPDLoss",
    "FusedLinearDOPDLoss",
    "OPDLoss",
    "FusedLinearOPDLoss",
    "__version__",
]
