"""benchmarks/gpu_suite.py rehearsed on CPU (--small): every section written, numbers finite and positive; and the
analytic memory of bench_latency against the models it describes."""

import json
import math

import pytest
import torch


import bench_latency
import gpu_suite
from lavida_shirg import ShirgConfig
from shirg_tools.variants import parse_variants


def numbers(value, path=""):
    """(path, number) of every int / float leaf of a JSON value (booleans are not numbers here)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{path}/{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers(item, f"{path}/{index}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory):
    output = tmp_path_factory.mktemp("gpu_suite")
    returned = gpu_suite.main(["--small", "--output", str(output)])
    return returned, output


def test_small_suite_writes_every_section_with_finite_positive_numbers(small_suite):
    returned, output = small_suite
    results = json.loads((output / "gpu_suite.json").read_text())
    assert results == json.loads(json.dumps(returned))
    assert list(results) == list(gpu_suite.SECTIONS)
    assert not [name for name, section in results.items() if "error" in section]
    leaves = list(numbers(results))
    assert [(path, value) for path, value in leaves if not (math.isfinite(value) and value > 0)] == []

    variant_text, reference = gpu_suite.suite_variants(ShirgConfig.from_preset("tiny"))
    labels = [variant.label for variant in parse_variants(variant_text)]
    assert reference == "shirg-fixed@85" and len(labels) == 10
    batches = [str(batch) for batch in gpu_suite.SMALL.batch_sizes]
    assert list(results["memory"]["variants"]) == labels
    for mode in gpu_suite.MODES:
        assert list(results["latency"][mode]) == labels
        assert {label: list(rates) for label, rates in results["throughput"]["images_per_s"][mode].items()} == {
            label: batches for label in labels}
        for label in labels:  # the analytic prefix cache of the (full-size) small model = the bytes measured
            analytic = results["memory"]["variants"][label]["batches"]["1"]["kv_bytes"]
            assert results["latency"][mode][label]["kv_mb"] == pytest.approx(analytic / 2**20, rel=1e-6)
    assert results["throughput"]["not_run"] == results["throughput"]["failed"] == []
    assert set(results["selection"]["batches"]) == {str(b) for b in gpu_suite.SMALL.selection_batches}
    assert results["sampler"]["cache_equals_prefix_dlm"] is True
    assert set(results["sampler"]["modes"]) == {"prefix cache", "no cache (prefix-DLM mask)",
                                                "no cache (bidirectional, LaViDa)"}
    assert results["training"]["steps"] == gpu_suite.SMALL.train_steps
    assert set(results["targets"]["targets"]) == set(gpu_suite.TARGETS)
    assert all(isinstance(row["met"], bool) for row in results["targets"]["targets"].values())
    backbones = results["backbones"]
    assert (backbones["prefix_tokens"], backbones["mc_num"]) == (gpu_suite.SMALL.sampler_prefix, 16)
    assert backbones["LLaDA"]["step_over_llada"] == backbones["LLaDA"]["choice_over_llada"] == 1.0
    for row in (backbones["LLaDA"], backbones["Dream"]):
        assert row["decoder_ms"] < row["step_ms"], "the step holds its decoder forward and the head + commit"
        assert row["step_over_llada"] * backbones["LLaDA"]["step_ms"] == pytest.approx(row["step_ms"])

    report = (output / "gpu_suite.md").read_text()
    for name in gpu_suite.SECTIONS:
        assert f"\n## {name} (" in report
    assert "FAILED" not in report
    for label in labels:  # memory; latency eager, compiled, compiled / eager; throughput eager, compiled
        assert report.count(f"| {label} |") == 6
    assert report.count("| Dream |") == report.count("| LLaDA |") == 1


def test_analytic_memory_matches_the_models_it_describes():
    config = ShirgConfig.from_preset("tiny")
    model = bench_latency.build_model(config, "cpu", torch.bfloat16)
    parameters = dict(model.named_parameters())
    assert bench_latency.parameter_count(config) == sum(p.numel() for p in parameters.values())
    step = [name for name in parameters if ("language_model" in name and "embed_tokens" not in name)
            or "lm_head" in name]
    assert bench_latency.step_parameter_count(config.text_config) == sum(parameters[n].numel() for n in step)

    real = bench_latency.real_config()
    assert bench_latency.kv_bytes_per_token(real.text_config, torch.bfloat16) == 2**19  # 0.5 MiB per token
    assert bench_latency.kv_bytes_per_token(real.text_config, torch.bfloat16, "float8_e4m3fn") == 2**18
    narrow = bench_latency.real_config(2)
    assert (narrow.text_config.hidden_size, narrow.text_config.vocab_size, narrow.text_config.num_hidden_layers,
            narrow.vision_config.hidden_size, narrow.vision_config.num_hidden_layers) == (
        real.text_config.hidden_size, real.text_config.vocab_size, 2, real.vision_config.hidden_size, 2)
    variants = parse_variants("pooled,shirg-fixed@768,full")
    estimate = bench_latency.memory_estimate(real, variants, (768, 768), [1, 32], 32, torch.bfloat16)
    weights = bench_latency.parameter_count(real) * 2
    assert 8.4e9 < weights / 2 < 8.5e9
    prefix = {label: row["prefix_tokens"] for label, row in estimate.items()}
    fixed = 1 + bench_latency.PROMPT_TOKENS + bench_latency.QUESTION_TOKENS
    assert prefix == {"pooled": 1008 + fixed, "shirg-fixed@768": 768 + fixed, "full": 2304 + fixed}
    for label, row in estimate.items():
        assert row["weights_bytes"] == weights
        for batch, sizes in row["batches"].items():
            assert sizes["kv_bytes"] == 2**19 * prefix[label] * batch
            assert sizes["total_bytes"] == weights + sizes["kv_bytes"] + sizes["activation_bytes"]


@pytest.mark.parametrize("argv, message", [
    (["--small", "--sections", "latency,warp"], "--sections takes names among environment, memory"),
    (["--small", "--train-steps", "0"], "--train-steps must be a positive integer, got 0"),
    (["--small", "--threads", "0"], "--threads must be a positive integer, got 0"),
])
def test_bad_arguments_are_named(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_suite.parse_args([*argv, "--output", str(tmp_path)])
    assert message in capsys.readouterr().err


def test_the_real_size_suite_refuses_a_machine_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--output", str(tmp_path)])
    assert "the real-size suite needs a CUDA GPU; on a CPU run --small" in capsys.readouterr().err
