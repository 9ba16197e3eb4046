"""Compute a DOPD loss on synthetic logits and print the regime mix (README "Set up").

The teacher and privileged-student logits are the student's plus noise, so the three policies
agree on most tokens the way real distillation streams do.
"""

import torch

from dopd_kernels import DOPDConfig, available_backends, dopd_loss

torch.manual_seed(0)
N, V = 512, 32000
student = (4.0 * torch.randn(N, V)).requires_grad_()               # peaked student softmax
teacher = student.detach() + 2.0 * torch.randn(N, V)                # privileged teacher
priv_student = student.detach() + 1.0 * torch.randn(N, V)           # student with the hint in context
tokens = torch.distributions.Categorical(logits=student.detach()).sample()  # on-policy samples
tokens[-16:] = -100                                                 # masked positions

out = dopd_loss(student, teacher, priv_student, tokens, config=DOPDConfig(top_k=128))
out.loss.backward()
print(f"backends available: {available_backends()}")
print(f"loss {out.loss.item():.4f}   |grad| {student.grad.norm().item():.4f}")
print("regime mix:", {k: round(v, 3) for k, v in out.regime_fractions().items()})
print("thresholds (A, q_T, q_P):", [round(float(t), 4) for t in out.thresholds])
