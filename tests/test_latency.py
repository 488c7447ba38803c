"""The latency model: its roofline limits against independently counted FLOPs and bytes,
device profiles, `vtdsl calibrate` and the latency budgets of `vtdsl check`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

import vtdsl
from vtdsl.cost import estimate
from vtdsl.cost.devices import BUILTIN, get_device
from vtdsl.cost.latency import DeviceProfile, predict
from vtdsl.models import get_spec

ZOO = Path(__file__).resolve().parents[1] / "policies"
INF = float("inf")


def _profile(peak=INF, bandwidth=INF, overhead=0.0, fused=True, elementwise=INF) -> DeviceProfile:
    # elementwise passes (norms, activations, RoPE) are timed at their own rate: infinite
    # here unless a test looks at them, so the roofs alone are compared with counted figures
    return DeviceProfile("test", {"float32": peak, "float16": peak, "bfloat16": peak}, bandwidth,
                         fused_attention=fused, layer_overhead=overhead, elementwise_rate=elementwise)


@pytest.fixture(scope="module")
def report():
    return estimate(vtdsl.check(ZOO / "visionzip-64.vt", "llava-1.5-7b"), text_tokens=64, decode_context=16)


@pytest.fixture(scope="module")
def meta_model():
    return get_spec("llava-1.5-7b").build("meta")


def test_compute_roof_is_the_hf_flops(report):
    # With unlimited bandwidth every operation sits on the compute roof: seconds x peak
    # must be the prefill's hf FLOPs (the figure FlopCounterMode confirms), per prompt.
    peak = 1e12
    lat = predict(report, _profile(peak=peak), batch=3)
    assert lat.policy_prefill.seconds * peak == pytest.approx(3 * report.policy.flops, rel=1e-12)
    assert lat.baseline_prefill.seconds * peak == pytest.approx(3 * report.baseline.flops, rel=1e-12)
    assert lat.prefill_speedup == pytest.approx(1 / report.flops_ratio, rel=1e-12)
    assert lat.policy_prefill.bound == "compute"


def test_decode_memory_roof_is_weights_plus_cache(report, meta_model):
    # With unlimited FLOP/s a decode step at batch 1 is bytes / bandwidth: every LLM
    # linear weight and the lm_head once (counted on the transformers model itself), the K
    # and V of every cached token read by attention and copied by DynamicCache's append
    # (torch.cat: the old cache read, the new one written), and one token's activations (< 0.1 %).
    bw = 1e12
    lat = predict(report, _profile(bandwidth=bw), batch=1)
    llm = meta_model.model.language_model
    linear = sum(p.numel() for n, p in llm.named_parameters() if n.endswith("proj.weight"))
    head = meta_model.lm_head.weight.numel()
    spec = report.spec
    kv_per_token = 2 * spec.llm.kv_heads * spec.llm.head_dim * 2  # K and V, float16
    before = [64 + v + 16 for v in report.llm_visual]  # text + kept image + generated, per layer
    attended = sum(c + 1 for c in before)
    appended = sum(c + (c + 1) for c in before)
    expected = 2 * (linear + head) + kv_per_token * (attended + appended)
    assert lat.policy_decode.seconds * bw == pytest.approx(expected, rel=1e-3)
    assert lat.policy_decode.bound == "memory"
    # the unpruned cache holds 576 image tokens per layer: more bytes, slower
    assert lat.baseline_decode.seconds > lat.policy_decode.seconds


def test_overhead_is_per_layer(report):
    lat = predict(report, _profile(overhead=1e-3), batch=1)
    spec = report.spec
    assert lat.policy_prefill.overhead_s == pytest.approx(1e-3 * (spec.vit.layers + spec.llm.layers))
    assert lat.policy_decode.overhead_s == pytest.approx(1e-3 * spec.llm.layers)
    assert lat.policy_prefill.bound == lat.policy_decode.bound == "overhead"  # nothing else takes time


def test_vit_layers_have_their_own_overhead(report):
    profile = DeviceProfile("test", {"float32": INF, "float16": INF}, INF, layer_overhead=1e-3,
                            vit_layer_overhead=2e-4, elementwise_rate=INF)
    lat = predict(report, profile, batch=1)
    spec = report.spec
    assert lat.baseline_prefill.overhead_s == pytest.approx(1e-3 * spec.llm.layers + 2e-4 * spec.vit.layers)
    assert lat.baseline_decode.overhead_s == pytest.approx(1e-3 * spec.llm.layers)


def test_causal_prefill_attention_has_its_own_rate(report):
    # Only attention takes time: the ViT's bidirectional attention at one rate, the LLM's
    # causal prefill at another; each counts the whole N x N square (4·N²·q_width FLOPs).
    vit_rate, causal_rate = 1e12, 3e12
    profile = DeviceProfile("test", {"float16": INF}, INF, attention_flops={"float16": vit_rate},
                            causal_attention_flops={"float16": causal_rate}, elementwise_rate=INF)
    lat = predict(report, profile, batch=1)
    spec = report.spec
    vit = spec.vit.layers * 4 * 577 ** 2 * spec.vit.heads * spec.vit.head_dim
    llm = spec.llm.layers * 4 * (64 + 576) ** 2 * spec.llm.heads * spec.llm.head_dim
    assert lat.baseline_prefill.seconds == pytest.approx(vit / vit_rate + llm / causal_rate, rel=1e-9)
    # a decode step's single query against the cache is run without is_causal: the other rate
    decode = sum(4 * (64 + 576 + 16 + 1) * spec.llm.heads * spec.llm.head_dim for _ in range(spec.llm.layers))
    assert lat.baseline_decode.seconds == pytest.approx(decode / vit_rate, rel=1e-9)
    assert DeviceProfile.from_json(profile.to_json()) == profile


def test_unfused_attention_moves_the_score_matrix(report):
    fused = predict(report, _profile(peak=INF, bandwidth=1e12, fused=True))
    unfused = predict(report, _profile(peak=INF, bandwidth=1e12, fused=False))
    spec = report.spec
    # the LLM's 32 layers on 64 + 576 tokens and the ViT's 24 on 577, per head: written,
    # read by softmax, written, read by AV, 2 bytes each
    n = 64 + 576
    extra = 4 * 2 * (spec.llm.layers * spec.llm.heads * n * n + spec.vit.layers * spec.vit.heads * 577 * 577)
    assert (unfused.baseline_prefill.seconds - fused.baseline_prefill.seconds) * 1e12 == pytest.approx(extra, rel=1e-9)


def test_gpu_profiles_are_the_data_sheets():
    h100, h200 = get_device("h100"), get_device("H200")
    assert h100.peak("bfloat16") == 989.4e12 and h200.peak("bfloat16") == h100.peak("bfloat16")
    assert h200.bandwidth / h100.bandwidth == pytest.approx(4.8 / 3.35)
    assert set(BUILTIN) == {"a100", "h100", "h200", "l40s", "rtx4090"}
    with pytest.raises(ValueError, match="unknown device 'tpu'.*known: a100"):
        get_device("tpu")


def test_h200_decodes_faster_than_h100_only_by_bandwidth(report):
    # same compute, more bandwidth: a memory-bound step speeds up by less than 4.8/3.35
    h100 = predict(report, get_device("h100"), batch=1, dtype="bfloat16")
    h200 = predict(report, get_device("h200"), batch=1, dtype="bfloat16")
    ratio = h100.policy_decode.seconds / h200.policy_decode.seconds
    assert 1.0 < ratio < 4.8 / 3.35
    prefill = h100.policy_prefill.seconds / h200.policy_prefill.seconds
    assert 1.0 <= prefill < ratio  # prefill is mostly compute: bandwidth helps it less


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("VTDSL_DEVICE_DIR", str(tmp_path / "devices"))
    return CliRunner()


def test_check_with_device_reports_latency_and_judges_it(runner):
    from vtdsl.cli import main

    args = ["check", str(ZOO / "visionzip-64.vt"), "-m", "llava-1.5-7b", "--device", "h100", "--batch", "8",
            "--dtype", "bfloat16", "--json"]
    ok = runner.invoke(main, args + ["--budget", "latency <= 40%", "--budget", "decode_latency <= 1s"])
    assert ok.exit_code == 0, ok.output
    payload = json.loads(ok.stdout)
    lat = payload["latency"]
    assert lat["device"] == "h100" and lat["batch"] == 8
    assert lat["prefill"]["speedup"] == pytest.approx(lat["prefill"]["baseline"]["ms"] / lat["prefill"]["policy"]["ms"])
    assert [v["ok"] for v in payload["budget"]] == [True, True]
    over = runner.invoke(main, args + ["--budget", "decode_latency <= 1us"])
    assert over.exit_code == 1 and json.loads(over.stdout)["budget"][0]["ok"] is False


def test_latency_budget_without_device_is_a_located_error(runner, tmp_path):
    from vtdsl.cli import main

    policy = tmp_path / "p.vt"
    policy.write_text("at llm.layer2 keep text top 64\nbudget latency <= 50%\n")
    r = runner.invoke(main, ["check", str(policy), "-m", "llava-1.5-7b"])
    assert r.exit_code == 2
    assert f"{policy}:2:1: error: budget 'latency <= 50%' is a predicted time" in r.stderr
    assert "--device NAME" in r.stderr
    bad = runner.invoke(main, ["check", str(policy), "-m", "llava-1.5-7b", "--budget", "kv <= 3ms"])
    assert bad.exit_code == 2 and "only latency and decode_latency are measured in seconds" in bad.stderr
    cpu = runner.invoke(main, ["check", str(policy), "-m", "llava-1.5-7b", "--device", "cpu"])
    assert cpu.exit_code == 2 and "run `vtdsl calibrate`" in cpu.stderr


def test_calibrate_saves_a_profile_check_uses(runner, tmp_path):
    from vtdsl.cli import main

    r = runner.invoke(main, ["calibrate", "--threads", "1", "--repeats", "1", "--json"])
    assert r.exit_code == 0, r.output
    saved = json.loads(r.stdout)
    assert Path(saved["path"]) == tmp_path / "devices" / "cpu.json"
    for value in (*saved["peak_flops"].values(), *saved["attention_flops"].values(), saved["bandwidth"]):
        assert math.isfinite(value) and value > 0
    assert saved["layer_overhead"] >= 0
    c = runner.invoke(main, ["check", str(ZOO / "fastv.vt"), "-m", "llava-1.5-7b", "--device", "cpu", "--json"])
    assert c.exit_code == 0, c.output
    assert json.loads(c.stdout)["latency"]["device"] == "cpu"
