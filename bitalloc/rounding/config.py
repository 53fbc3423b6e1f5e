"""Settings of every rounding method, with their defaults in one place.

The defaults were chosen by measurement on llama-dense-16m (figures below; benchmarks/rounding.py);
GSQ and DiscQuant take seconds per layer on a GPU but minutes on a laptop CPU, so lower their step
counts there for a quick run. Why each value:

* ``act_order`` on, ``damp`` 0.1 (GPTQ's own defaults are off and 0.01; ``gptq()`` keeps those,
  so the sensitivity pass is unchanged): measured on llama-dense-16m at 2-bit g128 (held-out
  perplexity, 64 x 512 calibration tokens): GPTQ 9.88 with the reference defaults, 8.85 with
  act-order (static groups, so storage is unchanged), 7.33 with act-order and damping 0.1, the
  value GSQ's reference configurations use; RTN 11.99. ``block`` 128 as in GPTQ.
* ``min_expert_tokens``: an MoE expert that calibration routed fewer tokens to than this has an H
  of rank below its input width, estimated from too little data to trust; it is quantized with
  RTN (which is GPTQ with H = I) and a warning names it. 64 tokens.
* GSQ (``gsq.py``): 200 steps of 4 sequences per decoder layer (2-bit perplexity 5.19; 100 steps
  gave 5.53, 300 gave 4.96), Lion, logits lr 5e-4, scales lr 2e-5, linear decay to 0; temperature
  tau 2 -> 0.05 and logit multiplier kappa 100 -> 500, both linear in the step as in the reference
  implementation; offsets -2..+2 around the GPTQ code above 2 bits, all levels at <= 2 bits.
  ``gsq_holdout`` 8: in MoE layers every 8th calibration sequence is kept out of learning for the
  per-part guard (``gsq.MoeObjective``): 1/8 of the data (8 sequences at the defaults, about a
  thousand routed tokens per expert) to compare each part on, 7/8 left to learn from.
  ``gsq_experts`` off: on qwen3moe-20m (2.5 bpp plan, CPU) GSQ with learned experts gave held-out
  perplexity 2.924, with experts at GPTQ's codes and attention learned 2.900, GPTQ 2.917. Experts
  see about top-k / experts of the tokens per weight that a dense MLP sees, and their gains on the
  calibration text did not carry to held-out text, even for those that passed the per-part guard.
* DiscQuant (``discquant.py``): Adam (0.9, 0.999), lr 0.05 with cosine decay; the KL gradient is
  multiplied by ``discquant_rho`` / delta2 (see ``discquant.py``) and clipped to
  +-``discquant_clip`` per weight, then the linear term's gradient ``discquant_lambda`` * (1 - 2 y)
  is added (y: the weight's position between its grid points), as in the reference
  implementation. 128 steps of 4 sequences (2-bit perplexity 5.26; 32 steps gave 9.55; rho
  1e3 / 1e4 / 1e5 gave 5.33 / 5.26 / 5.32).
  ``discquant_experts`` off, for the reason ``gsq_experts`` is: routed experts take the codes of a
  sequential GPTQ pass over the whole model and are held fixed while the KL learns the rest. On
  qwen3moe-20m at 2.5 bpp (H200): 2.911 vs GPTQ 2.918; experts learned from RTN's grid: 2.987, and
  +0.031 nats per token against GPTQ even with 4x the calibration text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundingConfig:
    """How the rounding methods run; one frozen value shared by the driver and every method."""

    act_order: bool = True
    damp: float = 0.1
    block: int = 128
    batch: int = 8  # sequences per forward call when propagating activations
    min_expert_tokens: int = 64
    seed: int = 0
    # GSQ
    gsq_steps: int = 200
    gsq_batch: int = 4  # sequences per step
    gsq_lr_logits: float = 5e-4
    gsq_lr_scale: float = 2e-5
    gsq_tau: tuple[float, float] = (2.0, 0.05)
    gsq_kappa: tuple[float, float] = (100.0, 500.0)
    gsq_offsets: int = 2  # neighbours on each side of the GPTQ code (above 2 bits)
    gsq_init_std: float = 0.01  # logits = std * (noise + strength * prior), as the reference
    gsq_init_strength: float = 6.0
    gsq_holdout: int = 8  # MoE layers: every 8th calibration sequence is held out for the per-part guard
    gsq_experts: bool = False  # MoE layers: learn routed experts too (else they keep GPTQ's codes)
    # DiscQuant
    discquant_steps: int = 128
    discquant_batch: int = 4
    discquant_lr: float = 0.05
    discquant_rho: float = 1e4
    discquant_clip: float = 1.0
    discquant_lambda: float = 1.0
    discquant_experts: bool = False  # MoE: learn routed experts too (else GPTQ's codes, held fixed)


DEFAULT = RoundingConfig()
