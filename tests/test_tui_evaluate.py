"""The Evaluate screen as the CLI's command line, its recovery from errors; the Report screen's examples
as half-block pixels."""

from __future__ import annotations

import json
from pathlib import Path

from rich.color import Color
from rich.text import Text
from test_examples import tiny_model_file
from test_tui import run_app, wait_for

from fsapp.app.evaljob import EvalRequest as JobRequest
from fsapp.app.evaljob import run_eval
from fsapp.tui.pixels import HALF, half_blocks, pair_lines, tile
from fsapp.tui.reports import saved_reports


def test_half_blocks_put_the_top_pixel_in_front_and_the_bottom_one_behind():
    grey = [[[0, 50, 100, 150], [200, 250, 10, 20], [30, 40, 60, 70], [80, 90, 110, 120]]]
    text = half_blocks(grey)
    assert text.plain == HALF * 4 + "\n" + HALF * 4
    spans = [(text.plain[s.start:s.end], s.style.color, s.style.bgcolor) for s in text.spans]
    assert spans[0] == (HALF, Color.from_rgb(0, 0, 0), Color.from_rgb(200, 200, 200))
    assert spans[3] == (HALF, Color.from_rgb(150, 150, 150), Color.from_rgb(20, 20, 20))
    assert spans[4] == (HALF, Color.from_rgb(30, 30, 30), Color.from_rgb(80, 80, 80))
    red, green, blue = ([[v] * 4 for v in (c, c, c, c)] for c in (255, 0, 10))
    colour = half_blocks([red, green, blue])
    assert {(s.style.color, s.style.bgcolor) for s in colour.spans} == {(Color.from_rgb(255, 0, 10),) * 2}
    odd = half_blocks([[[1, 2], [3, 4], [5, 6]]], scale=2)  # 6 x 4 after scaling: 3 lines of 4 cells
    assert odd.plain == "\n".join([HALF * 4] * 3)
    pair = pair_lines(half_blocks(grey), half_blocks(grey), Text("y=3 → 8"))
    assert [line.plain for line in pair] == [HALF * 4 + " " + HALF * 4] * 2 + ["y=3 → 8  "]
    assert tile([pair] * 3, width=20).plain.count("y=3 → 8") == 3
    assert len(tile([pair] * 3, width=20).plain.split("\n")) == 3 * 3 + 2  # one pair per band at 20 columns
    two = tile([pair] * 3, width=21).plain.split("\n")  # two pairs (9 cells each, 3 apart) per band
    assert len(two) == 3 + 1 + 3 and two[2] == "y=3 → 8     y=3 → 8  "


def test_report_screen_shows_the_saved_pairs(tmp_path):
    model = tiny_model_file(tmp_path / "runs" / "tiny" / "model.safetensors")
    report = tmp_path / "runs" / "tiny" / "eval" / "r.json"
    run_eval(JobRequest(model=model, attacks=["fgsm"], n=12, batch_size=12, device="cpu", out=report))
    data = json.loads(report.read_text())
    listed = saved_reports(tmp_path / "runs" / "tiny")
    assert [r.kind for r in listed] == ["fgsm · examples"]

    async def script(app, pilot):
        from fsapp.tui.screens.report import ReportScreen

        app.push_screen(ReportScreen(report))
        await wait_for(pilot, lambda: isinstance(app.screen, ReportScreen), "the report")
        await pilot.pause()
        box = app.screen.query_one("#report-examples")
        shown = box.render().plain if hasattr(box.render(), "plain") else str(box.render())
        assert box.display and f"clean left, {data['examples']['attack']} right" in shown
        assert shown.count("y=") == 8 and HALF * 8 + " " + HALF * 8 in shown
        from safetensors.torch import load_file

        t = load_file(str(report.with_name(data["examples"]["file"])))
        first = f"y={int(t['labels'][0])} → {int(t['adv_pred'][0])}"
        assert first in shown

    run_app(tmp_path / "runs", script, size=(80, 40))


def test_form_builds_the_cli_command_line(tmp_path):
    async def script(app, pilot):
        from fsapp.tui.screens.evaluate import EvaluateScreen

        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, EvaluateScreen), "evaluate")
        screen = app.screen
        for wid, text in (("model", "runs/a/model.safetensors"), ("suites", "paper autoattack"), ("attacks", ""),
                          ("sweep", "eps=0:16/255:9 steps=1,5,20"), ("source", "src.safetensors"), ("n", "50"),
                          ("seed", "3"), ("batch_size", "25"), ("robustbench", "rb.json")):
            screen.query_one(f"#{wid}").value = text
        await pilot.pause()
        assert screen.request().args() == [
            "eval", "runs/a/model.safetensors", "--suite", "paper", "--suite", "autoattack", "--sweep",
            "eps=0:16/255:9", "--sweep", "steps=1,5,20", "--source", "src.safetensors", "--n", "50", "--seed", "3",
            "--batch-size", "25", "--robustbench-json", "rb.json"]
        assert str(screen.query_one("#eval-command").render()).startswith(
            "$ fsapp eval runs/a/model.safetensors --suite paper --suite autoattack --sweep eps=0:16/255:9")
        screen.query_one("#suites").value = "papr"
        await pilot.press("ctrl+r")
        status = str(screen.query_one("#eval-status").render())
        assert "unknown suite 'papr'; available: default, paper, autoattack" in status and not screen.busy

    run_app(tmp_path / "runs", script)


def test_a_failed_evaluation_then_a_good_one_capped_to_the_split(tmp_path):
    model = tiny_model_file(tmp_path / "runs" / "tiny" / "model.safetensors")

    async def script(app, pilot):
        from fsapp.tui.screens.evaluate import EvaluateScreen

        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, EvaluateScreen), "evaluate")
        screen = app.screen
        for wid, text in (("model", str(model)), ("attacks", "fgsm:epz=1"), ("n", "100000"), ("device", "cpu")):
            screen.query_one(f"#{wid}").value = text
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: screen.job is not None, "the job")
        await wait_for(pilot, lambda: not screen.busy, "the failure")
        status = str(screen.query_one("#eval-status").render())
        assert status.startswith("✗ ") and "epz" in status and "\n" not in status.strip()
        assert screen.query_one("#eval-progress").total == 1 and screen.query_one("#eval-progress").progress == 0
        assert screen.query_one("#run").disabled is False
        screen.query_one("#attacks").value = "fgsm"
        first = screen.ticket
        screen.query_one("#run").press()  # the button works again
        await wait_for(pilot, lambda: screen.ticket != first, "the second start")
        await wait_for(pilot, lambda: not screen.busy, "the evaluation")
        assert screen.report is not None, str(screen.query_one("#eval-status").render())
        n = screen.report["n"]
        assert 0 < n < 100000 and screen.capped == n
        status = str(screen.query_one("#eval-status").render())
        assert f"n capped to the test split: {n} of the 100000 asked" in status and "examples saved" in status
        assert screen.query_one("#eval-table").get_cell("fgsm", "progress") == f"{n}/{n}"
        assert Path(screen.job.report).with_name(screen.report["examples"]["png"]).is_file()

    run_app(tmp_path / "runs", script)
