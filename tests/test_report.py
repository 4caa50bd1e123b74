"""The HTML run report: structure (always), and rendering in headless Chromium (skipped without Chromium)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from genalign.cli import main
from genalign.evaluation.report import reward_curves, write_report

CHROMIUM = os.environ.get("GENALIGN_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("GENALIGN_CHROMEDRIVER", "/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (2-step, tiny SD) training run made with the API."""
    from genalign.config import load_config
    from genalign.training.trainer import train

    cfg = load_config(None, ["pipeline.model=tiny:sd", "train.steps=2", "train.batch_size=2",
                             "validation.samples_per_prompt=1", "validation.num_inference_steps=2",
                             "validation.max_prompts=2", "data.source.num_inference_steps=2", "data.source.rounds=1"])
    run = tmp_path_factory.mktemp("report") / "run"
    train(cfg, run, progress=False)
    return run


@pytest.fixture(scope="module")
def report(run_dir):
    return write_report(run_dir)


class _Collect(HTMLParser):
    """Every start tag as (tag, attrs); text of <pre> and <td>."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Collect:
    p = _Collect()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_report_html_structure(run_dir, report):
    assert report == run_dir / "report.html"
    doc = _parse(report)
    ids = {a.get("id") for _, a in doc.tags}
    assert {"summary", "curves", "samples", "config", "reward-table"} <= ids
    # self-contained: every src is a data URI, no script, no stylesheet link
    assert all(a["src"].startswith("data:") for t, a in doc.tags if "src" in a)
    assert not any(t in ("script", "link", "iframe") for t, _ in doc.tags)
    samples = [a for t, a in doc.tags if t == "img" and "sample" in a.get("class", "")]
    summary = json.loads((run_dir / "summary.json").read_text())
    n = 2 * 1  # held-out prompts x samples per prompt
    assert len([a for a in samples if "base" in a["class"]]) == n
    assert len([a for a in samples if "trained" in a["class"]]) == n
    for a in samples:
        assert a["src"].startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1])))
        assert img.size == (128, 128) and (int(a["width"]), int(a["height"])) == img.size  # 8x8 upscaled x16
        px = img.convert("RGB").load()
        assert all(px[x, y] == px[16 * (x // 16), 16 * (y // 16)] for x in range(0, 128, 5) for y in range(0, 128, 7))
    plots = [a for t, a in doc.tags if t == "img" and "plot" in a.get("class", "")]
    assert len(plots) >= 2  # one per reward + the training loss
    svg = base64.b64decode(plots[0]["src"].split(",", 1)[1]).decode()
    assert plots[0]["src"].startswith("data:image/svg+xml;base64,") and "<svg" in svg
    text = "".join(doc.text)
    assert f"{summary['reward_before']['digit_classifier']:.4f}" in text
    assert f"{summary['reward_after']['digit_classifier']:.4f}" in text
    assert "a handwritten zero" in text and "objective:" in text and "digit_classifier 0." in text  # per-image value
    # same seeds for base and trained, cached for reuse
    meta = {w: [json.loads(x) for x in (run_dir / "samples" / f"heldout-{w}" / "metadata.jsonl").read_text().splitlines()]
            for w in ("base", "trained")}
    assert [m["seed"] for m in meta["base"]] == [m["seed"] for m in meta["trained"]] == [1234, 1235]


def test_report_cli_reuses_samples_and_writes_elsewhere(run_dir, report, tmp_path, capsys):
    png = run_dir / "samples" / "heldout-trained" / "00000.png"
    stamp = png.stat().st_mtime_ns
    out = tmp_path / "r" / "page.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert out.exists() and png.stat().st_mtime_ns == stamp
    assert str(out) in capsys.readouterr().out
    assert main(["report", str(tmp_path / "no-such-run")]) == 2


def test_reward_curves_from_history():
    s = {"steps": 20, "reward_before": {"r": 0.1}, "reward_after": {"r": 0.5},
         "history": [{"step": 10, "loss": 1.0}, {"step": 10, "val/reward/r": 0.3}, {"step": 20, "loss": 0.5}]}
    assert reward_curves(s) == {"r": [(0, 0.1), (10, 0.3), (20, 0.5)]}


def test_partial_run_folder_gives_notes_not_errors(tmp_path):
    (tmp_path / "config.yaml").write_text(f"pipeline: {{model: '{tmp_path / 'no-model'}'}}\n")
    page = write_report(tmp_path).read_text()
    assert "no summary.json" in page and "trained samples unavailable" in page and "base samples unavailable" in page
    assert "Resolved config" in page and "no-model" in page


def _chromium_missing() -> str | None:
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).exists()):
        return f"Chromium not installed ({CHROMIUM}; Debian: apt-get install -y chromium chromium-driver)"
    if not Path(CHROMEDRIVER).exists():
        return f"chromedriver not installed ({CHROMEDRIVER}; Debian: apt-get install -y chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install selenium)"
    return None


def test_report_renders_in_headless_chromium(report, tmp_path):
    reason = _chromium_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(report.resolve().as_uri())
        info = driver.execute_script("""
            return Array.from(document.images).map(function (im) {
              im.scrollIntoView();
              var r = im.getBoundingClientRect(), s = getComputedStyle(im);
              return {cls: im.className, complete: im.complete, nw: im.naturalWidth, nh: im.naturalHeight,
                      w: r.width, h: r.height, vis: s.visibility, disp: s.display, op: s.opacity};
            });""")
        samples = [i for i in info if "sample" in i["cls"]]
        plots = [i for i in info if "plot" in i["cls"]]
        assert len(samples) == 4 and len(plots) >= 2
        for i in info:  # decoded, laid out with a size, and not hidden
            assert i["complete"] and i["nw"] > 0 and i["nh"] > 0, i["cls"]
            assert i["w"] >= 64 and i["h"] >= 64, i
            assert i["vis"] == "visible" and i["disp"] != "none" and float(i["op"]) > 0, i
        for el in driver.find_elements("css selector", "img"):
            assert el.is_displayed()
        assert driver.find_element("id", "reward-table").is_displayed()
        assert driver.save_screenshot(str(tmp_path / "report.png"))
        # negative control: the same check sees a broken image
        bad = tmp_path / "broken.html"
        bad.write_text('<img class="sample" src="data:image/png;base64,AAAA">')
        driver.get(bad.as_uri())
        assert driver.execute_script("return document.images[0].naturalWidth") == 0
    finally:
        driver.quit()
