"""run.precision (bf16-mixed autocast over float32 weights), TF32, pinned transfers, the collective backend,
and the update's single host read per optimizer step. CUDA-only behaviour is skipped without a GPU."""

import pytest
import torch

from opdplus.models.forward import HiddenForward
from opdplus.ops.advantages import advantages
from opdplus.rollout.fast_sampler import FastSampler
from opdplus.rollout.sampler import SamplingSettings
from opdplus.rollout.types import to_device
from opdplus.train import ConfigError, train
from opdplus.train.builders import build_student, build_tasks, build_teacher, prompts_for_step
from opdplus.train.distributed import process_group_backend
from opdplus.train.metrics import read_metrics
from opdplus.train.precision import autocast_for, enable_tf32
from opdplus.train.schedule import build_optimizer
from opdplus.train.update import update_policy

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (this machine has none)")
CPU = torch.device("cpu")

# One update step's loss under bf16-mixed vs fp32 on the tiny models: bfloat16 keeps 8 bits of mantissa
# (relative rounding 2^-9 ~ 0.2%) on the matmul inputs, and the log-probs behind the loss are differences of
# numbers of order 1-5, so the loss (a mean of advantage-weighted log-probs) agrees to about 1e-2 relative.
BF16_LOSS_RTOL = 2e-2


def test_autocast_for_fp32_keeps_float32_and_bf16_mixed_computes_bfloat16():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast_for("fp32", CPU):
        assert (a @ b).dtype == torch.float32
    with autocast_for("bf16-mixed", CPU):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16-mixed"):
        autocast_for("fp16", CPU)


def test_tf32_is_set_only_on_cuda():
    assert enable_tf32(CPU) is False


@needs_cuda
def test_tf32_enabled_on_cuda():
    assert enable_tf32(torch.device("cuda")) is True
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_collective_backend_is_nccl_on_cuda_and_gloo_on_cpu():
    assert process_group_backend(torch.device("cuda", 0)) == "nccl"
    assert process_group_backend(CPU) == "gloo"


def test_to_device_on_cpu_is_the_same_values():
    t = torch.arange(6).view(2, 3)
    assert torch.equal(to_device(t, CPU), t)


@needs_cuda
def test_to_device_to_cuda_goes_through_pinned_memory():
    t = torch.arange(6.0).view(2, 3)
    moved = to_device(t, torch.device("cuda"))
    torch.cuda.synchronize()
    assert moved.is_cuda and torch.equal(moved.cpu(), t)


def test_bf16_mixed_needs_a_float32_student(tiny_train_config, tmp_path):
    with pytest.raises(ConfigError, match="needs student.dtype=float32"):
        tiny_train_config(tmp_path / "run", "run.precision=bf16-mixed", "student.dtype=bfloat16")
    cfg = tiny_train_config(tmp_path / "run", "run.precision=bf16-mixed", "teacher.dtype=bfloat16")
    assert cfg.run.precision == "bf16-mixed" and cfg.teacher.dtype == "bfloat16"


# Tensor -> Python number conversions (a host-device sync on a GPU) that metrics use. ``int`` / ``bool`` reads
# also happen per micro-batch, but of the CPU-resident rollout batch (trimming padding columns) and inside
# transformers' attention-mask builder, which decides whether the mask can be skipped.
HOST_READS = ("item", "tolist", "__float__")


def _update_once(
    cfg, precision: str, micro_batch_size: int = 3, reads: list[str] | None = None
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One update_policy step on a fixed batch of the tiny models, under ``precision``; with ``reads``, the
    names of the tensor -> Python conversions made inside update_policy are appended to it."""
    student, tok = build_student(cfg, CPU)
    teacher = build_teacher(cfg, tok, student, CPU)
    settings = SamplingSettings(max_new_tokens=10, samples_per_prompt=2)
    batch = FastSampler(student, tok, settings, torch.Generator().manual_seed(0)).sample(
        prompts_for_step(build_tasks(cfg, tok), 4, 0, 1)
    )
    batch.teacher_logprobs_B_T = teacher.score(batch)
    adv = advantages(
        batch.sampler_logprobs_B_T,
        batch.teacher_logprobs_B_T,
        batch.loss_mask_B_T,
        divergence="reverse_kl",
        estimator="opd_plus",
    )
    policy = HiddenForward(student)
    optimizer, scheduler = build_optimizer(policy, cfg)
    with pytest.MonkeyPatch.context() as patch, autocast_for(precision, CPU):
        if reads is not None:
            for name in HOST_READS:
                patch.setattr(torch.Tensor, name, _counted(getattr(torch.Tensor, name), name, reads))
        metrics = update_policy(
            policy, optimizer, scheduler, batch, adv, micro_batch_size=micro_batch_size, clip_eps=0.2
        )
    return metrics, {k: v.detach().clone() for k, v in student.state_dict().items()}


def _counted(method, name: str, reads: list[str]):
    def wrapper(self, *args, **kwargs):
        reads.append(name)
        return method(self, *args, **kwargs)

    return wrapper


def test_bf16_mixed_update_matches_fp32_and_keeps_float32_weights(tiny_train_config, tmp_path):
    cfg = tiny_train_config(tmp_path / "run", "data.prompts_per_step=4", "rollout.max_new_tokens=10")
    fp32, fp32_state = _update_once(cfg, "fp32")
    bf16, bf16_state = _update_once(cfg, "bf16-mixed")
    assert bf16["loss/policy"] == pytest.approx(fp32["loss/policy"], rel=BF16_LOSS_RTOL)
    assert bf16["loss/grad_norm"] == pytest.approx(fp32["loss/grad_norm"], rel=5e-2)
    assert all(v.dtype == torch.float32 for v in bf16_state.values())  # master weights stay float32
    assert any(not torch.equal(fp32_state[k], bf16_state[k]) for k in fp32_state)  # bf16 compute did run


def test_update_host_reads_do_not_grow_with_micro_batches(tiny_train_config, tmp_path):
    """The micro-batches' loss and clip sums stay on the device: one optimizer step makes as many metric reads
    (tensor -> Python number) with 8 micro-batches as with 1."""
    cfg = tiny_train_config(tmp_path / "run", "data.prompts_per_step=4", "rollout.max_new_tokens=10")
    one, eight = [], []
    _update_once(cfg, "fp32", micro_batch_size=8, reads=one)
    _update_once(cfg, "fp32", micro_batch_size=1, reads=eight)
    assert one and len(eight) == len(one), (one, eight)


def test_tiny_training_run_in_bf16_mixed(tiny_train_config, tmp_path):
    cfg = tiny_train_config(tmp_path / "run", "run.steps=2", "run.precision=bf16-mixed", "rollout.sampler=fast")
    result = train(cfg)
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in rows)
    assert (result.run_dir / "config.yaml").read_text().count("precision: bf16-mixed") == 1
