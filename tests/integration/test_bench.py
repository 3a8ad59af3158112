"""Benchmark plumbing: the JSON-last-line contract of the scripts and `opdplus bench`'s merging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opdplus import benchmarks as bench_command
from opdplus.commands import main as cli_main

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_script(name: str, *args: str, timeout: float = 600) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=BENCH.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCH.parent)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return bench_command.last_json_line(proc.stdout)[name]


def test_last_json_line_and_merge():
    text = 'table\n  a  b\n{"bench": {"x": {"ratio": 2.0}}}\n\n'
    assert bench_command.last_json_line(text) == {"x": {"ratio": 2.0}}
    with pytest.raises(ValueError, match="last line"):
        bench_command.last_json_line('{"bench": {"x": {}}}\n{"other": {}}')
    assert bench_command.merge([{"a": {}}, {"b": {"r": 1}}]) == {"bench": {"a": {}, "b": {"r": 1}}}
    with pytest.raises(ValueError, match="same key"):
        bench_command.merge([{"a": {}}, {"a": {}}])


def _fake_bench(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text(f"import json, sys\nprint('a table')\n{body}\n")


def test_cli_merges_benchmarks_and_reports_failures(tmp_path, monkeypatch, capsys):
    _fake_bench(tmp_path, "one", 'print(json.dumps({"bench": {"one": {"quick": "--quick" in sys.argv}}}))')
    _fake_bench(tmp_path, "two", 'print(json.dumps({"bench": {"two": {"ratio": 0.5}}}))')
    _fake_bench(tmp_path, "bad", "sys.exit(3)")
    monkeypatch.setattr(bench_command, "BENCH_DIR", tmp_path)
    monkeypatch.setattr(bench_command, "BENCHMARKS", ("one", "two", "bad"))
    rc = cli_main(["bench", "--quick", "--only", "one", "two", "--out", str(tmp_path / "out.json")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 0
    assert json.loads(last) == {"bench": {"one": {"quick": True}, "two": {"ratio": 0.5}}}
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(last)
    rc = cli_main(["bench", "--only", "bad", "one"])
    merged = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bench"]
    assert rc == 1 and "status 3" in merged["bad"]["error"] and merged["one"] == {"quick": False}


def test_sampler_bench_prints_ratios_last_in_a_micro_configuration():
    result = run_script(
        "sampler",
        "--hidden",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--vocab",
        "64",
        "--batch",
        "3",
        "--prompt",
        "5",
        "--new-tokens",
        "4",
        "--rounds",
        "1",
        "--no-compile",
    )
    assert result["fast_over_hf"] > 0 and set(result["tok_s"]) == {"hf_generate", "fast"}
    assert result["config"]["vocab"] == 64


@pytest.mark.slow
@pytest.mark.timeout(900)  # run_script's own timeout is 600 s
def test_flops_bench_reports_a_fraction_of_peak():
    result = run_script("flops", "--batch", "1", "--seq", "16", "--prompt", "4", "--rounds", "1", "--matmul", "256")
    assert 0 < result["fraction_of_peak"] <= result["fraction_of_peak_with_attention"]
    assert 45 < result["params_m"] < 60


@pytest.mark.slow
@pytest.mark.timeout(900)  # run_script's own timeout is 600 s
def test_loop_vs_trl_bench_runs_both_trainers():
    pytest.importorskip("trl")
    result = run_script(
        "loop_vs_trl",
        "--vocab",
        "256",
        "--student-hidden",
        "16",
        "--student-layers",
        "1",
        "--teacher-hidden",
        "32",
        "--teacher-layers",
        "1",
        "--batch",
        "2",
        "--new-tokens",
        "4",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--rounds",
        "1",
    )
    for side in ("ours", "trl"):
        assert result[side]["steps"] == 1 and result[side]["tokens_per_step"] == 8
        assert result[side]["peak_mem_mb"] > 0
    assert result["total_tok_s_ratio"] > 0 and result["peak_mem_ratio"] > 0


def test_gpu_bench_tiny_runs_on_cpu(tmp_path):
    """``bench/gpu.py --tiny``: every phase in ``$OUT/gpu.jsonl`` and the whole result as the last line."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--tiny", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCH.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCH.parent)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = bench_command.last_json_line(proc.stdout)["gpu"]
    assert result["ours"]["total_tok_s"] > 0 and result["ours"]["steps"] == 1
    assert result["bf16_check"]["ok"], result["bf16_check"]
    assert "total_tok_s" in result["trl"] or "error" in result["trl"]
    phases = [json.loads(line)["phase"] for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert phases[0] == "setup" and phases[-1] == "done"
    assert {"ours", "trl", "bf16_check", "decode_paths"} <= set(phases)
    assert result["decode_paths"]["static_tok_s"] > 0 and result["decode_paths"]["dynamic_tok_s"] > 0


def test_gpu_device_script_parses_and_names_existing_files():
    """``bench/gpu_device.sh`` (the one command run on a lent GPU) is valid bash, and every test file and
    preset it runs exists, so it cannot rot between the sessions that have a device."""
    import re

    script = BENCH / "gpu_device.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    paths = re.findall(r"tests/[\w/]+\.py", text)
    presets = re.findall(r"for preset in ([\w ]+); do", text)[0].split()
    assert len(paths) >= 4 and presets
    for path in [*paths, *(f"configs/{p}.yaml" for p in presets), "bench/gpu.py"]:
        assert (BENCH.parent / path).is_file(), path
