"""The roofline cost model against hand-computed numbers, and the SimExecutor on the real EngineCore."""

from __future__ import annotations

import pytest

from quanta.model.config import ModelConfig
from quanta.sim.cost_model import CostModel, Efficiency
from quanta.sim.hardware import GPUSpec, get_gpu
from quanta.sim.model_presets import MODEL_PRESETS, get_model

# Round numbers so the expected times can be worked out by hand (see each comment).
MODEL = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=1000,
    hidden_size=1024,
    intermediate_size=4096,
    num_layers=2,
    num_heads=8,
    num_kv_heads=8,
    head_dim=128,
    max_position_embeddings=4096,
)
GPU = GPUSpec("toy", bf16_flops=1e12, mem_bandwidth=1e11, mem_bytes=1e9, link_bandwidth=1e10)
IDEAL = Efficiency(matmul=1.0, attention=1.0, memory=1.0, link=1.0, step_overhead=0.0, allreduce_latency=0.0)
# Weight elements per layer: 1024*(1024+2*1024) + 1024*1024 + 3*1024*4096 = 16,777,216.


def test_decode_step_is_memory_bound() -> None:
    cost = CostModel(MODEL, GPU, efficiency=IDEAL).step_cost([(99, 1)], num_sampled=1)
    # Linear: 2 layers x (16,777,216 weights * 2 B + 1 token * 1024 * 2 B in and out) / 1e11 B/s.
    assert cost.linear == pytest.approx(2 * 33_558_528 / 1e11)
    # Attention: 100 keys * (K+V: 2 * 8 heads * 128 * 2 B) = 409,600 B per layer, vs 409,600 FLOPs.
    assert cost.attention == pytest.approx(2 * 409_600 / 1e11)
    # LM head: 1000 * 1024 weights * 2 B.
    assert cost.lm_head == pytest.approx(2_048_000 / 1e11)
    assert cost.communication == 0.0 and cost.overhead == 0.0


def test_prefill_step_is_compute_bound() -> None:
    cost = CostModel(MODEL, GPU, efficiency=IDEAL).step_cost([(0, 1000)], num_sampled=1)
    # Linear: 2 layers x 2 FLOPs x 1000 tokens x 16,777,216 weights / 1e12 FLOP/s.
    assert cost.linear == pytest.approx(2 * 2 * 1000 * 16_777_216 / 1e12)
    # Attention: causal pairs 1000*1001/2 = 500,500; 4 * 1024 FLOPs per pair per layer.
    assert cost.attention == pytest.approx(2 * 4 * 1024 * 500_500 / 1e12)


def test_chunk_with_cached_context_counts_its_pairs() -> None:
    cm = CostModel(MODEL, GPU, efficiency=IDEAL)
    # 10 new tokens after 90 cached: 10*90 + 10*11/2 = 955 pairs; reads 100 tokens of KV.
    got = cm.step_cost([(90, 10)], num_sampled=0)
    assert got.attention == pytest.approx(2 * max(4 * 1024 * 955 / 1e12, 100 * 4096 / 1e11))
    assert got.lm_head == 0.0


def test_tensor_parallel_all_reduce_and_capacity() -> None:
    cm = CostModel(MODEL, GPU, tp=2, efficiency=IDEAL)
    cost = cm.step_cost([(0, 1000)], num_sampled=1)
    # Per all-reduce: 1000 tokens * 1024 * 2 B * 2*(2-1)/2 = 2,048,000 B over 1e10 B/s; 2 per layer, 2 layers.
    assert cost.communication == pytest.approx(4 * 2_048_000 / 1e10)
    assert cost.linear == pytest.approx(2 * 2 * 1000 * 16_777_216 / 2 / 1e12)
    single = CostModel(MODEL, GPU, efficiency=IDEAL)
    # Weights: (2 layers * 16,777,216 + 2 * 1,024,000 untied embeddings) * 2 B = 71,204,864 B.
    assert single.weight_bytes_per_gpu() == 71_204_864
    # KV per token: 2 layers * 4096 B; free: 1e9 * (0.9 - 0.05) - weights.
    assert single.kv_capacity_tokens() == int((0.85e9 - 71_204_864) // 8192)
    with pytest.raises(ValueError, match="tensor parallelism 3"):
        CostModel(MODEL, GPU, tp=3)


def test_presets_and_specs() -> None:
    llama = get_model("llama-3.1-8b")
    assert llama.num_params == pytest.approx(8.03e9, rel=0.01)
    assert MODEL_PRESETS["llama-2-70b"].num_params == pytest.approx(69e9, rel=0.01)
    h100 = get_gpu("H100")
    cm = CostModel(llama, h100)
    # 8B in bf16 on 80 GiB: roughly 4.5e5 tokens of KV at 128 KiB per token.
    assert cm.kv_bytes_per_token() == 32 * 2 * 8 * 128 * 2
    assert 400_000 < cm.kv_capacity_tokens() < 500_000
    # A decode step at batch 1 is bound by reading 16 GB of weights: ~6-7 ms on an H100 at 80% bandwidth.
    assert 5e-3 < cm.step_cost([(1000, 1)], 1).total < 9e-3
    with pytest.raises(ValueError, match="unknown GPU"):
        get_gpu("tpu")
    with pytest.raises(ValueError, match="unknown model"):
        get_model("gpt-5")


def test_chunk_time_matches_the_plans_step_cost_to_the_bit() -> None:
    """What a run of steps carrying a prompt's chunks is priced at (chunk_time, from the batch's totals)
    is what the step's plan costs, with and without decodes beside the chunk, sampling or not."""
    import random

    rng = random.Random(0)
    for tp, model in ((1, MODEL), (2, get_model("llama-3.1-8b"))):
        cost = CostModel(model, GPU if tp == 1 else get_gpu("a100-80gb"), tp=tp)
        for _ in range(300):
            contexts = [rng.randint(1, 5000) for _ in range(rng.choice((0, 1, 3, 40)))]
            cached, new, sample = rng.randint(0, 4000), rng.randint(1, 600), rng.random() < 0.5
            batch = [(c, 1) for c in contexts] + [(cached, new)]
            expected = cost.step_cost(batch, len(contexts) + sample).total
            assert cost.chunk_time(len(contexts), sum(contexts), cached, new, sample) == expected
