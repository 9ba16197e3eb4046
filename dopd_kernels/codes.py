"""The integer codes shared by Python, the Triton kernels and the C++/CUDA extension.

One definition of each: the Triton kernels take their `KIND` constexprs from `Divergence`
(`kernels/divergence.py`), the compiled extension keeps `dopd::Kind` and `dopd::RegimeCode` in
`csrc/row_math.h` and exposes their values as `KINDS` / `REGIMES`, and `tests/test_constants.py`
checks that both agree with these enums. This module imports nothing but `enum`: the compile check
(`tests/triton_sm90.py`) loads the kernel modules where only Triton is installed.
"""

from __future__ import annotations

import enum


class Divergence(enum.IntEnum):
    """Divergence kinds; the API names them by `name.lower()` (`DIVERGENCES`)."""

    REVERSE_KL = 0  # KL(student ‖ target)
    FORWARD_KL = 1  # KL(target ‖ student)
    JS = 2  # generalized Jensen–Shannon JS_β with the mixture formed in log space

    @property
    def key(self) -> str:
        """The API's name of the divergence, e.g. `"reverse_kl"`."""
        return self.name.lower()


class Regime(enum.IntEnum):
    """Per-token DOPD regime codes, as stored in `DOPDOutput.regime`."""

    IGNORED = -1
    LH = 0  # low advantage gap, high joint confidence: top-K reverse KL(s || teacher), beta_light
    LL = 1  # low advantage gap, low joint confidence: top-K reverse KL(s || priv_student), beta_weak
    HT = 2  # high advantage gap, teacher more confident: full-vocabulary JS(s, teacher), beta_strong
    HS = 3  # high advantage gap, priv_student more confident: top-K reverse KL(s || priv_student), beta_light


DIVERGENCES = tuple(d.key for d in Divergence)  # ("reverse_kl", "forward_kl", "js")
