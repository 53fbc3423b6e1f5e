"""How much memory the calibration pass needs, from the config alone (docs/sensitivity.md).

The pass holds one decoder layer at a time, so its device memory does not grow with depth:

    weights      4 P                    P = parameters of one decoder layer (fp32 copy)
    gradients    4 Q (2 + C)            Q = quantized parameters of the layer: Fisher and mean
                                        accumulators and C candidate errors dW_c; capped at
                                        collect.STATS_BUDGET by sweeping the layer's backward once per
                                        group of units (``collect.stat_groups``)
    samples      8 B U                  the per-sequence weight gradients of a batch of B sequences
                                        (``sample_batch``) for the largest unit (U parameters: an
                                        attention or MLP projection, or one expert's) and one temporary
                                        of their size
    H            12 sum_g in_g^2        one input second moment per distinct input (q/k/v share one,
                                        gate/up share one; per expert for MoE), summed in fp64 and
                                        handed out as an fp32 copy (``model.hooks.InputStats``)
    head         4 V d (x2 with lm_head counted)
    logits       8 seqlen V             one sequence's logits and their softmax (the loss is taken one
                                        sequence at a time)

    hidden       4 n_seq seqlen d x 3   the hidden states of all calibration sequences: two buffers
                                        while the forward runs; while a layer is swept backward, its
                                        inputs, dL/dh and (replaying a segment) one working copy

plus the activations of one sequence inside one layer (autograd keeps a few [seqlen, width]
tensors). Layer inputs live in memory-mapped files on disk, paged in and out by the OS, so host RAM
needs only the working set: the input of every K-th layer (K = ceil(sqrt(L))) and K - 1 inputs of
the segment being swept, (ceil(L / K) + K - 1) n_seq seqlen d fp32 values (``model.replay``;
7 stores instead of 18 at 16 layers, 17 instead of 82 at 80). On CUDA, host RAM also holds the next
decoder layer's weights as stored, read ahead in pinned memory (``model.prefetch``): 2 P bytes for bf16,
a few in flight (measured at 8B: +0.8 GiB of peak RSS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SAMPLE_BATCH = 8  # sequences per batched backward pass at most
SAMPLE_BUDGET = 4 * 2**30  # bytes of per-sequence weight gradients (and one temporary) held at once


@dataclass(frozen=True)
class PassMemory:
    weights: int
    gradients: int
    samples: int
    hessians: int
    head: int
    logits: int
    hidden: int
    disk: int

    @property
    def device(self) -> int:
        return self.weights + self.gradients + self.samples + self.hessians + self.head + self.logits + self.hidden


def pass_memory(config: dict, n_seq: int, seqlen: int, n_candidates: int, lm_head: bool = False) -> PassMemory:
    """Bytes the pass needs for a transformers config dict (dense Llama-like or Qwen3-MoE).

    ``gradients`` is the uncapped figure; :func:`sweeps` says how many backward sweeps per layer a
    statistics budget turns it into.
    """
    d = config["hidden_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    hd = config.get("head_dim") or d // heads
    attn = d * hd * (2 * heads + 2 * kv)
    experts = config.get("num_experts") or config.get("n_routed_experts") or 0
    if experts:
        inter = config["moe_intermediate_size"]
        mlp = experts * 3 * d * inter
        inputs = experts * (d * d + inter * inter)
        router = experts * d
    else:
        inter = config["intermediate_size"]
        mlp, inputs, router = 3 * d * inter, d * d + inter * inter, 0
    quantized = attn + mlp
    largest = max(d * inter, heads * hd * d)  # inter: one expert's width in an MoE layer
    params = quantized + router + 2 * d
    if config.get("model_type", "").startswith("qwen3"):
        params += 2 * hd  # q_norm, k_norm
    if config.get("attention_bias", config.get("model_type") == "qwen2"):
        params += hd * (heads + 2 * kv)  # q/k/v biases
    inputs += d * d + heads * hd * heads * hd  # q/k/v input and o_proj input
    vocab = config["vocab_size"]
    layers = config["num_hidden_layers"]
    k = max(1, math.ceil(math.sqrt(layers)))
    states = 4 * n_seq * seqlen * d
    samples = 8 * min(n_seq, sample_batch(largest)) * largest
    return PassMemory(weights=4 * params, gradients=4 * quantized * (2 + n_candidates), samples=samples,
                      hessians=12 * inputs,
                      head=4 * vocab * d * (2 if lm_head else 1), logits=8 * seqlen * vocab, hidden=3 * states,
                      disk=states * (math.ceil(layers / k) + min(k, layers) - 1))


def sample_batch(numel: int, budget: int = SAMPLE_BUDGET) -> int:
    """Sequences per backward pass of a layer swept for per-sequence gradients (``collect._sweep_batched``).

    The largest swept unit's gradients of one batch, with one temporary of their size, take
    8 * batch * numel bytes; batching stops at SAMPLE_BATCH, past which launches no longer dominate.
    """
    return max(1, min(SAMPLE_BATCH, budget // max(1, 8 * numel)))


def sweeps(mem: PassMemory, budget: int) -> int:
    """Backward sweeps per layer when gradient statistics are capped at ``budget`` bytes (about)."""
    return max(1, -(-mem.gradients // budget))
