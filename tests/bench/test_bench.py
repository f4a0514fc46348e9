"""The benchmark's parts in process, on tiny CPU problems: rows run forward and backward inside
their context and record the backends that ran; validation catches a wrong row; targets read
only valid rows; a time limit kills a hung worker and keeps the report."""

from __future__ import annotations

import os
import time

import pytest
import torch

import bench_faults
from gift_kernels import bench
from gift_kernels.ops import plan as backends
from gift_kernels.ops import gift_linear_authors
from gift_kernels.ops import tiles as triton_configs

CPU = torch.device("cpu")


def _problem(shape=bench.Shape(24, 20, 12, 3), dtype=torch.float32, **kw):
    return bench.Problem(shape, dtype, CPU, **kw)


def _rows(problem, **sel):
    provs, skipped = bench.build(problem, bench.Selection(**sel))
    return {p.name: p for p in provs}, skipped


def test_rows_on_the_cpu_and_why_others_are_missing():
    provs, skipped = _rows(_problem())
    assert list(provs) == ["frozen", "authors", "peft-lora", "gift-torch-epilogue", "gift-torch-input"]
    assert "interpreter" in skipped["gift-triton-epilogue"]
    assert "cuda tensors" in skipped["gift-cuda-epilogue"]
    # a 16-bit base gets both LoRA rows: PEFT's default float32 adapter and one in the base's dtype
    provs16, _ = _rows(_problem(dtype=torch.bfloat16))
    assert provs16["peft-lora"].note == "adapter float32"
    assert provs16["peft-lora-bfloat16"].note == "adapter bfloat16"


def test_problem_is_random_on_its_device_with_distinct_weights():
    p = _problem(n_weights=3)
    assert p.x.device == CPU and p.x.requires_grad and p.phi.dtype == torch.float32
    assert all(w.abs().min() > 0 or w.abs().max() > 0 for w in p.weights)
    assert not torch.equal(p.weights[0], p.weights[1]) and not torch.equal(p.biases[1], p.biases[2])
    assert p.inputs(2).weight is p.weights[2] and p.inputs(2).x is p.x


def test_weights_beyond_l2_cover_twice_the_cache():
    l2 = 60 * 2**20
    assert bench.weights_beyond_l2(bench.Shape(1, 4096, 4096, 16), torch.bfloat16, l2) == 4  # 4 x 32 MiB
    n = bench.weights_beyond_l2(bench.Shape(1, 4096, 1024, 16), torch.bfloat16, l2)
    assert n * 4096 * 1024 * 2 >= 2 * l2 and n == 15


def test_step_runs_forward_and_backward_on_the_labelled_backend():
    p = _problem()
    provs, _ = _rows(p)
    for name in ("gift-torch-epilogue", "gift-torch-input"):
        res = bench.step(provs[name], p.inputs())
        assert (res.backend_fwd, res.backend_bwd) == ("torch", "torch"), name
        assert p.phi.grad is not None and p.x.grad is not None
        p.clear_grads()
    res = bench.step(provs["frozen"], p.inputs())
    assert (res.backend_fwd, res.backend_bwd) == (None, None)  # no GIFT op ran, not a stale name


def test_fusion_variant_is_a_context_and_leaves_nothing_set():
    env_before = os.environ.get(triton_configs.FUSION_ENV)
    prov = bench.Provider("gift-triton-epilogue-fused", "gift", lambda inp: None, lambda inp: {},
                          backend="torch", form="epilogue", fusion="fused")
    assert triton_configs.fusion_mode() == "auto"
    with prov.context():
        assert triton_configs.fusion_mode() == "fused"
        assert backends.requested() == "torch"
    assert triton_configs.fusion_mode() == "auto" and backends.requested() == "auto"
    assert os.environ.get(triton_configs.FUSION_ENV) == env_before


def test_triton_variants_coincide_at_decode_and_in_fp32():
    assert bench.FUSIONS == ("split", "fused")
    from gift_kernels.bench.providers import triton_fusions

    assert triton_fusions(bench.Shape(8192, 4096, 4096, 16), torch.bfloat16, torch.float32, CPU)[0] == ("split", "fused")
    assert triton_fusions(bench.Shape(16, 4096, 4096, 16), torch.bfloat16, torch.float32, CPU)[0] == ("auto",)
    assert triton_fusions(bench.Shape(8192, 4096, 4096, 16), torch.float32, torch.float32, CPU)[0] == ("auto",)


def test_validation_passes_right_rows_and_catches_wrong_ones():
    p = _problem()
    provs, _ = _rows(p, faults={"authors": "wrong"})
    refs = bench.References()
    for name in ("frozen", "peft-lora", "gift-torch-epilogue", "gift-torch-input"):
        res = bench.check(provs[name], p.inputs(), refs)
        assert res["valid"], (name, res)
        assert res["reference"] == "float64" and res["errors"]["y"] < 1e-6
    wrong = bench.check(provs["authors"], p.inputs(), refs)
    assert not wrong["valid"] and "tolerance" in wrong["why"] and wrong["errors"]["y"] > 5e-3
    # a row labelled with a backend that did not run is wrong, not a number
    authors = lambda inp: gift_linear_authors(inp.x, inp.weight, inp.bias, inp.phi, inp.psi)  # noqa: E731
    mislabelled = bench.Provider("gift-torch-epilogue", "gift", authors, provs["authors"].leaves, backend="torch")
    res = bench.check(mislabelled, p.inputs(), refs)
    assert not res["valid"] and "labelled backend 'torch' but forward ran on None" in res["why"]


def test_validation_fails_nan_and_missing_grads():
    p = _problem()
    refs = bench.References()
    nan = bench.Provider("nan", "frozen", lambda inp: torch.nn.functional.linear(inp.x, inp.weight, inp.bias)
                         * float("nan"), lambda inp: {"x": inp.x})
    assert not bench.check(nan, p.inputs(), refs)["valid"]
    frozen = lambda inp: torch.nn.functional.linear(inp.x, inp.weight, inp.bias)  # noqa: E731
    detached = bench.Provider("detached", "gift", frozen, lambda inp: {"x": inp.x, "phi": inp.phi, "psi": inp.psi})
    res = bench.check(detached, p.inputs(), refs)
    assert not res["valid"] and "no gradient for phi" in res["why"]


def test_rel_err_and_tolerances():
    ref = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert bench.rel_err(ref.float(), ref) == 0.0
    assert bench.rel_err(torch.tensor([1.0, -1.0]), ref) == pytest.approx(0.5)
    assert bench.rel_err(torch.tensor([float("nan"), 0.0]), ref) != bench.rel_err(ref, ref)
    assert bench.TOL[torch.bfloat16] == 6 * 2.0**-9


def test_fatal_device_errors_are_told_from_recoverable_ones():
    assert bench.is_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert bench.is_fatal(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"))
    assert not bench.is_fatal(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert not bench.is_fatal(ValueError("bad shape"))


def _result(shape, rows, auto=None):
    return {"shape": {"m": shape.m, "d_in": shape.d_in, "d_out": shape.d_out, "r": shape.r}, "label": str(shape),
            "rows": rows, "auto_form": auto or {}}


def _row(name, ms, valid=True, **kw):
    return {"provider": name, "valid": valid, "fwd_ms": ms, "fwd+bwd_ms": ms, "fwd+bwd_ratio": ms, **kw}


def test_targets_read_only_valid_rows():
    h = bench.HEADLINE_R16
    results = [_result(h, [
        _row("frozen", 1.0), _row("authors", 1.8), _row("peft-lora", 1.6), _row("peft-lora-bfloat16", 1.4),
        _row("gift-triton-epilogue-split", 0.5, valid=False, why="wrong"),  # fastest, but wrong
        _row("gift-triton-epilogue-fused", 1.05), _row("gift-cuda-epilogue", 1.2)])]
    lines = bench.gpu_targets(results)
    first = next(line for line in lines if "r=16" in line and "triton fwd+bwd / frozen" in line)
    assert "1.050" in first and "gift-triton-epilogue-fused" in first and first.endswith("met")
    lora = next(line for line in lines if "peft-lora" in line)
    assert f"{1.4 / 1.05:.3f}" in lora and "peft-lora-bfloat16" in lora and lora.endswith("met")
    assert any("authors" in line and line.endswith("MISSED") for line in lines)  # 1.8 / 1.05 < 1.8x
    assert any("decode" in line and "not measured" in line for line in lines)


def test_cpu_targets_use_the_form_auto_picks():
    h, d = bench.CPU_SHAPES[0], bench.CPU_SHAPES[1]
    results = [
        _result(h, [_row("frozen", 1.0), _row("authors", 2.5), _row("gift-torch-epilogue", 1.06),
                    _row("gift-torch-input", 1.08)], auto={"torch": "input"}),
        _result(d, [_row("frozen", 1.0), _row("gift-torch-epilogue", 2.3), _row("gift-torch-input", 1.2)],
                auto={"torch": "input"}),
    ]
    lines = bench.cpu_targets(results, h, d)
    assert any("form=auto: input" in line and "1.080" in line and line.endswith("met") for line in lines)
    assert any("auto / epilogue" in line and line.endswith("MISSED") for line in lines)  # 1.08 / 1.06 > 1
    assert any(str(d) in line and "1.200" in line and line.endswith("met") for line in lines)


def test_cpu_targets_are_read_on_their_own_shapes_whatever_the_run_order():
    """A run of the decode shape first (``--shape 16,...``) must not check the headline
    targets on it: each target reads its own shape, or says "not measured"."""
    d = bench.CPU_DECODE
    results = [_result(d, [_row("frozen", 1.0), _row("gift-torch-epilogue", 2.3), _row("gift-torch-input", 1.2)],
                       auto={"torch": "input"})]
    lines = bench.cpu_targets(results)
    assert all(line.endswith("not measured") for line in lines if str(bench.CPU_HEADLINE) in line)
    assert sum(str(bench.CPU_HEADLINE) in line for line in lines) == 3
    decode = [line for line in lines if str(d) in line]
    assert len(decode) == 1 and "1.200" in decode[0] and "<= 1.25" in decode[0] and decode[0].endswith("met")


def test_run_writes_a_report_after_every_shape(tmp_path):
    spec = bench.Spec(shapes=[bench.Shape(8, 12, 10, 2), bench.Shape(1, 12, 10, 2)], rounds=2, budget_s=0.001,
                      include=["gift-torch-*"], lora=False)
    seen = []

    def on_update(results, stopped):
        seen.append(len(results))
        bench.write_report({"title": "t", "meta": {}, "results": results, "targets": [], "stopped": stopped},
                           tmp_path, "bench")
    out = bench.run(spec, on_update=on_update)
    assert seen[:2] == [1, 2] and out["stopped"] is None
    text = (tmp_path / "bench.md").read_text()
    assert "## M=8 12x10 r=2" in text and "## M=1 12x10 r=2" in text and "gift-torch-input" in text
    names = [r["provider"] for r in out["results"][0]["rows"]]
    assert names == ["frozen", "gift-torch-epilogue", "gift-torch-input"]  # frozen always runs
    row = out["results"][0]["rows"][1]
    assert row["valid"] and row["fwd+bwd_ratio"] > 0 and row["backend_fwd"] == row["backend_bwd"] == "torch"
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no partial file


def test_time_limit_kills_a_hung_worker_and_keeps_the_report(tmp_path):
    spec = bench.Spec(shapes=[bench.Shape(8, 12, 10, 2)], rounds=1, budget_s=0.001, lora=False,
                      include=["gift-torch-epilogue"], row_hook=bench_faults.HOOK)
    t0 = time.monotonic()
    out = bench.run_isolated(spec, time_limit_s=20, env=bench_faults.env([{"shape": 0, "provider": "frozen",
                                                                             "how": "hang"}]))
    assert time.monotonic() - t0 < 60
    assert out["results"] == [] and out["stopped"].startswith("time limit")


def test_form_choice_compares_triton_epilogue_with_the_base_gemm_plus_transform():
    h = bench.HEADLINE_R16
    results = [_result(h, [_row("frozen", 1.0), _row("gift-torch-epilogue", 1.3), _row("gift-torch-input", 1.2),
                           _row("gift-triton-epilogue-split", 1.08), _row("gift-triton-epilogue-fused", 1.15)],
                       auto={"torch": "input", "triton": "epilogue"})]
    lines = bench.form_choice(results)
    triton = next(line for line in lines if ", triton:" in line)
    assert "gift-torch-input / gift-triton-epilogue-split" in triton and "faster: epilogue" in triton
    assert not triton.endswith("(MISMATCH)")
    torch_line = next(line for line in lines if ", torch:" in line)
    assert "faster: input; auto picks input" in torch_line


def _timed(name, samples, frozen=None):
    """A row with per-round fwd+bwd samples (ms), as bench_shape writes it."""
    med = sorted(samples)[len(samples) // 2]
    row = _row(name, med, **{"fwd+bwd_samples_ms": list(samples)})
    if frozen is not None:
        ratios = sorted(a / b for a, b in zip(samples, frozen))
        row["fwd+bwd_ratio"], row["fwd+bwd_ratio_iqr"] = ratios[len(ratios) // 2], [ratios[1], ratios[-2]]
    return row


def test_verdicts_read_the_noise():
    assert bench.verdict(0.98, "<=", 1.0, [0.95, 0.99]) == "met"
    assert bench.verdict(1.01, "<=", 1.0, [0.97, 1.04]) == "tie within noise"
    assert bench.verdict(1.05, "<=", 1.0, [1.02, 1.08]) == "MISSED"
    assert bench.verdict(1.6, ">=", 1.5, [1.55, 1.7]) == "met"
    assert bench.verdict(1.52, ">=", 1.5, [1.45, 1.6]) == "tie within noise"
    assert bench.verdict(1.2, ">=", 1.5) == "MISSED"  # no samples: the median alone


def test_targets_and_form_choice_agree_within_noise():
    """The contradiction a loaded machine produced: "auto / epilogue MISSED" beside "faster:
    input", and "MISMATCH" where the forms were within noise. One estimator (per-round ratios)
    and one verdict with its noise for both."""
    h, d = bench.CPU_HEADLINE, bench.CPU_DECODE
    frozen = [1.0, 1.0, 1.0, 1.0, 1.0]
    epi = [1.10, 1.12, 1.08, 1.11, 1.09]
    near = [1.13, 1.08, 1.10, 1.07, 1.12]  # within the round-to-round noise of epi
    results = [_result(h, [_timed("frozen", frozen), _timed("authors", [2.5] * 5, frozen),
                           _timed("gift-torch-epilogue", epi, frozen), _timed("gift-torch-input", near, frozen)],
                       auto={"torch": "input"})]
    lines = bench.cpu_targets(results, h, d)
    auto_epi = next(line for line in lines if "auto / epilogue" in line)
    assert "IQR" in auto_epi and auto_epi.endswith("tie within noise"), auto_epi
    assert not any("MISSED" in line for line in lines if str(h) in line and "auto / epilogue" in line)
    (form,) = bench.form_choice(results)
    assert "faster: tie within noise; auto picks input" in form and "slower" not in form, form

    faster = [0.98, 1.00, 0.97, 0.99, 1.01]  # input clearly faster, beyond the noise
    results = [_result(h, [_timed("frozen", frozen), _timed("gift-torch-epilogue", epi, frozen),
                           _timed("gift-torch-input", faster, frozen)], auto={"torch": "epilogue"})]
    (form,) = bench.form_choice(results)
    assert "faster: input; auto picks epilogue (the slower form)" in form, form
    auto_epi = next(line for line in bench.cpu_targets(results, h, d) if "auto / epilogue" in line)
    assert "auto picks the epilogue form" in auto_epi and auto_epi.endswith("met")
    frozen_line = next(line for line in bench.cpu_targets(results, h, d) if "fwd+bwd / frozen" in line and str(h) in line)
    # IQR 1.09-1.11 straddles the 1.10 target: neither met nor missed
    assert "[IQR" in frozen_line and "<= 1.1" in frozen_line and frozen_line.endswith("tie within noise"), frozen_line


def test_rows_keep_their_per_round_samples():
    spec = bench.Spec(shapes=[bench.Shape(8, 12, 10, 2)], rounds=3, budget_s=0.001, include=["gift-torch-*"],
                      lora=False)
    rows = {r["provider"]: r for r in bench.run(spec)["results"][0]["rows"]}
    for row in rows.values():
        assert len(row["fwd+bwd_samples_ms"]) == row["rounds"] == 3
    ratio = bench.paired_ratio(rows["gift-torch-input"], rows["frozen"])
    assert ratio is not None and ratio[1][0] <= ratio[0] <= ratio[1][1]
