"""`vtdsl check`: exit codes, the JSON contract, the text report."""

from __future__ import annotations

import json

from click.testing import CliRunner

from vtdsl.cli import main

FASTV = 'policy "fastv"\nmodel "llava-1.5-7b"\nat llm.layer2 keep text top 50%\n'


def run(args, input=None):
    return CliRunner().invoke(main, args, input=input)


def test_json_has_the_documented_keys(tmp_path):
    path = tmp_path / "fastv.vt"
    path.write_text(FASTV)
    result = run(["check", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    for key in ("policy", "model", "stages", "visual_tokens_to_llm", "flops", "flops_fastv",
                "kv_cache_bytes", "budget", "ok", "diagnostics"):
        assert key in data
    assert data["policy"] == "fastv" and data["model"] == "llava-1.5-7b"
    assert data["stages"] == [{"site": "llm.layer2", "action": "keep", "tokens_in": 576, "tokens_out": 288,
                               "fewest_in": 576, "fewest_out": 288}]
    assert set(data["flops"]) >= {"baseline", "policy", "ratio", "by_part"}
    assert data["flops"]["ratio"] == data["flops"]["policy"] / data["flops"]["baseline"]
    # 2 of 32 LLM layers see 576 visual tokens, 30 see 288: KV entries (64 text tokens each)
    assert data["kv_cache_bytes"]["ratio"] == (2 * 640 + 30 * 352) / (32 * 640)


def test_budget_verdicts_and_exit_codes(tmp_path):
    path = tmp_path / "fastv.vt"
    path.write_text(FASTV)
    over = run(["check", str(path), "--budget", "flops <= 25%", "--json"])
    assert over.exit_code == 1
    verdict = json.loads(over.output)["budget"][0]
    assert verdict["constraint"] == "flops <= 25%" and verdict["ok"] is False
    within = run(["check", str(path), "--budget", "tokens <= 576", "--budget", "kv < 60%"])
    assert within.exit_code == 0, within.output
    assert "ok   tokens <= 576" in within.output and "ok   kv < 60%" in within.output


def test_policy_budget_lines_are_judged(tmp_path):
    path = tmp_path / "p.vt"
    path.write_text('model "llava-1.5-7b"\nbudget tokens <= 64\nat vit.out keep cls top 64\n')
    assert run(["check", str(path)]).exit_code == 0
    path.write_text('model "llava-1.5-7b"\nbudget tokens <= 64\nat vit.out keep cls top 65\n')
    result = run(["check", str(path)])
    assert result.exit_code == 1 and "OVER tokens <= 64" in result.output


def test_invalid_policy_exits_2_with_location(tmp_path):
    path = tmp_path / "bad.vt"
    path.write_text("at vit.layer99 keep cls top 8\n")
    result = run(["check", str(path), "--model", "llava-1.5-7b"])
    assert result.exit_code == 2
    assert f"{path}:1:4: error: vit.layer99 is out of range" in result.output
    assert "Traceback" not in result.output


def test_missing_model_and_unknown_model_exit_2(tmp_path):
    path = tmp_path / "p.vt"
    path.write_text("at llm.layer2 keep text top 50%\n")
    result = run(["check", str(path)])
    assert result.exit_code == 2 and "no model to check against" in result.output
    result = run(["check", str(path), "--model", "llava-1.5-7bb"])
    assert result.exit_code == 2 and "llava-1.5-7b" in result.output


def test_bad_budget_expression_exits_2(tmp_path):
    path = tmp_path / "fastv.vt"
    path.write_text(FASTV)
    result = run(["check", str(path), "--budget", "flop <= 25%"])
    assert result.exit_code == 2 and "flops" in result.output


def test_text_report_shows_stage_table():
    result = run(["check", "-", "--model", "tiny-llava"], input="at vit.out keep cls top 8 then merge rest into 2\n")
    assert result.exit_code == 0, result.output
    assert "vit.out" in result.output and "576 -> 10" in result.output
    assert "visual tokens into the LLM: 10" in result.output


def test_invalid_policy_under_json_prints_the_diagnostics_as_json(tmp_path):
    path = tmp_path / "bad.vt"
    path.write_text("at vit.layer99 keep cls top 8\n")
    result = run(["check", str(path), "--model", "llava-1.5-7b", "--json"])
    assert result.exit_code == 2
    data = json.loads(result.stdout)
    assert data["ok"] is False
    (diag,) = data["diagnostics"]
    assert (diag["severity"], diag["line"], diag["column"]) == ("error", 1, 4)
    assert diag["message"].startswith("vit.layer99 is out of range")


def test_an_error_about_an_option_has_no_made_up_location(tmp_path):
    path = tmp_path / "fastv.vt"
    path.write_text(FASTV)
    result = run(["check", str(path), "--model", "llava-1.5-7bb"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unknown model 'llava-1.5-7bb'")


def test_decode_context_moves_the_decode_flops(tmp_path):
    """llava-1.5-7b: 32 layers, q width 4096. One decoded token's QKᵀ and AV cost
    4·keys·4096 per layer, so 100 more context tokens add 32·4·100·4096 FLOPs, and FastV's
    cut (288 fewer keys in layers 2..31) saves 30·4·288·4096."""
    path = tmp_path / "fastv.vt"
    path.write_text(FASTV)
    at = {c: json.loads(run(["check", str(path), "--decode-context", str(c), "--json"]).output)["decode_flops_per_token"]
          for c in (0, 100)}
    assert at[100]["context"] == 100
    assert at[100]["baseline"] - at[0]["baseline"] == 32 * 4 * 100 * 4096
    assert at[0]["baseline"] - at[0]["policy"] == 30 * 4 * 288 * 4096
