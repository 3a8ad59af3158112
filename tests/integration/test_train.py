"""End-to-end training on tiny random models: every estimator x divergence, LoRA, invariance of the
update to micro-batching, artifacts, and each configuration error."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdplus.ops.advantages import advantages
from opdplus.ops.divergences import divergence_names
from opdplus.rollout.sampler import Sampler, SamplingSettings
from opdplus.tasks.base import TaskItem, register_task
from opdplus.train import ConfigError, RunDirError, train
from opdplus.train.builders import build_student, build_tasks, build_teacher, prompts_for_step
from opdplus.train.checkpoint import CorruptCheckpointError, verify_checkpoint
from opdplus.train.config import load_config, with_overrides
from opdplus.train.metrics import read_metrics
from opdplus.train.schedule import build_optimizer
from opdplus.train.update import update_policy

NAMESPACES = ("loss/", "div/", "adv/", "rollout/", "eval/", "perf/")


def _initial_student_state(cfg):
    model, _ = build_student(cfg, torch.device("cpu"))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _changed(before, after):
    return [k for k in after if not torch.equal(before[k], after[k])]


DIVERGENCES = [(name, ["loss.alpha=0.5"] if name == "alpha" else []) for name in divergence_names()]


@pytest.mark.parametrize("estimator", ["opd", "opd_plus"])
@pytest.mark.parametrize("divergence,extra", DIVERGENCES, ids=[d for d, _ in DIVERGENCES])
def test_three_steps_every_estimator_and_divergence(tmp_path, estimator, divergence, extra, tiny_train_config):
    cfg = tiny_train_config(tmp_path / "run", f"loss.divergence={divergence}", f"loss.estimator={estimator}", *extra)
    before = _initial_student_state(cfg)
    result = train(cfg)
    checkpoint = result.checkpoint
    assert checkpoint is not None
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert math.isfinite(row["loss/policy"]) and math.isfinite(row[f"div/{divergence}"])
        assert math.isfinite(row["adv/mean"]) and row["loss/skipped_steps"] == 0
    after = load_file(str(checkpoint / "model" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in after.values())
    assert _changed(before, after), "training did not change any parameter"


def test_artifacts_and_metric_keys(tmp_path, tiny_train_config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tiny_train_config(
        tmp_path / "run", "eval.at_end=true", "eval.every=2", "run.checkpoint_every=2", "run.keep_checkpoints=0"
    )
    result = train(cfg)
    checkpoint = result.checkpoint
    assert checkpoint is not None
    run_dir = result.run_dir
    assert load_config(run_dir / "config.yaml") == cfg
    rows = read_metrics(run_dir)
    keys = set().union(*rows) - {"step", "time"}
    assert all(k.startswith(NAMESPACES) for k in keys), sorted(keys)
    for key in (
        "loss/policy",
        "div/reverse_kl",
        "adv/mean",
        "adv/std",
        "adv/min",
        "adv/max",
        "adv/log_ratio_clip_frac",
        "rollout/len_mean",
        "rollout/len_max",
        "rollout/truncated_frac",
        "perf/sample_tok_s",
        "perf/score_tok_s",
        "perf/update_tok_s",
        "perf/peak_mem_mb",
    ):
        assert all(key in r for r in rows), key
    assert [("eval/reverse_kl" in r) for r in rows] == [False, True, True]
    assert "eval/contains/score" in rows[-1] and 0 <= rows[-1]["eval/score"] <= 1
    assert result.metrics["eval/reverse_kl"] == rows[-1]["eval/reverse_kl"]
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_00000002", "step_00000003"]
    verify_checkpoint(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint / "model")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "model")
    assert tokenizer.chat_template and model.config.vocab_size == len(tokenizer)
    saved = load_file(str(checkpoint / "model" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k in saved)


def test_eval_at_start_logs_the_starting_policy_as_step_zero(tiny_train_config, tmp_path):
    run_dir = tmp_path / "run"
    result = train(tiny_train_config(run_dir, "eval.at_start=true", "eval.at_end=true", "run.steps=2"))
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2] and result.step == 2
    assert "eval/reverse_kl" in rows[0] and "loss/policy" not in rows[0]  # evaluated, not trained
    assert rows[0]["eval/reverse_kl"] != rows[2]["eval/reverse_kl"]  # the same prompts, another policy
    only = train(tiny_train_config(tmp_path / "only", "eval.at_start=true", "run.steps=0"))
    assert [r["step"] for r in read_metrics(only.run_dir)] == [0] and only.checkpoint is None
    assert only.metrics["eval/reverse_kl"] == pytest.approx(rows[0]["eval/reverse_kl"])  # same seed, same start


def test_off_policy_features_run_finite(tmp_path, tiny_train_config):
    """Tempered top-k/top-p sampling (advantages from a recomputed student forward), PPO epochs with
    ratio clipping, a discount, a log-ratio clip and a linear schedule with warmup."""
    cfg = tiny_train_config(
        tmp_path / "run",
        "rollout.temperature=0.8",
        "rollout.top_k=20",
        "rollout.top_p=0.95",
        "update.ppo_epochs=2",
        "loss.clip_eps=0.1",
        "loss.gamma=0.9",
        "loss.log_ratio_clip=0.5",
        "loss.divergence=forward_kl",
        "optim.schedule=linear",
        "optim.warmup_steps=1",
    )
    with pytest.warns(UserWarning, match="off-policy"):
        result = train(cfg)
    rows = read_metrics(result.run_dir)
    assert all(math.isfinite(r["loss/policy"]) and math.isfinite(r["loss/policy_last_epoch"]) for r in rows)
    assert any(r["adv/log_ratio_clip_frac"] > 0 for r in rows)
    assert rows[0]["loss/lr"] == pytest.approx(0.01)  # warmup of one optimizer step: factor 1/1


def test_fast_sampler_backend(tmp_path, tiny_train_config):
    result = train(
        tiny_train_config(
            tmp_path / "run",
            "rollout.sampler=fast",
            "loss.divergence=jsd",
            "eval.at_end=true",
            "eval.score_decoding=greedy",
        )
    )
    rows = read_metrics(result.run_dir)
    assert len(rows) == 3 and all(math.isfinite(r["loss/policy"]) for r in rows)
    assert math.isfinite(rows[-1]["eval/reverse_kl"]) and "eval/contains/score" in rows[-1]


def test_lora_run_trains_only_the_adapter(tmp_path, tiny_train_config):
    from peft import PeftModel

    cfg = tiny_train_config(tmp_path / "run", "student.lora.enabled=true", "student.lora.r=4", "optim.lr=0.05")
    plain_cfg = tiny_train_config(tmp_path / "unused")  # the same student without LoRA
    base_before = _initial_student_state(plain_cfg)
    result = train(cfg)
    checkpoint = result.checkpoint
    assert checkpoint is not None
    model_dir = checkpoint / "model"
    adapter = load_file(str(model_dir / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert not (model_dir / "model.safetensors").exists()
    # The checkpoint loads the standard peft way onto a fresh base model.
    loaded = PeftModel.from_pretrained(build_student(plain_cfg, torch.device("cpu"))[0], model_dir)
    trained_b = [v for k, v in loaded.state_dict().items() if "lora_B" in k]
    assert trained_b and any((v != 0).any() for v in trained_b), "the adapter did not train (LoRA B starts at 0)"
    base_after = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in loaded.state_dict().items()
        if "lora_" not in k
    }
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before), "base weights must stay frozen"


def test_update_is_invariant_to_micro_batching(tmp_path, tiny_train_config):
    """One optimizer step on the same batch with micro-batch sizes 8, 3 and 1 (accumulation) gives the
    same parameters: the loss normalizer is the number of loss tokens of the whole step."""
    cfg = tiny_train_config(
        tmp_path / "run",
        "data.prompts_per_step=4",
        "rollout.max_new_tokens=10",
        "optim.max_grad_norm=null",
        "optim.lr=0.01",
    )
    student, tok = build_student(cfg, torch.device("cpu"))
    teacher = build_teacher(cfg, tok, student, torch.device("cpu"))
    tasks = build_tasks(cfg, tok)
    batch = Sampler(
        student, tok, SamplingSettings(max_new_tokens=10, samples_per_prompt=2), torch.Generator().manual_seed(0)
    ).sample(prompts_for_step(tasks, 4, 0, 1))
    # Unequal completion lengths (as if rows had stopped at EOS), so per-micro-batch means would differ.
    for row in range(batch.batch_size):
        cut = batch.prompt_len + 2 + row
        for mask in (batch.loss_mask_B_T, batch.attention_mask_B_T):
            mask[row, cut:] = False
        batch.sampler_logprobs_B_T[row, cut:] = 0.0
    batch.teacher_logprobs_B_T = teacher.score(batch)
    assert len(set(batch.completion_lengths_B().tolist())) == batch.batch_size
    adv = advantages(
        batch.sampler_logprobs_B_T,
        batch.teacher_logprobs_B_T,
        batch.loss_mask_B_T,
        divergence="jsd",
        estimator="opd_plus",
    )
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    results = {}
    for micro in (8, 3, 1):
        student.load_state_dict(initial)
        optimizer, scheduler = build_optimizer(student, cfg)
        metrics = update_policy(student, optimizer, scheduler, batch, adv, micro_batch_size=micro)
        results[micro] = ({k: v.clone() for k, v in student.state_dict().items()}, metrics)
    reference, ref_metrics = results[8]
    assert _changed(initial, reference)
    for micro in (3, 1):
        params, metrics = results[micro]
        for k in reference:
            torch.testing.assert_close(params[k], reference[k], atol=1e-6, rtol=1e-5)
        assert metrics["loss/policy"] == pytest.approx(ref_metrics["loss/policy"], rel=1e-5)
        assert metrics["loss/grad_norm"] == pytest.approx(ref_metrics["loss/grad_norm"], rel=1e-5)


@pytest.mark.filterwarnings("ignore:sampling temperature")
def test_resume_in_process_matches_uninterrupted_lora(tmp_path, tiny_train_config):
    """LoRA adapter, optimizer, schedule and RNG states round-trip through a checkpoint; the leftovers of
    a crash (a temp checkpoint dir, a half-written metrics line) are ignored."""
    lora = [
        "student.lora.enabled=true",
        "student.lora.r=4",
        "optim.lr=0.05",
        "run.checkpoint_every=1",
        "rollout.temperature=0.9",
        "optim.warmup_steps=2",
    ]
    full = train(tiny_train_config(tmp_path / "full", "run.steps=3", *lora))
    part_cfg = tiny_train_config(tmp_path / "part", "run.steps=2", *lora)
    train(part_cfg)
    (tmp_path / "part" / "checkpoints" / ".tmp-step_00000003-999").mkdir()
    with open(tmp_path / "part" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss/pol')
    train(with_overrides(part_cfg, ["run.steps=3"]), resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "part")) == strip(read_metrics(full.run_dir))
    assert not (tmp_path / "part" / "checkpoints" / ".tmp-step_00000003-999").exists()


def test_existing_run_dir_needs_resume_or_overwrite(tmp_path, tiny_train_config):
    cfg = tiny_train_config(tmp_path / "run", "run.steps=1")
    train(cfg)
    with pytest.raises(RunDirError, match="already exists; pass --resume .* or --overwrite"):
        train(cfg)
    (tmp_path / "run" / "marker").write_text("x")
    train(cfg, overwrite=True)
    assert not (tmp_path / "run" / "marker").exists()


def test_corrupt_or_partial_checkpoint_is_named_and_never_loaded(tmp_path, tiny_train_config):
    cfg = tiny_train_config(tmp_path / "run", "run.steps=2", "run.checkpoint_every=1", "run.keep_checkpoints=0")
    result = train(cfg)
    checkpoint = result.checkpoint
    assert checkpoint is not None
    weights = checkpoint / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(
        CorruptCheckpointError, match=r"step_00000002 is corrupt: file model/model.safetensors does not match"
    ):
        train(cfg, resume=True)
    (checkpoint / "manifest.json").unlink()
    with pytest.raises(
        CorruptCheckpointError,
        match=r"step_00000002 is partial: it has no manifest.json.*previous one is .*step_00000001",
    ):
        train(cfg, resume=True)
    (checkpoint.parent / "step_00000001" / "trainer_state.pt").write_bytes(b"truncated")
    with pytest.raises(CorruptCheckpointError, match=r"step_00000001 is corrupt: file trainer_state.pt has 9 bytes"):
        verify_checkpoint(checkpoint.parent / "step_00000001")


def test_vocabulary_mismatch_is_caught_with_both_sizes(tmp_path, tiny_train_config):
    from opdplus.models.tiny import build_char_tokenizer

    build_char_tokenizer(chars="0123456789 abc").save_pretrained(tmp_path / "small_tok")
    # cross_tokenizer=false: one tokenizer required (auto would score spans across the two tokenizers)
    cfg = tiny_train_config(
        tmp_path / "run", f"teacher.tokenizer={tmp_path / 'small_tok'}", "teacher.cross_tokenizer=false"
    )
    with pytest.raises(ConfigError, match=r"student tokenizer has 102 tokens, teacher tokenizer has 19"):
        train(cfg)


def test_teacher_head_smaller_than_students(tmp_path, tiny_train_config):
    from opdplus.models.tiny import build_char_tokenizer, build_tiny_model

    small = build_tiny_model(50, hidden_size=32, intermediate_size=64)
    small.save_pretrained(tmp_path / "teacher")
    build_char_tokenizer().save_pretrained(tmp_path / "teacher")
    cfg = tiny_train_config(tmp_path / "run", f"teacher.model={tmp_path / 'teacher'}")
    with pytest.raises(ConfigError, match=r"teacher model's output layer has 50 rows but the student's has 102"):
        train(cfg)


class _ChatTask:
    name = "chat_only"

    def items(self, split, n, seed=0):
        return [
            TaskItem(id=f"{split}-{i}", task=self.name, prompt=[{"role": "user", "content": "hi"}]) for i in range(n)
        ]

    def score(self, item, completion):
        return 0.0


def test_missing_chat_template_is_caught_before_training(tmp_path, tiny_train_config):
    from opdplus.models.tiny import build_char_tokenizer

    register_task("chat_only", _ChatTask)
    build_char_tokenizer(chat_template=None).save_pretrained(tmp_path / "plain_tok")
    cfg = tiny_train_config(
        tmp_path / "run",
        "data.tasks=[chat_only]",
        f"student.tokenizer={tmp_path / 'plain_tok'}",
        f"teacher.tokenizer={tmp_path / 'plain_tok'}",
    )
    with pytest.raises(ConfigError, match=r"data.tasks: task 'chat_only'.*no chat template"):
        train(cfg)
    assert read_metrics(tmp_path / "run") == []


def test_missing_model_directory(tmp_path, tiny_train_config):
    cfg = tiny_train_config(tmp_path / "run", f"student.model={tmp_path / 'nowhere'}")
    from opdplus.models.sources import ModelSourceError

    with pytest.raises(ModelSourceError, match="nowhere.*neither a local HF directory"):
        train(cfg)


def test_local_model_directory_student(tmp_path, tiny_model_dir, tiny_train_config):
    cfg = tiny_train_config(tmp_path / "run", f"student.model={tiny_model_dir}", "run.steps=1")
    result = train(cfg)
    assert math.isfinite(result.metrics["loss/policy"])


def test_cli(tmp_path, capsys):
    from opdplus.commands import main

    assert main(["train", "run.steps=3"]) == 2  # overrides but no preset
    assert "needs --config FILE" in capsys.readouterr().err
    preset = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    assert main(["train", "--config", preset, "loss.divergance=jsd"]) == 2
    assert "valid keys at loss" in capsys.readouterr().err
    run_dir = tmp_path / "cli_run"
    args = [
        "train",
        "--config",
        preset,
        f"run.dir={run_dir}",
        "run.steps=2",
        "rollout.max_new_tokens=6",
        "eval.every=0",
        "eval.num_prompts=2",
        "run.progress=plain",
    ]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "step 2/2" in out.err
    assert json.loads(out.out.strip().splitlines()[-1])["train"]["step"] == 2
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["train", "--resume", str(run_dir), "loss.divergence=jsd"]) == 2
    assert "cannot change loss.divergence when resuming" in capsys.readouterr().err
    assert main(["train", "--resume", str(run_dir), "run.steps=3"]) == 0
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 0  # nothing left to do: reports the last step
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["train"]["metrics"]
    assert last["loss/policy"] == read_metrics(run_dir)[-1]["loss/policy"]


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def test_opd_plus_moves_the_student_toward_the_teacher_and_stop_gradient_forward_kl_drifts(tmp_path, tiny_train_config):
    """The loop distils: with OPD+ the student's reverse KL to the teacher falls over 60 small steps (for
    reverse and forward KL), while stop-gradient forward KL drives it up (the collapse that docs/derivations.md,
    "The table", predicts)."""
    budget = [
        "run.steps=60",
        "optim.lr=0.01",
        "data.prompts_per_step=8",
        "rollout.samples_per_prompt=4",
        "update.micro_batch_size=32",
    ]
    trends = {}
    for divergence, estimator in (("reverse_kl", "opd_plus"), ("forward_kl", "opd_plus"), ("forward_kl", "opd")):
        cfg = tiny_train_config(
            tmp_path / f"{estimator}-{divergence}",
            *budget,
            f"loss.divergence={divergence}",
            f"loss.estimator={estimator}",
        )
        rows = read_metrics(train(cfg).run_dir)
        trends[estimator, divergence] = (rows[0]["div/reverse_kl"], _mean(rows[-15:], "div/reverse_kl"))
    start = trends["opd_plus", "reverse_kl"][0]
    assert all(first == start for first, _ in trends.values())  # same seed: the same first batch
    assert trends["opd_plus", "reverse_kl"][1] < 0.8 * start, trends
    assert trends["opd_plus", "forward_kl"][1] < 0.8 * start, trends
    assert trends["opd", "forward_kl"][1] > 3 * start, trends


def test_train_without_config_runs_the_demo(monkeypatch, capsys):
    """`opdplus train` with nothing else is the embedded default: the demo with its default arguments."""
    from opdplus.commands import demo, main

    seen = {}
    monkeypatch.setattr(demo, "run", lambda args: seen.setdefault("args", args) and 0)
    assert main(["train"]) == 0
    assert seen["args"].steps is None and seen["args"].eval_items == 200  # None: run.steps of configs/demo.yaml
    assert "running the demo" in capsys.readouterr().out


def test_tensorboard_logging(tiny_train_config, tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'opdplus[log]' (make install includes it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(tiny_train_config(tmp_path / "run", "run.tensorboard=true"))
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    logged = [e.value for e in events.Scalars("loss/policy")]
    assert len(logged) == 3
    assert logged == pytest.approx([m["loss/policy"] for m in read_metrics(result.run_dir)], rel=1e-6)


def test_eval_forward_kl_on_teacher_samples(tiny_train_config, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdplus.rollout.teacher import LocalTeacher
    from opdplus.tasks.base import get_task
    from opdplus.train.evaluate import evaluate

    result = train(tiny_train_config(tmp_path / "run", "eval.forward_kl=true", "eval.at_end=true", "run.steps=1"))
    row = read_metrics(result.run_dir)[-1]
    assert math.isfinite(row["eval/forward_kl"]) and row["eval/forward_kl"] > 0.01  # two different random models
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    same = evaluate(
        model,
        tokenizer,
        LocalTeacher(model),
        {"contains": get_task("contains")},
        num_prompts=4,
        max_new_tokens=6,
        seed=0,
        forward_kl=True,
    )
    assert abs(same["eval/forward_kl"]) < 1e-4 and abs(same["eval/reverse_kl"]) < 1e-4  # the teacher against itself
