"""Packed context forwards (issue #16): a micro-batch's rollouts in one forward per context.

Without padding, a packed row is only right if attention stays inside each sequence and the
positions restart: each packed path is checked against separate forwards, and the packed step's
gradients against the per-rollout loop's."""

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import requires_cuda  # noqa: E402
from pmi_kernels.train import loop  # noqa: E402
from pmi_kernels.train.contexts import rollout_hidden  # noqa: E402
from pmi_kernels.train.data import packing  # noqa: E402
from pmi_kernels.train.data.packing import packed_hidden, rollout_groups  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from pmi_kernels.train.step import distil  # noqa: E402
from test_train import tiny  # noqa: E402

SHAPE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_model(family: str, attn: str = "sdpa", device="cpu", dtype=torch.float32):
    """A two-layer model of the family with random weights."""
    packing.register_varlen()
    import transformers as tf

    configs = {
        "qwen3": lambda: tf.Qwen3Config(head_dim=8, **SHAPE),
        # Layer 1 attends to a window of 4 tokens: the packed mask must keep it.
        "qwen3-sliding": lambda: tf.Qwen3Config(
            head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=1, **SHAPE
        ),
        "llama": lambda: tf.LlamaConfig(**SHAPE),
        "olmo2": lambda: tf.Olmo2Config(**SHAPE),
        # Every layer attends to a window of 4 tokens, and the config has no layer types.
        "mistral-sliding": lambda: tf.MistralConfig(head_dim=8, sliding_window=4, **SHAPE),
        "phi3-sliding": lambda: tf.Phi3Config(sliding_window=4, **SHAPE),
        # Windows their attention does not hand on: PhiMoE's from the config, Qwen2-MoE's on the module.
        "phimoe-sliding": lambda: tf.PhimoeConfig(
            sliding_window=4, num_local_experts=4, num_experts_per_tok=2, **SHAPE
        ),
        "qwen2moe-sliding": lambda: tf.Qwen2MoeConfig(
            use_sliding_window=True, sliding_window=4, max_window_layers=1, **SHAPE
        ),
        # A sliding_window key Llama ignores (a leftover in a config.json).
        "llama-window-key": lambda: tf.LlamaConfig(sliding_window=4, **SHAPE),
        # Its decoder layers do not pass their keyword arguments on to attention.
        "stablelm": lambda: tf.StableLmConfig(**SHAPE),
    }
    model = tf.AutoModelForCausalLM.from_config(configs[family]()).to(device, dtype)
    model.set_attn_implementation(attn)
    return model.eval()


def sequences(seed: int, prompt_lengths=(4, 9, 3, 6), rollout_lengths=(1, 6, 11, 4)):
    gen = torch.Generator().manual_seed(seed)

    def draw(n):
        return torch.randint(3, SHAPE["vocab_size"], (n,), generator=gen).tolist()

    return [draw(n) for n in prompt_lengths], [draw(n) for n in rollout_lengths]


def separate(decoder, prompts, rollouts):
    return torch.cat([rollout_hidden(decoder, p, r, "cpu") for p, r in zip(prompts, rollouts)])


@pytest.mark.parametrize("attn", ["varlen", "sdpa", "eager"])
@pytest.mark.parametrize(
    "family",
    [
        "qwen3",
        "qwen3-sliding",
        "llama",
        "olmo2",
        "mistral-sliding",
        "phi3-sliding",
        "phimoe-sliding",
        "qwen2moe-sliding",
        "llama-window-key",
    ],
)
def test_packed_hidden_states_equal_separate_forwards(family, attn):
    """Rollouts of 1 to 11 tokens after prompts of 3 to 9, packed in one row: the gathered
    hidden states equal each sequence's own forward (varlen: per-sequence attention on a CPU;
    sdpa, eager: the block-diagonal mask). Fails on a plain causal mask over the row (a sequence
    sees the one before it), on a sliding-window layer given the full mask or a window one
    token off (Mistral's and Phi-3's windows, in configs without layer types, once were), on query/key
    layouts or GQA heads mixed up, and on gather offsets off by one.
    (Positions that run on across sequences are not caught: with rotary embeddings only their
    differences count.)"""
    model = tiny_model(family, attn)
    prompts, rollouts = sequences(0)
    with torch.no_grad():
        got = packed_hidden(model.get_decoder(), prompts, rollouts, torch.device("cpu"))
        want = separate(model.get_decoder(), prompts, rollouts)
    assert got.shape == (sum(map(len, rollouts)), SHAPE["hidden_size"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_varlen_attention_outside_packed_forwards_is_sdpa(monkeypatch):
    """Without sequence boundaries (a left-padded batch, as generate runs) the varlen attention
    is sdpa with its padding mask; in a packed forward it hands the kernel what varlen_attn
    takes (int32 boundaries, the longest sequence). Fails on the padding mask dropped (no mask
    function registered, or one that returns none) or on boundaries of another dtype or length."""
    calls = []

    def checked(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k == int(cu_q.diff().max())
        calls.append(q.shape)
        return real(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    real = packing.segment_attention
    monkeypatch.setattr(packing, "segment_attention", checked)
    model, reference = tiny_model("olmo2", packing.VARLEN), tiny_model("olmo2", "sdpa")
    reference.load_state_dict(model.state_dict())
    prompts, rollouts = sequences(1)
    with torch.no_grad():
        packed_hidden(model.get_decoder(), prompts, rollouts, torch.device("cpu"))
        assert len(calls) == SHAPE["num_hidden_layers"]
        ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
        mask = (ids != 0).long()
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits[mask.bool()],
            reference(input_ids=ids, attention_mask=mask).logits[mask.bool()],
        )
    assert len(calls) == SHAPE["num_hidden_layers"]


def test_a_pack_whose_sequences_see_each_other_is_refused(monkeypatch):
    """StableLM's decoder layers drop the boundaries: "varlen" refuses to run a packed forward
    without them (it once attended across the whole pack, future tokens included), and the
    trainer's isolation check refuses a mask that lets one sequence see another, either way.
    Fails on a packed forward that silently mixes sequences."""
    prompts, rollouts = sequences(4)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="not handed the pack's sequence boundaries"):
        packed_hidden(tiny_model("stablelm", packing.VARLEN).get_decoder(), prompts, rollouts, cpu)
    decoder = tiny_model("stablelm", "sdpa").get_decoder()
    with torch.no_grad():  # with the block mask it is right
        torch.testing.assert_close(packed_hidden(decoder, prompts, rollouts, cpu), separate(decoder, prompts, rollouts))
    packing.check_isolation(decoder, prompts[:2], SHAPE["vocab_size"], cpu)

    def causal(config, lengths, implementation, device, window=None):  # the later sequence sees the earlier
        return torch.ones(sum(lengths), sum(lengths), dtype=torch.bool).tril()[None, None]

    def ahead(config, lengths, implementation, device, window=None):  # the earlier sees the later
        allowed = packing.block_causal_mask(lengths, device)
        allowed[: lengths[0], lengths[0] :] = True
        return allowed[None, None]

    for mask, which in ((causal, "later"), (ahead, "earlier")):
        monkeypatch.setattr(packing, "block_masks", mask)
        with pytest.raises(ValueError, match=f"{which} sequence of a pack sees the other"):
            packing.check_isolation(decoder, prompts[:2], SHAPE["vocab_size"], cpu)


def test_attention_a_model_needs_is_chosen_or_refused_before_loading():
    """Soft-capped logits (Gemma 2) and attention sinks (GPT-OSS): "auto" picks eager, an
    implementation that drops them is refused by name; ALiBi positions cannot be packed; a
    varlen forward of a model with sinks is refused (it once dropped them). Fails on a model
    run without what makes its attention."""
    import transformers as tf

    gemma2, gpt_oss, bloom = tf.Gemma2Config(), tf.GptOssConfig(**SHAPE), tf.BloomConfig()
    for config in (gemma2, gpt_oss):
        assert packing.resolve_attn_implementation("auto", "cpu", config) == "eager"
        for implementation in ("sdpa", packing.VARLEN):
            with pytest.raises(ValueError, match="attn_implementation .* cannot run this model exactly"):
                packing.check_model_attention(config, implementation, packed=False)
        packing.check_model_attention(config, "eager", packed=True)
    packing.check_model_attention(gemma2, "flash_attention_2", packed=True)  # flash-attn soft-caps
    with pytest.raises(ValueError, match="packed true cannot run this model: its positions are ALiBi"):
        packing.check_model_attention(bloom, "eager", packed=True)
    packing.check_model_attention(bloom, "eager", packed=False)
    # Attention outside transformers' registry (Falcon, GPT-Neo, StableLM), or with dropout (GPT-2):
    # "auto" picks sdpa (eager where the model has none), "varlen" is refused before loading.
    picks = [
        (tf.FalconConfig(), "sdpa"),
        (tf.GPTNeoConfig(), "eager"),
        (tf.StableLmConfig(), "sdpa"),
        (tf.GPT2Config(), "sdpa"),
        (tf.LlamaConfig(), packing.VARLEN),
    ]
    for config, implementation in picks:
        assert packing.resolve_attn_implementation("auto", "cpu", config) == implementation, type(config).__name__
        if implementation != packing.VARLEN:
            with pytest.raises(
                ValueError, match="attn_implementation 'varlen' (cannot run this model|has no attention dropout)"
            ):
                packing.check_model_attention(config, packing.VARLEN, packed=True)
    packing.register_varlen()
    model = tf.AutoModelForCausalLM.from_config(gpt_oss)
    model.set_attn_implementation(packing.VARLEN)
    with pytest.raises(ValueError, match="no attention sinks"):
        model(input_ids=torch.tensor([[3, 4, 5]]))


@pytest.mark.parametrize("signature", ["torch-2.11", "newer"])
def test_flash_varlen_adapts_to_the_installed_varlen_attn(monkeypatch, signature):
    """flash_varlen on torch 2.11's varlen_attn (is_causal; no scale, window or enable_gqa) and on
    the newer one gives segment_attention's result with grouped heads and a non-default scale.
    Fails on keywords the installed signature lacks (the TypeError seen on torch 2.11), on the
    key/value heads not repeated for GQA, or on the scale dropped."""
    import torch.nn.attention.varlen as varlen

    def old(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        assert is_causal and q.shape[1] == k.shape[1]
        return packing.segment_attention(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))

    def new(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False):
        return packing.segment_attention(
            q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size, enable_gqa=enable_gqa
        )

    monkeypatch.setattr(varlen, "varlen_attn", old if signature == "torch-2.11" else new)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, heads, 8, generator=gen, dtype=torch.float64) for heads in (4, 2, 2))
    lengths = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32), 5, 5
    got = packing.flash_varlen(q, k, v, lengths, 0.2, (-1, 0))
    want = packing.segment_attention(q, k, v, *lengths, scale=0.2, window_size=(-1, 0), enable_gqa=True)
    torch.testing.assert_close(got, want)
    if signature == "torch-2.11":
        with pytest.raises(ValueError, match="sliding window"):
            packing.flash_varlen(q, k, v, lengths, 0.2, (3, 0))


def test_rollout_groups_respect_the_token_budget():
    """Each pack's longest context stays within the budget (a context longer than the budget
    goes alone); order kept; empty rollouts dropped; one rollout per group unpacked."""
    prompts = {"student": [[1] * 3, [1] * 4, [1] * 2, [1] * 5], "teacher": [[1] * 6, [1] * 5, [1] * 9, [1] * 6]}
    batch = [(0, [7] * 5), (1, []), (2, [7] * 3), (3, [7] * 30)]
    lengths = {0: 10, 2: 11, 3: 35}
    assert rollout_groups(batch, prompts, True, None) == [[batch[0], batch[2], batch[3]]]
    assert rollout_groups(batch, prompts, True, 21) == [[batch[0], batch[2]], [batch[3]]]
    assert rollout_groups(batch, prompts, True, 20) == [[batch[0]], [batch[2]], [batch[3]]]
    assert rollout_groups(batch, prompts, False, 21) == [[batch[0]], [batch[2]], [batch[3]]]
    assert sum(lengths[i] for i, _ in rollout_groups(batch, prompts, True, 21)[0]) <= 21


def test_sequences_past_a_rope_switch_go_alone():
    """Phi-3's longrope picks its frequencies from the longest position of a forward: a sequence
    longer than original_max_position_embeddings goes in a pack of its own, and the packs equal
    separate forwards. Fails on a short sequence packed with a long one (its rows 0.5% off)."""
    import transformers as tf

    rope = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [4.0] * 4}
    config = tf.Phi3Config(rope_parameters=rope, original_max_position_embeddings=8, **SHAPE)
    assert packing.rope_switch_length(config) == 8
    assert packing.rope_switch_length(tf.Qwen3Config(**SHAPE)) is None
    prompts = {"student": [[1] * 3, [1] * 3, [1] * 9, [1] * 2]}
    batch = [(0, [7] * 4), (1, [7] * 6), (2, [7] * 2), (3, [7] * 3)]  # sequences of 6, 8, 10 and 4 tokens
    assert rollout_groups(batch, prompts, True, None, alone_above=8) == [batch[:2], [batch[2]], [batch[3]]]
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    decoder, cpu = model.get_decoder(), torch.device("cpu")
    student = [prompts["student"][i] for i, _ in batch]
    with torch.no_grad():
        want = separate(decoder, student, [r for _, r in batch])
        got = torch.cat(
            [
                packed_hidden(decoder, [student[i] for i, _ in group], [r for _, r in group], cpu)
                for group in rollout_groups(
                    list(enumerate(r for _, r in batch)), {"student": student}, True, None, alone_above=8
                )
            ]
        )
        mixed = packed_hidden(decoder, student, [r for _, r in batch], cpu)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed, want, rtol=1e-5, atol=1e-5)


CUTS = [3, 0, 7, 9, 5, 1]  # the step's rollout lengths (two micro-batches of three): uneven, one empty


def step_gradients(trainer, packed: bool, budget):
    """A step over random rollouts of CUTS tokens, packed under `budget` ("mixed": the second
    micro-batch's first two rollouts fit a pack, the third does not) or rollout by rollout; the
    weights are left as they were. Returns (record, the trainable parameters' gradients, the
    lengths of the rollouts in each group read)."""
    indices = trainer.next_indices(len(CUTS))
    trainer.step, trainer.position = 0, 0
    context = [max(len(trainer.prompts[kind][i]) for kind in trainer.prompts) + n - 1 for i, n in zip(indices, CUTS)]
    trainer.config.packed = packed
    trainer.config.max_tokens_per_micro_batch = context[3] + context[4] if budget == "mixed" else budget
    gen = torch.Generator().manual_seed(3)
    rollouts = iter([torch.randint(4, len(trainer.tokenizer), (n,), generator=gen).tolist() for n in CUTS])
    trainer.generate = lambda prompts, *args: [next(rollouts) for _ in prompts]
    grads, groups = [], []
    trainer.optimizer.step = lambda: grads.extend(p.grad.clone() for p in trainer.trainable)

    def recording(contexts, group, *args, **kwargs):
        groups.append(group)
        return distil(contexts, group, *args, **kwargs)

    loop.distil = recording
    try:
        record = trainer.train_step()
    finally:
        loop.distil = distil
    return record, grads, [[len(rollout) for _, rollout in group] for group in groups]


@pytest.mark.parametrize(
    "overrides, budget, packs",
    [
        pytest.param(dict(mode="pmi"), None, [[3, 7], [9, 5, 1]], id="lora"),
        # The arithmetic task's prompts: "mixed" splits its first micro-batch (the shortcut task's are shorter).
        pytest.param(
            dict(mode="pmi", anchor=True, toy_task="arithmetic"),
            "mixed",
            [[3], [7], [9, 5], [1]],
            id="lora-anchor-budget",
        ),
        pytest.param(
            dict(mode="pmi", lora=False, jsd_beta=0.4, attn_implementation="sdpa"),
            None,
            [[3, 7], [9, 5, 1]],
            id="full-sdpa-mask",
        ),
        pytest.param(
            dict(mode="opsd", lora=False, anchor=True), 1, [[3], [7], [9], [5], [1]], id="full-anchor-opsd-alone"
        ),
    ],
)
def test_packed_step_gradients_equal_the_per_rollout_loop(tmp_path, overrides, budget, packs):
    """One step (two micro-batches of three; rollouts of 3, 0, 7, 9, 5 and 1 tokens), packed and
    rollout by rollout from the same weights: the same parameter gradients, loss and
    diagnostics, and a time split that adds up to at most the step. Token budgets split the
    packs; attention is varlen's (per sequence on a CPU), or sdpa's with the block mask. Fails on a
    pack whose sequences see each other, rows of one context gathered out of line with another's, or a
    normalizer per pack instead of the step's tokens."""
    trainer = Trainer(tiny(tmp_path, batch_size=3, grad_accum=2, max_grad_norm=1e9, diagnostics_every=1, **overrides))
    with torch.no_grad():  # LoRA's B off zero, so the adapter changes the student's contexts
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    packed, packed_grads, groups = step_gradients(trainer, True, budget)
    loop, loop_grads, _ = step_gradients(trainer, False, None)
    assert groups == packs
    assert packed["response_length"] == loop["response_length"] == sum(CUTS) / len(CUTS)
    assert packed["loss"] == pytest.approx(loop["loss"], rel=1e-5, abs=1e-7)
    for key in [k for k in loop if k.startswith("diag/")]:
        assert packed[key] == pytest.approx(loop[key], rel=1e-4, abs=1e-6), key
    scale = max(float(g.abs().max()) for g in loop_grads)
    assert len(packed_grads) == len(loop_grads) and scale > 0
    for got, want in zip(packed_grads, loop_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
    parts = ["sampling", "forwards", "loss", "diagnostics", "backward", "optimizer"]
    assert all(packed[f"time/{p}"] > 0 for p in parts)
    assert sum(packed[f"time/{p}"] for p in parts) <= packed["time/step"]


@requires_cuda
@pytest.mark.parametrize(
    "attn,dtype", [("varlen", torch.bfloat16), ("flash_attention_2", torch.bfloat16), ("varlen", torch.float32)]
)
def test_packed_hidden_states_on_cuda(attn, dtype):
    """On a GPU: in bf16 the varlen kernels' packed forward (torch's varlen_attn, flash-attn's)
    equals separate sdpa forwards, a sliding-window layer included; fp32 weights (bf16 false)
    keep fp32 attention (each sequence through sdpa) and equal them to fp32 rounding. Fails on
    the flash kernel's bf16 rounding of fp32 (the packed path once cast to bf16: gradients 0.8%
    off the loop's)."""
    if attn == "flash_attention_2" and not packing.flash_attn_installed():
        pytest.skip("flash-attn is not installed")
    packing.resolve_attn_implementation(attn, "cuda")
    model = tiny_model("qwen3-sliding", attn, "cuda", dtype)
    reference = tiny_model("qwen3-sliding", "sdpa", "cuda", dtype)
    reference.load_state_dict(model.state_dict())
    prompts, rollouts = sequences(2)
    with torch.no_grad():
        got = packed_hidden(model.get_decoder(), prompts, rollouts, torch.device("cuda"))
        want = torch.cat([rollout_hidden(reference.get_decoder(), p, r, "cuda") for p, r in zip(prompts, rollouts)])
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0.05 * float(want.abs().max()))


@pytest.mark.parametrize("moved", ["later", "earlier"])
def test_the_isolation_probe_allows_five_percent_and_no_more(monkeypatch, moved):
    """The probe's hidden states made by hand: one sequence's largest state is M, and changing
    the other moves one of its states by exactly 5% of M (allowed: bf16 kernels with atomic sums
    move by an ulp or two), or by the next float above (refused, naming the sequence). Fails on
    a bound off in either direction, or taken from the states after the change."""
    hidden = torch.randint(-80, 80, (16, 4), dtype=torch.float64) / 8  # exact in binary, |h| <= 10
    scale = float(torch.randint(11, 40, ()))  # the moved sequence's largest |state|, above the rest
    part = slice(8, 16) if moved == "later" else slice(0, 8)
    hidden[part][0, 0], hidden[part][3, 1] = scale, 0.0
    decoder = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    for move, refused in ((0.05 * scale, False), (math.nextafter(0.05 * scale, math.inf), True)):
        after = hidden.clone()
        after[part][3, 1] = move
        after[part][0, 0] = scale - 0.5  # moves less; the bound is 5% of the states before the change
        calls = iter([hidden, after if moved == "later" else hidden, after if moved == "earlier" else hidden])
        monkeypatch.setattr(packing, "packed_hidden", lambda *args: next(calls))
        if refused:
            with pytest.raises(ValueError, match=f"model's {moved} sequence of a pack sees the other"):
                packing.check_isolation(decoder, [[1, 2, 3], [4, 5]], 10, "cpu")
        else:
            packing.check_isolation(decoder, [[1, 2, 3], [4, 5]], 10, "cpu")
