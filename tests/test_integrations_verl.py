"""pmi_kernels.integrations.verl with verl's own classes, on CPU (scripts/test_verl.sh runs
these in .venv-verl; without verl they skip).

verl 0.9 has no CPU platform (it falls back to CUDA) and registers its FSDP engines for cuda
and npu only: `CPUPlatform` below is the narrowest stand-in, a verl platform plugin whose
device is "cpu" and whose collective backend is gloo, so that verl's own FSDPEngineWithLMHead
(FSDP2 over a one-rank gloo group, verl's LoRA, its optimizer, its micro-batching and
gradient accumulation in forward_backward_batch) runs here. Ray, the rollout (vLLM/SGLang) and
the worker classes' dispatch are not run (docs/verl.md, "What the CPU tests cover").

The reference is this project's trainer step (train.step.distil, ContextReader.states) on the
same rollouts, with the same weights.
"""

import contextlib
import functools
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

verl = pytest.importorskip("verl")

from verl.plugin.platform.platform_base import PlatformBase  # noqa: E402
from verl.plugin.platform.platform_manager import set_platform  # noqa: E402


class CPUPlatform(PlatformBase):
    """verl's platform interface on the CPU: device "cpu", gloo, nothing to synchronize."""

    device_name = "cpu"
    vendor_name = "cpu"
    device_module = torch.cpu

    def is_available(self):
        return True

    def current_device(self):
        return "cpu"

    def device_count(self):
        return 1

    def set_device(self, device_index):
        pass

    def synchronize(self, device_index=None):
        pass

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings):
        pass

    def empty_cache(self):
        pass

    def get_device_capability(self, device_index=0):
        return None, None

    def communication_backend_name(self):
        return "gloo"

    def visible_devices_envvar(self):
        return "CUDA_VISIBLE_DEVICES"

    def nvtx_range(self, msg):
        return contextlib.nullcontext()

    def profiler_start(self):
        pass

    def profiler_stop(self):
        pass

    def ray_resource_name(self):
        return "CPU"

    def ray_noset_envvars(self):
        return []

    def is_ipc_supported(self):
        return False

    def cudart(self):
        return None


if not torch.cuda.is_available():  # before verl's modules read the device at import
    set_platform(CPUPlatform())

from tensordict import NonTensorData, NonTensorStack, TensorDict  # noqa: E402
from verl.trainer.config import CheckpointConfig  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig, FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig  # noqa: E402
from verl.workers.engine import EngineRegistry  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

from pmi_kernels.backends import DIAGNOSTICS  # noqa: E402
from pmi_kernels.integrations.verl.actor import PMIEngineMixin, PMILoss, pmi_engine_class  # noqa: E402
from pmi_kernels.integrations.verl.config import PMIConfig, check_actor_config  # noqa: E402
from pmi_kernels.integrations.verl.main import check_config  # noqa: E402
from pmi_kernels.integrations.verl.workers import PMIActorRolloutRefWorker, PMITrainingWorker, pmi_engines  # noqa: E402
from pmi_kernels.prompts import prompt_ids  # noqa: E402
from pmi_kernels.train.config import TrainConfig  # noqa: E402
from pmi_kernels.train.contexts import ContextReader  # noqa: E402
from pmi_kernels.train.demo.toy import toy_model, toy_problems, toy_tokenizer  # noqa: E402
from pmi_kernels.train.distributed import World  # noqa: E402
from pmi_kernels.train.metrics import StepTimer  # noqa: E402
from pmi_kernels.train.step import distil  # noqa: E402

PROMPT_WIDTH, RESPONSE_WIDTH = 160, 12
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "token-sum")


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """A one-rank gloo group, as verl's engine needs one."""
    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy")
    tokenizer = toy_tokenizer()
    toy_model(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def verl_engine(model_dir: str, lora: bool, micro_batch: int):
    """verl's FSDPEngineWithLMHead with the PMI forward_step, built and initialized by verl
    (FSDP2, fp32, sdpa, no remove-padding: flash-attention's varlen path needs a GPU)."""
    model_config = HFModelConfig(
        path=model_dir,
        use_remove_padding=False,
        enable_gradient_checkpointing=False,
        override_config={"attn_implementation": "sdpa"},
        lora_rank=4 if lora else 0,
        lora_alpha=8,
    )
    engine_config = FSDPEngineConfig(
        strategy="fsdp2",
        use_torch_compile=False,
        mixed_precision={"param_dtype": "fp32"},
        micro_batch_size_per_gpu=micro_batch,
    )
    optimizer_config = FSDPOptimizerConfig(lr=1e-3, total_training_steps=10, clip_grad=1.0)
    engine = pmi_engine_class(FSDPEngineWithLMHead)(
        model_config=model_config,
        engine_config=engine_config,
        optimizer_config=optimizer_config,
        checkpoint_config=CheckpointConfig(),
    )
    engine.initialize()
    if lora:  # verl starts LoRA's B at zero, where the adapter changes nothing: give it weights
        with torch.no_grad():
            for name, param in engine.module.named_parameters():
                if "lora_B" in name:
                    param.to_local().normal_(std=0.2)
    return engine


def full_state(module) -> dict:
    """name -> the whole tensor of each parameter (FSDP2 holds DTensors)."""
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in module.named_parameters()
    }


def full_grads(module) -> dict:
    return {
        name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
        for name, p in module.named_parameters()
        if p.grad is not None
    }


def rollout_batch(tokenizer, rows, lengths, micro_batch: int, response_masks=None):
    """verl's rollout batch for rows: left-padded prompts (the trainer's student prompts),
    right-padded responses (random tokens, EOS last), the masks and positions verl builds, and
    extra_info with the question and the reference; then verl's left_right_2_no_padding."""
    templates = TrainConfig().templates
    prompts = [prompt_ids(tokenizer, templates, "student", row, False) for row in rows]
    responses = [torch.randint(4, len(tokenizer), (n - 1,)).tolist() + [tokenizer.eos_token_id] for n in lengths]
    batch = len(rows)
    prompt_ids_, response_ids_ = (
        torch.full((batch, width), tokenizer.pad_token_id) for width in (PROMPT_WIDTH, RESPONSE_WIDTH)
    )
    attention = torch.zeros(batch, PROMPT_WIDTH + RESPONSE_WIDTH, dtype=torch.long)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        prompt_ids_[i, PROMPT_WIDTH - len(prompt) :] = torch.tensor(prompt)
        response_ids_[i, : len(response)] = torch.tensor(response)
        attention[i, PROMPT_WIDTH - len(prompt) : PROMPT_WIDTH + len(response)] = 1
    mask = attention[:, PROMPT_WIDTH:] if response_masks is None else response_masks
    data = TensorDict(
        {
            "prompts": prompt_ids_,
            "responses": response_ids_,
            "input_ids": torch.cat([prompt_ids_, response_ids_], 1),
            "attention_mask": attention,
            "position_ids": (attention.cumsum(1) - 1).clamp(min=0),
            "response_mask": mask,
        },
        batch_size=[batch],
    )
    data["extra_info"] = NonTensorStack.from_list(
        [NonTensorData({"question": row["question"], "reference": row["solution"]}) for row in rows]
    )
    data = left_right_2_no_padding(data)
    # What verl's trainer (_update_actor) and TrainingWorker.train_batch add for the engine.
    tu.assign_non_tensor(
        data,
        temperature=1.0,
        use_remove_padding=False,
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=micro_batch,
        max_token_len_per_gpu=None,
        use_fused_kernels=False,
        global_batch_size=batch,
        calculate_entropy=False,
    )
    return data, prompts, responses


def trainer_step(model, frozen, tokenizer, rows, prompts, responses, train_overrides, normalizers):
    """This project's trainer step on the given rollouts: train.step.distil per rollout, each with its
    normalizer (the step's token count for the trainer's own token mean), gradients accumulated."""
    config = TrainConfig(packed=False, **train_overrides)
    # frozen: the frozen copy of full fine-tuning, or None
    contexts = ContextReader(
        config,
        World(),
        torch.device("cpu"),
        model,
        frozen,
        trainer_prompts(tokenizer, config, rows, prompts),
        tokenizer.eos_token_id,
    )
    totals = {"loss": 0.0}
    for index, (response, normalizer) in enumerate(zip(responses, normalizers)):
        distil(contexts, [(index, response)], normalizer, False, totals, StepTimer(contexts.device))
    return totals["loss"]


def trainer_prompts(tokenizer, config, rows, student_prompts):
    """The trainer's prompt ids per context: the student's as given, the teacher's and the
    reference-only context's from the rows."""
    return {
        "student": student_prompts,
        **{
            kind: [prompt_ids(tokenizer, config.templates, kind, row, False) for row in rows]
            for kind in ("teacher", "refonly")
        },
    }


def reference_model(engine, lora: bool):
    """A plain (PEFT) copy of the engine's model with its weights, as the project's trainer holds one."""
    from peft import get_peft_model

    model = toy_model(tokenizer_once(), seed=0)
    if lora:
        model = get_peft_model(model, engine.module.peft_config["default"])
    missing, unexpected = model.load_state_dict(full_state(engine.module), strict=False)
    assert not unexpected and all("lm_head" in name for name in missing)  # the toy's head is tied to its embeddings
    return model.train()


@functools.lru_cache(maxsize=None)
def tokenizer_once():
    return toy_tokenizer()


def normalizers_for(mode: str, lengths) -> list:
    """The per-rollout normalizers that make the trainer's summed step verl's loss_agg_mode."""
    tokens, batch = sum(lengths), len(lengths)
    return {
        "token-mean": [tokens] * batch,
        "token-sum": [1] * batch,
        "seq-mean-token-sum": [batch] * batch,
        "seq-mean-token-mean": [batch * n for n in lengths],
    }[mode]


def reference_engine(model_dir: str):
    """verl's own engine of the unchanged model, as verl builds its reference model."""
    model_config = HFModelConfig(
        path=model_dir,
        use_remove_padding=False,
        enable_gradient_checkpointing=False,
        override_config={"attn_implementation": "sdpa"},
    )
    engine_config = FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, mixed_precision={"param_dtype": "fp32"})
    engine = FSDPEngineWithLMHead(
        model_config=model_config,
        engine_config=engine_config,
        optimizer_config=FSDPOptimizerConfig(lr=0.0, total_training_steps=1, clip_grad=1.0),
        checkpoint_config=CheckpointConfig(),
    )
    engine.initialize()
    return engine


@pytest.mark.parametrize(
    "lora, weights",
    [(True, "base"), (False, "current"), (False, "base")],
    ids=["lora-base", "full-current", "full-base"],
)
@pytest.mark.parametrize("mode", ["pmi", "opsd"])
def test_actor_update_equals_trainer_step(model_dir, lora, weights, mode):
    """One actor update on a fixed rollout batch (two micro-batches of two, verl's gradient
    accumulation) gives the trainer step's loss and gradients, for every loss_agg_mode. The
    frozen base: LoRA's adapter off, or for full fine-tuning verl's reference model (the
    trainer's frozen copy), the actor's weights moved away from it."""
    tokenizer = tokenizer_once()
    engine = verl_engine(model_dir, lora, micro_batch=2)
    frozen = None
    if weights == "base" and not lora:
        engine.pmi_reference_engine = reference_engine(model_dir)
        frozen = reference_model(engine.pmi_reference_engine, lora=False).eval().requires_grad_(False)
        with torch.no_grad():
            for param in engine.module.parameters():
                param.to_local().add_(torch.randn_like(param.to_local()), alpha=0.05)
    model = reference_model(engine, lora)
    rows = toy_problems(4, seed=int(torch.randint(1000, ())))
    lengths = torch.randint(2, RESPONSE_WIDTH + 1, (4,)).tolist()
    data, prompts, responses = rollout_batch(tokenizer, rows, lengths, micro_batch=2)
    anchor = weights == "base" and mode == "pmi"
    pmi_keys = dict(
        mode=mode,
        teacher_weights=weights,
        anchor=anchor,
        beta=float(torch.empty(()).uniform_(0.5, 2.0)),
        clip=5.0,
        jsd_beta=0.0,
    )
    train_keys = dict(
        lora=lora, teacher_weights=weights, anchor=anchor, mode=mode, beta=pmi_keys["beta"], clip=5.0, jsd_beta=0.0
    )
    for agg_mode in AGG_MODES:
        actor_config = ActorConfig(
            strategy="fsdp2",
            loss_agg_mode=agg_mode,
            ppo_mini_batch_size=4,
            rollout_n=1,
            ppo_micro_batch_size_per_gpu=2,
            use_dynamic_bsz=False,
        )
        loss_fn = PMILoss(actor_config, PMIConfig.from_mapping(pmi_keys, lora=lora, reference_model=True))
        engine.optimizer_zero_grad()
        with engine.train_mode(zero_grad_on_exit=False):  # the gradients, before the optimizer step
            outputs = engine.forward_backward_batch(data.clone(), loss_fn)
        verl_loss = float(outputs["metrics"]["pmi/loss"].aggregate())  # the micro-batches summed
        verl_grads = full_grads(engine.module)

        model.zero_grad(set_to_none=True)
        expected = trainer_step(
            model, frozen, tokenizer, rows, prompts, responses, train_keys, normalizers_for(agg_mode, lengths)
        )
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert verl_loss == pytest.approx(expected, rel=1e-5, abs=1e-6), agg_mode
        assert set(verl_grads) == set(grads), agg_mode
        for name, grad in grads.items():
            torch.testing.assert_close(verl_grads[name], grad, rtol=1e-5, atol=1e-6, msg=f"{agg_mode}: {name}")


def actor_update_grads(engine, data, loss_fn) -> dict:
    engine.optimizer_zero_grad()
    with engine.train_mode(zero_grad_on_exit=False):
        engine.forward_backward_batch(data.clone(), loss_fn)
    return full_grads(engine.module)


def test_pmi_loss_adds_to_verl_policy_loss(model_dir):
    """use_task_rewards: the actor's gradient is verl's own PPO loss's (its ppo_loss, through
    verl's own forward_step) plus loss_coef times the PMI loss's."""
    tokenizer = tokenizer_once()
    engine = verl_engine(model_dir, lora=True, micro_batch=2)
    rows = toy_problems(4, seed=int(torch.randint(1000, ())))
    data, _, _ = rollout_batch(tokenizer, rows, torch.randint(2, RESPONSE_WIDTH + 1, (4,)).tolist(), micro_batch=2)
    data["old_log_probs"] = -torch.rand(4, RESPONSE_WIDTH) * 5
    data["advantages"] = torch.randn(4, RESPONSE_WIDTH)
    actor_config = ActorConfig(
        strategy="fsdp2",
        loss_agg_mode="token-mean",
        ppo_mini_batch_size=4,
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=2,
        use_dynamic_bsz=False,
    )
    coef = float(torch.empty(()).uniform_(0.1, 2.0))
    pmi_keys = dict(mode="pmi", anchor=True)
    combined = actor_update_grads(
        engine,
        data,
        PMILoss(
            actor_config, PMIConfig.from_mapping({**pmi_keys, "use_task_rewards": True, "loss_coef": coef}, lora=True)
        ),
    )
    alone = actor_update_grads(engine, data, PMILoss(actor_config, PMIConfig.from_mapping(pmi_keys, lora=True)))
    policy = actor_update_grads(engine, data, functools.partial(ppo_loss, config=actor_config))
    assert set(combined) == set(alone) == set(policy)
    for name, grad in combined.items():
        torch.testing.assert_close(grad, policy[name] + coef * alone[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "key, value, lora",
    [
        ("mode", "kl", True),
        ("beta", 0.0, True),
        ("clip", -1.0, True),
        ("jsd_beta", 2.0, True),
        ("entry_clip", 0.0, True),
        ("center", "yes", True),
        ("anchor", 1, True),
        ("teacher_weights", "ema", True),
        ("teacher_weights", "base", False),
        ("loss_coef", -1.0, True),
        ("diagnostics_every", -2, True),
        ("use_task_rewards", "no", True),
        ("reference_key", "extra_info.", True),
        ("templates", {"teacher": "{x}"}, True),
        ("templates", {"student": "{question}"}, True),
        ("betta", 1.0, True),
    ],
)
def test_bad_key_is_refused_by_name(key, value, lora):
    with pytest.raises(ValueError, match=rf"^pmi\.{key}"):
        PMIConfig.from_mapping({key: value}, lora=lora)


@pytest.mark.parametrize(
    "node, key",
    [
        ({"actor": {"strategy": "fsdp"}}, "actor_rollout_ref.actor.strategy"),
        ({"actor": {"strategy": "megatron"}}, "actor_rollout_ref.actor.strategy"),
        ({"model": {"use_fused_kernels": True}}, "actor_rollout_ref.model.use_fused_kernels"),
        ({"pmi": {"beta": -1}}, "pmi.beta"),
        ({"model": {"lora_rank": 0}}, "pmi.teacher_weights"),
    ],
)
def test_actor_settings_are_checked_by_name(node, key):
    """check_actor_config, which the launcher runs before Ray starts and the worker again."""
    actor_rollout_ref = {"actor": {"strategy": "fsdp2"}, "model": {"lora_rank": 8}, "pmi": {}}
    for part, values in node.items():
        actor_rollout_ref[part] = {**actor_rollout_ref[part], **values}
    with pytest.raises(ValueError, match=rf"^{re.escape(key)}"):
        check_actor_config(actor_rollout_ref)


def test_worker_builds_the_pmi_engine():
    """PMITrainingWorker's engine comes from verl's EngineRegistry as the PMI subclass of the
    engine registered for FSDP2 (its registry entries are restored afterwards)."""
    table = EngineRegistry._engines["language_model"]["fsdp2"]
    before = dict(table)
    with pmi_engines():
        for key, cls in table.items():
            assert issubclass(cls, PMIEngineMixin) and issubclass(cls, before[key])
    assert table == before
    assert PMIActorRolloutRefWorker.actor_worker_cls is PMITrainingWorker


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "verl")


def test_example_config_composes_with_verl():
    """examples/verl/pmi_qwen3.yaml composes over verl's own ppo_trainer (Hydra's struct mode
    refuses a key verl does not have) and passes the launcher's checks."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=EXAMPLES, version_base=None):
        config = compose(config_name="pmi_qwen3", overrides=["actor_rollout_ref.pmi.mode=opsd"])
    check_config(config)
    assert config.actor_rollout_ref.pmi.mode == "opsd" and not config.trainer.use_v1
    pmi = check_actor_config(config.actor_rollout_ref)
    assert pmi.teacher_weights == "base" and pmi.reference_key == "extra_info.reference"


def test_launcher_refuses_a_bad_key_in_one_line(tmp_path):
    """The documented command with a bad key: exit 2 and one line naming it, before Ray starts
    (run in tmp_path: Hydra writes its outputs/ directory where it runs)."""
    command = [
        sys.executable,
        "-m",
        "pmi_kernels.integrations.verl.main",
        "--config-path",
        EXAMPLES,
        "--config-name",
        "pmi_qwen3",
        "actor_rollout_ref.pmi.jsd_beta=1.5",
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: pmi.jsd_beta")
    assert "Traceback" not in done.stderr


def test_logged_statistics_and_diagnostics_match_the_trainer(model_dir):
    """pmi/<statistic> and, on a diagnostics step, pmi/diag/<key>: the masked means per response
    token of the micro-batch (here the whole batch), as the trainer's diagnostics sum them."""
    tokenizer = tokenizer_once()
    engine = verl_engine(model_dir, lora=True, micro_batch=4)
    model = reference_model(engine, lora=True)
    rows = toy_problems(4, seed=int(torch.randint(1000, ())))
    lengths = torch.randint(2, RESPONSE_WIDTH + 1, (4,)).tolist()
    data, prompts, responses = rollout_batch(tokenizer, rows, lengths, micro_batch=4)
    actor_config = ActorConfig(
        strategy="fsdp2",
        loss_agg_mode="token-mean",
        ppo_mini_batch_size=4,
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=4,
        use_dynamic_bsz=False,
    )
    loss_fn = PMILoss(actor_config, PMIConfig.from_mapping({"anchor": True, "diagnostics_every": 1}, lora=True))
    with engine.train_mode():
        metrics = engine.forward_backward_batch(data.clone(), loss_fn)["metrics"]
    config = TrainConfig(packed=False, lora=True, anchor=True)
    contexts = ContextReader(
        config,
        World(),
        torch.device("cpu"),
        model,
        None,
        trainer_prompts(tokenizer, config, rows, prompts),
        tokenizer.eos_token_id,
    )
    totals = {"loss": 0.0}
    distil(contexts, list(enumerate(responses)), sum(lengths), True, totals, StepTimer(contexts.device))
    for key in ("kl_target_student", "entropy_student", "entropy_target"):
        assert float(metrics[f"pmi/{key}"].aggregate()) == pytest.approx(totals[key] / sum(lengths), rel=1e-4), key
    for key in DIAGNOSTICS:
        assert float(metrics[f"pmi/diag/{key}"].aggregate()) == pytest.approx(
            totals[key] / sum(lengths), rel=1e-4, abs=1e-6
        ), key


def test_full_fine_tuning_reads_the_base_from_verls_reference_model():
    """teacher_weights "base" without LoRA is accepted where verl keeps its reference model in
    the actor's worker (use_kl_loss), and an engine without one refuses it by name."""
    actor_rollout_ref = {"actor": {"strategy": "fsdp2", "use_kl_loss": True}, "model": {"lora_rank": 0}, "pmi": {}}
    assert check_actor_config(actor_rollout_ref).teacher_weights == "base"
    engine = PMIEngineMixin()
    engine._is_lora = False
    with pytest.raises(ValueError, match=r"^pmi\.teacher_weights"):
        with engine._frozen_model(PMIConfig.from_mapping({}, lora=False, reference_model=True)):
            pass
