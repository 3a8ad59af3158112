"""Config: presets, overrides, type checks, validation errors, YAML round trip."""

import dataclasses
import functools
import typing
from pathlib import Path

import pytest
import yaml

from opdplus.train import config
from opdplus.train.config import (
    ConfigError,
    TrainConfig,
    divergence_kwargs,
    from_dict,
    load_config,
    to_dict,
    to_yaml,
    with_overrides,
)
from opdplus.train.schedule import lr_factor

REPO = Path(__file__).resolve().parents[2]


def test_every_training_preset_loads_and_validates():
    """Every YAML in configs/ is a training preset, except sweep specs (a top-level ``grid``) and
    ``opdplus sft`` presets (``*_sft_*.yaml``, loaded in tests/integration/test_sft.py)."""
    presets = [
        p
        for p in sorted((REPO / "configs").glob("*.yaml"))
        if "grid" not in (yaml.safe_load(p.read_text()) or {}) and "_sft_" not in p.name
    ]
    assert REPO / "configs" / "tiny.yaml" in presets
    for preset in presets:
        assert isinstance(load_config(preset), TrainConfig), preset


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        REPO / "configs/tiny.yaml",
        [
            "loss.divergence=jsd",
            "loss.estimator=opd",
            "optim.lr=3e-4",
            "run.steps=7",
            "loss.log_ratio_clip=null",
            "data.tasks=[contains]",
            "student.lora.enabled=true",
            "data.task_options={contains: {target: b}}",
        ],
    )
    assert cfg.loss.divergence == "jsd" and cfg.loss.estimator == "opd"
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.run.steps == 7 and cfg.loss.log_ratio_clip is None
    assert cfg.student.lora.enabled is True
    assert cfg.data.task_options == {"contains": {"target": "b"}}


def test_partial_nested_section_keeps_the_fields_own_defaults():
    cfg = load_config(None, ["teacher.tiny.hidden_size=32"])
    default_teacher = TrainConfig().teacher.tiny
    assert cfg.teacher.tiny.hidden_size == 32
    assert (cfg.teacher.tiny.seed, cfg.teacher.tiny.num_layers) == (default_teacher.seed, default_teacher.num_layers)
    assert cfg.teacher.tiny.seed != cfg.student.tiny.seed  # teacher and student differ by default


def test_parameterised_divergence():
    cfg = load_config(None, ["loss.divergence=alpha", "loss.alpha=0.5"])
    assert divergence_kwargs(cfg.loss) == {"alpha": 0.5}
    with pytest.raises(ConfigError, match="needs loss.alpha"):
        load_config(None, ["loss.divergence=alpha"])
    with pytest.raises(ConfigError, match="reverse_kl"):
        load_config(None, ["loss.divergence=alpha", "loss.alpha=0"])  # the divergence's own message
    with pytest.raises(ConfigError, match="only used by loss.divergence=alpha"):
        load_config(None, ["loss.alpha=0.5"])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"'loss.divergance'.*valid keys at loss: divergence, alpha, estimator"):
        load_config(None, ["loss.divergance=jsd"])
    with pytest.raises(ConfigError, match=r"'lr'.*valid keys at top level: run, student, teacher"):
        load_config(None, ["lr=0.1"])
    with pytest.raises(ConfigError, match=r"'student.lora.rank'.*valid keys at student.lora: enabled, r, alpha"):
        load_config(None, ["student.lora.rank=4"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lr=fast", r"optim.lr: expected float, got str 'fast'"),
        ("run.steps=2.5", r"run.steps: expected int, got float 2.5"),
        ("run.steps=true", r"run.steps: expected int, got bool True"),
        ("student.lora.enabled=1", r"student.lora.enabled: expected bool, got int 1"),
        ("data.tasks=contains", r"data.tasks: expected a list"),
        ("loss=3", r"loss: expected a mapping"),
    ],
)
def test_wrong_types(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.divergence=kl", r"unknown; valid divergences: reverse_kl, forward_kl"),
        ("loss.estimator=ppo", r"loss.estimator='ppo' is not one of: opd, opd_plus"),
        ("loss.gamma=1.5", r"loss.gamma must be in \[0, 1\]"),
        ("loss.clip_eps=1.5", r"loss.clip_eps must be in \(0, 1\)"),
        ("rollout.temperature=0", r"rollout.temperature must be > 0"),
        ("rollout.top_p=0", r"rollout.top_p must be in \(0, 1\]"),
        ("run.steps=0", r"run.steps must be >= 1 \(or 0 with eval.at_start=true"),
        ("student.dtype=fp8", r"student.dtype='fp8' is not one of: float32, bfloat16, float16"),
        ("run.device=tpu", r"run.device='tpu'"),
        ("optim.schedule=step", r"optim.schedule='step' is not one of"),
        ("data.task_options={other: {}}", r"data.task_options names tasks not in data.tasks: other"),
        ("run.progress=fancy", r"run.progress='fancy'"),
        ("optim.lr=inf", r"optim.lr=inf must be a finite number"),
        ("optim.weight_decay=inf", r"optim.weight_decay=inf must be a finite number"),
        ("optim.weight_decay=.nan", r"optim.weight_decay=nan must be a finite number"),
        ("optim.weight_decay=-0.1", r"optim.weight_decay must be >= 0"),
        ("optim.eps=0", r"optim.eps must be > 0"),
        ("optim.betas=[0.9, .nan]", r"optim.betas\[1\]=nan must be a finite number"),
        ("loss.log_ratio_clip=.inf", r"loss.log_ratio_clip=inf must be a finite number"),
        ("teacher.timeout_s=.inf", r"teacher.timeout_s=inf must be a finite number"),
        ("student.dtype=float16", r"student.dtype=float16 cannot be trained: .* use student.dtype=bfloat16"),
    ],
)
def test_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["loss.divergence"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(tmp_path / "list.yaml")


def test_a_config_that_is_a_directory_or_binary_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; give a YAML file"):
        load_config(tmp_path)
    (tmp_path / "bin.yaml").write_bytes(bytes(range(128, 256)))
    with pytest.raises(ConfigError, match="is not a text file"):
        load_config(tmp_path / "bin.yaml")


def test_a_float16_teacher_is_allowed():
    assert load_config(None, ["teacher.dtype=float16"]).teacher.dtype == "float16"


def test_yaml_round_trip_is_exact(tmp_path):
    cfg = load_config(REPO / "configs/tiny.yaml", ["loss.divergence=alpha", "loss.alpha=-0.5", "loss.log_ratio_clip=5"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "config.yaml") == cfg
    assert from_dict(TrainConfig, yaml.safe_load(to_yaml(cfg))) == cfg


def test_config_is_frozen_and_with_overrides_copies():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.steps = 3  # type: ignore[misc]
    other = with_overrides(cfg, ["run.steps=3"])
    assert other.run.steps == 3 and cfg.run.steps == TrainConfig().run.steps
    assert to_dict(other)["run"]["steps"] == 3


def test_lr_schedules():
    factor = functools.partial(lr_factor, warmup_steps=2, total_steps=12, min_lr_ratio=0.1)
    assert [factor(s, schedule="constant") for s in (0, 1, 2, 11)] == [0.5, 1.0, 1.0, 1.0]
    assert factor(2, schedule="linear") == pytest.approx(1.0)
    assert factor(12, schedule="linear") == pytest.approx(0.1)
    assert factor(7, schedule="cosine") == pytest.approx(0.1 + 0.9 * 0.5)
    assert factor(12, schedule="cosine") == pytest.approx(0.1)


def test_optional_loggers_must_be_installed():
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match=r"run.tensorboard=true needs tensorboard: pip install 'opdplus\[log\]'"):
            load_config(None, ["run.tensorboard=true"])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="run.wandb=true needs wandb"):
            load_config(None, ["run.wandb=true"])


def test_forward_kl_eval_needs_a_local_teacher():
    with pytest.raises(ConfigError, match="eval.forward_kl=true samples from the teacher"):
        load_config(None, ["eval.forward_kl=true", "teacher.url=http://127.0.0.1:9"])
    assert load_config(None, ["eval.forward_kl=true"]).eval.forward_kl


def _leaf_keys(data: dict, prefix: str = "") -> list[str]:
    return [
        key
        for name, value in data.items()
        for key in (_leaf_keys(value, f"{prefix}{name}.") if isinstance(value, dict) and value else [f"{prefix}{name}"])
    ]


def test_help_config_prints_every_key_with_type_default_and_help(capsys):
    from opdplus.commands import main
    from opdplus.ops.divergences import register_divergence, unregister_divergence

    register_divergence("my_sq", lambda u: (u - 1) ** 2)
    try:
        assert main(["train", "--help-config"]) == 0
    finally:
        unregister_divergence("my_sq")
    rows = {row[0]: row[1:] for row in (line.split("\t") for line in capsys.readouterr().out.splitlines())}
    assert all(len(rest) == 3 and all(rest) for rest in rows.values()), rows  # type, default, help: never empty
    assert set(_leaf_keys(to_dict(TrainConfig()))) <= set(rows)
    assert {"teachers", "teachers[].task", "teachers[].teacher.url"} <= set(rows)
    assert rows["loss.estimator"][:2] == ["{opd,opd_plus}", "opd_plus"]
    assert rows["loss.divergence"][0].startswith("{reverse_kl,forward_kl,") and "my_sq" in rows["loss.divergence"][0]
    assert rows["rollout.sampler"][:2] == ["{hf,fast}", "hf"]
    assert rows["loss.teacher_signal"][:2] == ["{sampled,topk,exact}", "sampled"]
    assert rows["parallel.mode"][:2] == ["{ddp,fsdp}", "ddp"]
    assert rows["update.ppo_epochs"][:2] == ["int", "1"]
    assert rows["loss.log_ratio_clip"][:2] == ["float | None", "null"]
    assert rows["teacher.tiny.hidden_size"][1] == "96" and rows["student.tiny.hidden_size"][1] == "64"
    assert not set(config.RENAMED_KEYS) & set(rows)


def test_choices_have_one_source():
    from opdplus.ops.advantages import ESTIMATORS
    from opdplus.train.distributed import PARALLELISMS

    hints = typing.get_type_hints(config.LossConfig)
    assert typing.get_args(hints["estimator"]) == ESTIMATORS == ("opd", "opd_plus")
    assert typing.get_args(typing.get_type_hints(config.ParallelConfig)["mode"]) == PARALLELISMS
    assert typing.get_args(hints["teacher_signal"]) == typing.get_args(config.TeacherSignalName)
    # a config built without from_dict is checked too
    bad = dataclasses.replace(TrainConfig(), rollout=dataclasses.replace(TrainConfig().rollout, sampler="vllm"))
    with pytest.raises(ConfigError, match=r"rollout.sampler='vllm' is not one of: hf, fast"):
        config.validate(bad)


OLD_KEYS = ["train.parallelism=fsdp", "loss.micro_batch_size=3", "loss.logprob_chunk_size=64", "loss.ppo_epochs=2"]


def _check_renamed(cfg: TrainConfig) -> None:
    assert cfg.parallel.mode == "fsdp"
    assert (cfg.update.micro_batch_size, cfg.update.logprob_chunk_size, cfg.update.ppo_epochs) == (3, 64, 2)


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: config key")]


def test_renamed_keys_in_overrides_warn_once_each(capsys):
    _check_renamed(load_config(None, [*OLD_KEYS, "loss.ppo_epochs=2"]))
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 4, lines  # one line per old key, even when given twice
    assert "warning: config key loss.ppo_epochs is now update.ppo_epochs (override); see CHANGELOG.md" in lines
    assert load_config(None, ["update.ppo_epochs=2"]).update.ppo_epochs == 2
    assert _warnings(capsys.readouterr().err) == []


def test_renamed_keys_in_a_yaml_preset(tmp_path, capsys):
    preset = tmp_path / "old.yaml"
    preset.write_text(
        "train: {parallelism: fsdp}\nloss: {micro_batch_size: 3, logprob_chunk_size: 64, ppo_epochs: 2, gamma: 0.5}\n"
    )
    cfg = load_config(preset, ["update.micro_batch_size=3"])
    _check_renamed(cfg)
    assert cfg.loss.gamma == 0.5
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 4
    assert f"warning: config key train.parallelism is now parallel.mode (in {preset}); see CHANGELOG.md" in lines
    assert "parallelism" not in to_yaml(cfg) and "update:" in to_yaml(cfg)
    with pytest.raises(ConfigError, match="loss.ppo_epochs is the old name of update.ppo_epochs and both are set"):
        preset.write_text("loss: {ppo_epochs: 2}\nupdate: {ppo_epochs: 3}\n")
        load_config(preset)


def test_resume_translates_a_stored_config_with_old_keys(tmp_path, capsys):
    """A run directory written before the renames resumes: its config.yaml goes through the same map."""
    import argparse

    from opdplus.commands import train as cli

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stored = to_dict(load_config(None, [f"run.dir={run_dir}", "update.micro_batch_size=3", "parallel.mode=fsdp"]))
    stored["train"] = {"parallelism": stored.pop("parallel")["mode"]}
    stored["loss"].update(stored.pop("update"))
    stored["loss"].update(ppo_epochs=2, logprob_chunk_size=64)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(stored))
    capsys.readouterr()
    args = argparse.Namespace(resume=str(run_dir), config=None, overrides=["run.steps=5"])
    cfg = cli._load(args)
    _check_renamed(cfg)
    assert cfg.run.steps == 5 and cfg.run.dir == str(run_dir)
    assert len(_warnings(capsys.readouterr().err)) == 4


def test_every_sweep_spec_expands_to_valid_training_configs():
    """configs/sweep.yaml and the real-model grids: every run of the grid is a valid training config."""
    from opdplus.sweep import expand_grid, load_sweep_file
    from opdplus.train.config import config_from_dict

    specs = [REPO / "configs" / "sweep.yaml", *sorted((REPO / "configs" / "real_transfer").glob("*.yaml"))]
    assert len(specs) >= 3
    for path in specs:
        data = load_sweep_file(path)
        runs = expand_grid(data["train"], data["grid"], Path("runs/x"), int(data.get("eval_items", 200)))
        assert len(runs) == (36 if path.name == "sweep.yaml" else 18), path
        for run in runs:
            assert isinstance(config_from_dict(run.train), TrainConfig), (path, run.name)
