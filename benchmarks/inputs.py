"""Synthetic inputs that look like on-policy distillation, not white noise.

Every contender of a benchmark case is fed the tensors this module builds for that case, from the
same seed, so all of them see identical inputs.

The generator (fused-linear mode: hidden states and `lm_head` weights, as a trainer has them):

1. Student `lm_head` `W_s` `[V, H]`: Gaussian rows of norm ≈ 1 (nearly orthogonal for H ≥ 256).
2. Each position has a small candidate set of `CANDIDATES` plausible next tokens, drawn from a
   Zipf(1.1) law over the vocabulary (frequent tokens recur across positions as in text), with
   decreasing boosts `BOOSTS` scaled by a per-position confidence `c ~ U(0.5, 1.5)`:
   `h_s = Σ_j c·b_j·W_s[cand_j] + noise`, so the logits are peaked on the candidates over a
   Gaussian floor. Each row is then scaled so that its softmax has a target entropy drawn from a
   log-normal law (median 1.2 nats, σ = 1, clipped to [0.05, 7]): real LM outputs are mostly
   confident with a long tail of uncertain positions, not the ≈log V of white-noise logits.
3. The sampled tokens `y ~ π_s(·|x)` are drawn from the student's own softmax (on-policy), in row
   chunks so sampling never holds an `[N, V]` tensor.
4. Privileged information: each position has an "answer" `a`: the sampled token itself with
   probability 0.5 (the rollout got it right), else one of the candidates. The teacher `T` sees it
   strongly, the privileged student `P` weakly: `h_t = h_s + γ_T·W_t[a] + noise_t`,
   `h_p = h_s + γ_P·W_s[a] + noise_p`, with per-position `γ_T ~ U(0, 6)`, `γ_P ~ U(0, 3)`. The
   teacher head `W_t = W_s + 0.3·noise` (a related model); `P` uses the student's head, as DOPD's
   privileged student does (its weight is detached). So `T` and `P` agree with the student on most
   positions and disagree on some: the advantage gap `|ℓ_T − ℓ_P|` is spread, and all four DOPD
   regimes are populated, HT (the expensive full-vocabulary JS rows) on a realistic minority of
   tokens rather than none or all. The mix of every run is recorded with its results.

H_t = H_s = H (the privileged student shares the student's head; a wider teacher only scales the
teacher's share of the matmul floor). Inputs are made in fp32 on the case's device and cast to its
dtype; `Inputs.stats` records the entropy quantiles and mean sampled-token probability achieved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CANDIDATES = 8
BOOSTS = (4.0, 3.0, 2.5, 2.0, 1.75, 1.5, 1.25, 1.0)
ENTROPY_MEDIAN, ENTROPY_SIGMA, ENTROPY_RANGE = 1.2, 1.0, (0.05, 7.0)  # nats, per-token targets
WORKLOADS = ("dopd", "js", "kl", "logprob")


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: a workload at one size, dtype and device."""

    workload: str  # "dopd" | "js" | "kl" | "logprob"
    n: int
    v: int
    h: int
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def label(self) -> str:
        return f"{self.workload}-N{self.n}-V{self.v}-H{self.h}-{self.dtype}"

    def as_dict(self) -> dict:
        return dict(workload=self.workload, n=self.n, v=self.v, h=self.h, dtype=self.dtype, device=self.device, seed=self.seed)


@dataclass
class Inputs:
    """Leaf tensors of a case. Only `hs` and `ws` take a gradient."""

    hs: torch.Tensor  # [N, H] student hidden (requires grad)
    ws: torch.Tensor  # [V, H] student lm_head (requires grad)
    ht: torch.Tensor  # [N, H] teacher hidden
    wt: torch.Tensor  # [V, H] teacher lm_head
    hp: torch.Tensor  # [N, H] privileged-student hidden (its head is ws, detached)
    tokens: torch.Tensor  # [N] sampled tokens (int64)
    stats: dict  # entropy quantiles of the student's softmax and mean probability of the sampled token

    def zero_grad(self) -> None:
        self.hs.grad = None
        self.ws.grad = None


def _zipf_ids(gen: torch.Generator, shape, v: int) -> torch.Tensor:
    dev = gen.device
    prior = torch.arange(1, v + 1, dtype=torch.float64, device=dev).pow(-1.1)
    ids = torch.multinomial(prior / prior.sum(), shape[0] * shape[1], replacement=True, generator=gen)
    perm = torch.randperm(v, generator=gen, device=dev)  # frequent tokens are not all low ids
    return perm[ids].reshape(shape)


@torch.no_grad()
def calibrate_and_sample(hs: torch.Tensor, ws: torch.Tensor, target: torch.Tensor, gen: torch.Generator,
                         chunk: int = 256, steps: int = 6):
    """Per row n, the scale s_n with entropy(softmax(s_n · h_n W_sᵀ)) = target[n], then
    y_n ~ softmax(s_n · h_n W_sᵀ). Safeguarded Newton on u = log s (dH/du = −s²·Var_p(z); the
    entropy falls as s grows, so a bisection bracket [−4, 8] catches any overshoot). A row chunk
    at a time, so no [N, V] tensor is held. Returns (scale [N, 1], tokens [N], entropy [N], q_y [N])."""
    scales, toks, ents, qs = [], [], [], []
    for i in range(0, hs.shape[0], chunk):
        z, tgt = hs[i:i + chunk] @ ws.T, target[i:i + chunk]
        u = torch.full((z.shape[0],), 2.0, device=z.device)
        lo, hi = torch.full_like(u, -4.0), torch.full_like(u, 8.0)
        for _ in range(steps):
            s = u.exp()
            logp = torch.log_softmax(s[:, None] * z, dim=-1)
            p = logp.exp()
            ent = -(p * logp).sum(-1)
            mean = (p * z).sum(-1)
            var = ((p * z) * z).sum(-1) - mean * mean
            too_flat = ent > tgt
            lo, hi = torch.where(too_flat, u, lo), torch.where(too_flat, hi, u)
            nxt = u + (ent - tgt) / (s * s * var).clamp_min(1e-6)
            u = torch.where((nxt <= lo) | (nxt >= hi), (lo + hi) / 2, nxt)
        s = u.exp()[:, None]
        logp = torch.log_softmax(s * z, dim=-1)
        cdf = logp.exp().cumsum(-1)  # inverse-CDF sampling: torch.multinomial is slow at V ~ 1e5
        u01 = torch.rand(z.shape[0], 1, generator=gen, device=z.device) * cdf[:, -1:]
        y = torch.searchsorted(cdf, u01).clamp_max(z.shape[1] - 1)
        scales.append(s)
        toks.append(y[:, 0])
        ents.append(-(logp.exp() * logp).sum(-1))
        qs.append(logp.gather(1, y)[:, 0].exp())
    return torch.cat(scales), torch.cat(toks), torch.cat(ents), torch.cat(qs)


def make_inputs(case: Case) -> Inputs:
    """The tensors of `case` (see the module docstring), on `case.device` in `case.dtype`.
    Generated in fp32 on the case's device (deterministic for a seed and device), then cast.
    The workload does not enter: every workload of a size sees the same tensors."""
    dev = torch.device(case.device)
    gen = torch.Generator(device=dev).manual_seed(case.seed)
    n, v, h = case.n, case.v, case.h

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=dev)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=dev)

    ws = randn(v, h) / h ** 0.5
    cand = _zipf_ids(gen, (n, CANDIDATES), v)
    conf = 0.5 + rand(n, 1)
    hs = torch.einsum("nc,nch->nh", conf * torch.tensor(BOOSTS, device=dev)[None, :], ws[cand])
    hs += 0.5 * randn(n, h) / h ** 0.5
    target = (ENTROPY_MEDIAN * torch.exp(ENTROPY_SIGMA * randn(n))).clamp(*ENTROPY_RANGE)
    scale, tokens, entropy, q = calibrate_and_sample(hs, ws, target, gen, chunk=1024 if dev.type == "cuda" else 256)
    hs = hs * scale
    wt = ws + 0.3 * randn(v, h) / h ** 0.5
    other = cand[torch.arange(n, device=dev), torch.randint(0, CANDIDATES, (n,), generator=gen, device=dev)]
    answer = torch.where(rand(n) < 0.5, tokens, other)
    ht = hs + 6.0 * rand(n, 1) * wt[answer] + 0.5 * randn(n, h) / h ** 0.5
    hp = hs + 3.0 * rand(n, 1) * ws[answer] + 0.5 * randn(n, h) / h ** 0.5

    def put(t: torch.Tensor, grad: bool = False) -> torch.Tensor:
        return t.to(case.torch_dtype).contiguous().requires_grad_(grad)

    qs = torch.quantile(entropy.float().cpu(), torch.tensor([0.1, 0.5, 0.9]))
    stats = {"entropy_p10": round(float(qs[0]), 3), "entropy_p50": round(float(qs[1]), 3),
             "entropy_p90": round(float(qs[2]), 3), "mean_q_sampled": round(float(q.mean()), 3)}
    return Inputs(put(hs, True), put(ws, True), put(ht), put(wt), put(hp), tokens, stats)


TENSORS = ("hs", "ws", "ht", "wt", "hp", "tokens")


def save_inputs(x: Inputs, path: str) -> None:
    """Save a case's tensors so a memory-probe subprocess sees exactly the same inputs."""
    torch.save({**{k: getattr(x, k).detach() for k in TENSORS}, "stats": x.stats}, path)


def load_inputs(path: str, case: Case) -> Inputs:
    data = torch.load(path, map_location=case.device)
    data["hs"].requires_grad_()
    data["ws"].requires_grad_()
    return Inputs(**data)
