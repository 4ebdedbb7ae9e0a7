"""benchmarks/report.py renders CPU and GPU results (the GPU run happens rarely: its report must not break there)."""

from __future__ import annotations

import json

from benchmarks.report import main, render_markdown


def _doc(gpu: bool, ours: float, eager: float, diffusers: float, sd: float) -> dict:
    machine = {"cpu": "Some CPU", "cores": "2", "python": "3.11", "torch": "2.x", "platform": "linux"}
    if gpu:
        machine["gpu"] = "NVIDIA H100 80GB HBM3"
    case = lambda s: {"median_s": s, "min_s": s, "rounds": 3, "peak_mem_bytes": 2**20,  # noqa: E731
                      "extra_mem_bytes": 2**19}
    cases = {"stage_unet": case(ours / 2), "ours_1step": case(ours), "diffusers_1step": case(diffusers),
             "sd_25step_cfg": case(sd), "ours_batch8": case(ours * 4), "diffusers_batch8": case(diffusers * 4),
             "ours_2rf_4step_cfg": case(ours * 5)}
    ratios = {"ours/diffusers_1step": ours / diffusers, "ours/sd_25step_cfg": ours / sd}
    if gpu:
        cases["ours_1step_eager"] = case(eager)
        ratios["ours/ours_eager"] = ours / eager
    return {"date": "2026-11-27 00:00 UTC", "machine": machine, "quick": False, "command": "pytest benchmarks",
            "subjects": {"sd15" if gpu else "small-sd": {"description": "d", "cases": cases, "ratios": ratios,
                                                         "interleaved_medians_s": {"ours_1step": ours}}}}


def _row(text: str, ratio: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {ratio} |"))


def test_gpu_targets_apply_on_gpu_only():
    cpu = render_markdown([_doc(False, ours=0.30, eager=0.0, diffusers=0.33, sd=5.0)], None)
    assert _row(cpu, "ours/sd_25step_cfg").endswith("| yes |")  # 16.7x: meets the CPU's 15x
    assert "from_pretrained(ckpt) with no options" not in cpu and "No GPU results in this report yet" in cpu
    gpu = render_markdown([_doc(True, ours=0.020, eager=0.045, diffusers=0.050, sd=0.45)], None)
    assert "## NVIDIA H100 80GB HBM3" in gpu and "No GPU results" not in gpu
    assert _row(gpu, "ours/sd_25step_cfg").endswith("| no |")  # 22.5x: short of the GPU's 25x
    assert _row(gpu, "ours/diffusers_1step").endswith("| no |")  # 2.5x: short of 3x
    assert _row(gpu, "ours/ours_eager").endswith("| yes |")
    slow = render_markdown([_doc(True, ours=0.045, eager=0.045, diffusers=0.050, sd=0.45)], None)
    assert "from_pretrained(ckpt) with no options: 45.0 ms (target <= 40.0 ms: NOT met)" in slow
    fast = render_markdown([_doc(True, ours=0.012, eager=0.045, diffusers=0.050, sd=0.45)], None)
    assert "with no options: 12.0 ms (target <= 40.0 ms: met)" in fast
    assert _row(fast, "ours/sd_25step_cfg").endswith("| yes |")
    assert "throughput at batch 8 (ours, default): 166.7 images/s (target >= 100: met)" in fast
    assert "throughput at batch 8 (diffusers' single step): 40.0 images/s" in fast
    assert "4 steps, guidance 1.5 (UNet batch 2): 60.0 ms per image" in fast
    assert "| ours_1step | 12.0 | 12.0 | 3 | 1.0 | 0.5 |  |" in fast  # GPU: process peak, the call's own memory
    assert "| ours_1step | 300.0 | 300.0 | 3 | 1.0 |" in cpu


def test_report_cli_writes_markdown_and_chart(tmp_path):
    paths = []
    for gpu in (False, True):
        p = tmp_path / f"{'gpu' if gpu else 'cpu'}.json"
        p.write_text(json.dumps(_doc(gpu, ours=0.012, eager=0.045, diffusers=0.050, sd=0.45)))
        paths.append(str(p))
    layouts = tmp_path / "layouts.json"
    layouts.write_text(json.dumps({"date": "2026-11-27 08:28 UTC", "machine": {"gpu": "NVIDIA H200"},
                                   "command": "python -m benchmarks.layouts", "subject": "SD-1.5 shapes",
                                   "variants": {"unet_cl+vae_cl": {"median_s": 0.0348, "min_s": 0.0340},
                                                "compiled unet_cl+vae_nchw": {"median_s": 0.015, "min_s": 0.0149}}}))
    fullsize = tmp_path / "fullsize.json"
    fullsize.write_text(json.dumps({"date": "2026-11-27 10:00 UTC", "machine": {"cpu": "Some CPU", "cores": "2"},
                                    "steps": {"one step, 512x512": {"seconds": 52.04, "peak_rss_bytes": 5.7 * 2**30}}}))
    out = tmp_path / "new" / "RESULTS.md"  # a folder that does not exist yet
    assert main(["--results", *paths, str(layouts), str(fullsize), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("\n## ") == 3 and (out.parent / "stages.png").stat().st_size > 1000
    assert "### Memory layouts and torch.compile — NVIDIA H200, 2026-11-27 08:28 UTC" in text
    assert "| compiled unet_cl+vae_nchw | 15.0 | 14.9 |" in text
    assert "## Full size on the CPU — Some CPU (2 cores)" in text and "| one step, 512x512 | 52.0 | 5.7 |" in text
    assert main(["--results", str(tmp_path / "missing.json"), "--out", str(out)]) == 2


def test_cold_start_section_and_the_aoti_target():
    doc = {"cold_start": True, "date": "2026-11-29 12:00 UTC", "subject": "sd15", "command": "python -m x",
           "machine": {"gpu": "NVIDIA H200", "cpu": "x", "cores": "16"},
           "cases": {"default": {"backend": "torch", "import_s": 2.0, "load_s": 3.0, "first_call_s": 1.5,
                                 "to_first_image_s": 6.5, "steady_median_s": 0.03},
                     "compile_warm": {"error": "RuntimeError: boom"},
                     "aoti": {"backend": "aoti", "import_s": 2.0, "load_s": 9.0, "first_call_s": 12.0,
                              "to_first_image_s": 23.0, "steady_median_s": 0.013}}}
    text = render_markdown([doc], None)
    assert "| default | torch | 2.0 | 3.0 | 1.5 | 6.5 | 30.0 |" in text
    assert "| compile_warm | failed: RuntimeError: boom |" in text
    assert "aoti target (first image <= 20 s): 23.0 s, NOT met" in text
    assert "the median of 10 more calls" in text  # no rounds recorded, none on the command line: the default
    assert "the median of 7 more calls" in render_markdown([{**doc, "rounds": 7}], None)
    assert "the median of 5 more calls" in render_markdown([{**doc, "command": "python -m x --rounds 5"}], None)


def test_gpu_busy_and_span_split_the_idle_time():
    """Busy is the union of the kernels' intervals, span their extent: span - busy is the GPU idle between kernels,
    which the report shows beside the wall time."""
    from benchmarks.subjects import busy_and_span

    assert busy_and_span([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == (4, 6)  # overlaps once, the gap 3-5 idle
    assert busy_and_span([(10, 11)]) == (1, 1) and busy_and_span([]) == (0.0, 0.0)
    doc = _doc(True, ours=0.020, eager=0.045, diffusers=0.050, sd=0.45)
    case = next(iter(doc["subjects"]["sd15"]["cases"].values()))
    case.update(gpu_busy_s=0.0119, gpu_span_s=0.0131)
    row = next(line for line in render_markdown([doc], None).splitlines() if "| 11.9 | 13.1 |" in line)
    assert row.startswith("| ")


def test_a_case_note_is_printed_under_the_table():
    """What a case ran where its name does not say (the aoti cases: the fused package or the UNet and decoder
    packages as one CUDA graph) is printed under the table."""
    from benchmarks.test_latency import aoti_note

    doc = _doc(True, ours=0.020, eager=0.045, diffusers=0.050, sd=0.45)
    cases = doc["subjects"]["sd15"]["cases"]
    cases["ours_1step_aoti"] = dict(cases["ours_1step"], note="one step = the fused package")
    cases["ours_batch8_aoti"] = dict(cases["ours_batch8"], note="one step = the fused package")
    text = render_markdown([doc], None)
    table_end = text.index("| ours_batch8_aoti |")
    assert text.index("`ours_1step_aoti`, `ours_batch8_aoti`: one step = the fused package") > table_end
    assert text.count("one step =") == 1  # once for the cases it applies to

    class Backend:
        packages, cuda_graph, has_one_step = {"unet": 1}, True, True
        export_dir = __import__("pathlib").Path("/w/aoti-sd15")

    assert aoti_note(type("P", (), {"backend": Backend})()) == (
        "one step = the UNet and decoder packages replayed as one CUDA graph (packages exported without the fused "
        "one); packages in aoti-sd15/")
