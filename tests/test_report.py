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
    folder = run_dir / "samples" / "heldout-trained"
    png = folder / json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
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


# -- the report reads what training kept (issue 17) ----------------------------------------------------------------
def _kept_run(root: Path, audio: bool = False) -> Path:
    """A run folder as training leaves it, made by hand: 2 prompts x 3 seeds per side, rows split over two ranks
    and written out of order, known rewards (trained wins 4, ties 1, loses 1 on "r")."""
    run = root / "run"
    for which in ("base", "trained"):
        (run / "samples" / f"heldout-{which}").mkdir(parents=True)
    (run / "config.yaml").write_text("pipeline: {model: 'no-such-model-folder'}\nvalidation: {num_inference_steps: 3, "
                                     "guidance_scale: 1.0}\n")
    base_r = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    trained_r = [0.2, 0.2, 0.5, 0.9, 0.4, 0.7]
    prompts = ["a handwritten one"] * 3 + ["a handwritten two"] * 3
    for which, vals in (("base", base_r), ("trained", trained_r)):
        folder = run / "samples" / f"heldout-{which}"
        rows = {0: [], 1: []}
        for i, v in enumerate(vals):
            if audio:
                import soundfile as sf
                import numpy as np

                name = f"sample_{i:05d}.wav"
                sf.write(folder / name, (0.1 * np.sin(np.arange(800) * (i + 1) / 10)).astype("float32"), 8000)
            else:
                name = f"sample_{i:05d}.png"
                Image.new("RGB", (8, 8), (int(255 * v), 0, 0 if which == "base" else 255)).save(folder / name)
            rows[i % 2].append({"file_name": name, "index": i, "prompt": prompts[i], "seed": 1234 + i,
                                "sample": i % 3, "rewards": {"r": v, "s": -v}})
        for rank, rs in rows.items():
            (folder / f"metadata.rank{rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rs)))
    summary = {"objective": "mapo", "model": "tiny", "steps": 4, "reward_before": {"r": sum(base_r) / 6},
               "reward_after": {"r": sum(trained_r) / 6}, "heldout_prompts": "digits:heldout", "samples_per_prompt": 3,
               "phase_seconds": {"evaluate base": 12.5, "train": 30.0},
               "history": [{"step": 2, "val/reward/r": 0.4}, {"step": 2, "val/fd": 30.0}, {"step": 4, "val/fd": 35.0}],
               "fidelity": {"frechet_distance": {"before": 22.8, "after": 36.8}}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_report_reads_kept_samples_and_never_draws(tmp_path, monkeypatch):
    import genalign.evaluation.samples as samples_mod
    from genalign.evaluation.report import build_report_html

    def no_drawing(*a, **k):
        raise AssertionError("the report drew samples although training kept them")

    monkeypatch.setattr(samples_mod, "run_samples", no_drawing)
    monkeypatch.setattr(samples_mod, "_generate", no_drawing)
    run = _kept_run(tmp_path)
    out = write_report(run)
    doc = _parse(out)
    text = "".join(doc.text)
    imgs = [a for t, a in doc.tags if t == "img" and "sample" in a.get("class", "")]
    assert len([a for a in imgs if "base" in a["class"]]) == 6
    assert len([a for a in imgs if "trained" in a["class"]]) == 6
    # side by side: one column per seed, base row then trained row, the same seed in each column
    page = out.read_text()
    block = page[page.index('id="prompt-0"'):page.index('id="prompt-1"')]
    assert block.index("1234") < block.index("1235") < block.index("1236") < block.index('class="base"') < \
        block.index('class="trained"')
    assert "a handwritten one" in block and "a handwritten two" not in block
    # per-prompt means before / after (hand values), the change with its sign
    assert "0.2000" in block and "0.3000" in block and "+0.1000" in block  # prompt 1: r 0.2 -> 0.3
    block2 = page[page.index('id="prompt-1"'):page.index('id="winrate"')]
    assert "0.5000" in block2 and "0.6667" in block2 and "+0.1667" in block2  # prompt 2: r 0.5 -> 0.6667
    # per-sample win rate: 4 wins, 1 tie, 1 loss -> (4 + 0.5) / 6; for "s" (= -r) 1 win, 1 tie, 4 losses
    win = page[page.index('id="winrate"'):page.index('id="histogram"')]
    assert "0.7500" in win and "4 / 1 / 1" in win and "1 / 1 / 4" in win and "0.2500" in win
    # histogram (one per reward), the reward curve, fidelity rows + FD curve, phase times
    hist = page[page.index('id="histogram"'):page.index('id="fidelity"')]
    assert hist.count('class="plot"') == 2
    fid = page[page.index('id="fidelity"'):page.index('id="config"')]
    assert "frechet_distance" in fid and "22.8000" in fid and "36.8000" in fid and 'class="plot"' in fid
    assert "evaluate base" in text and "12.5 s" in text
    # the manifest genalign score reads is written beside the kept samples
    rows = [json.loads(x) for x in (run / "samples" / "heldout-base" / "metadata.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6)) and rows[0]["seed"] == 1234
    assert not (run / "samples" / "heldout-base" / "generation.json").exists()
    # keyed by the run, not by the path's spelling: the same page through another spelling
    other = build_report_html(Path(str(run) + "/../run/."))
    strip = lambda s: s.split("written ")[1].split("</p>", 1)[1]  # noqa: E731  (drop the time stamp line)
    assert strip(other) == strip(page)


def test_pair_by_prompt_pairs_by_seed_not_position():
    from genalign.evaluation.report import pair_by_prompt, paired_win_rates

    base = [{"prompt": "p", "seed": 2, "rewards": {"r": 0.0}}, {"prompt": "p", "seed": 1, "rewards": {"r": 1.0}}]
    trained = [{"prompt": "p", "seed": 1, "rewards": {"r": 2.0}}, {"prompt": "p", "seed": 2, "rewards": {"r": -1.0}},
               {"prompt": "q", "seed": 3, "rewards": {"r": 5.0}}]
    groups = pair_by_prompt(base, trained)
    assert [(g["prompt"], [(s, b and b["rewards"]["r"], t and t["rewards"]["r"]) for s, b, t in g["pairs"]])
            for g in groups] == [("p", [(2, 0.0, -1.0), (1, 1.0, 2.0)]), ("q", [(3, None, 5.0)])]
    (w,) = paired_win_rates(groups)
    assert (w["name"], w["n"], w["wins"], w["losses"], w["win_rate"]) == ("r", 2, 1, 1, 0.5)  # unpaired q left out


def test_audio_run_gets_players(tmp_path):
    pytest.importorskip("soundfile")
    run = _kept_run(tmp_path, audio=True)
    doc = _parse(write_report(run))
    players = [a for t, a in doc.tags if t == "audio"]
    assert len(players) == 12
    assert all("controls" in a and a["src"].startswith("data:audio/wav;base64,") for a in players)
    assert not [a for t, a in doc.tags if t == "img" and "sample" in a.get("class", "")]


def test_fidelity_figures_from_objective_metrics():
    from genalign.evaluation.report import fidelity_figures

    s = {"objective_metrics": {"round_history": [{"round": 0, "step": 5, "fd": 3.0}, {"round": 0, "selected_step": 5},
                                                 {"round": 1, "step": 10, "fd": 2.5}]},
         "history": [{"step": 1, "loss": 1.0, "val/frechet_distance": 9.0}]}
    f = fidelity_figures(s)
    assert f["curves"] == {"selection FD (per round)": [(5, 3.0), (10, 2.5)], "val/frechet_distance": [(1, 9.0)]}
    assert f["rows"] == [] and fidelity_figures(None) == {"rows": [], "curves": {}}


def test_report_screenshot_shows_the_side_by_side_section(tmp_path):
    """Headless Chromium renders the side-by-side section: every sample image decoded, base above trained in the
    same column for the same seed; the screenshot is kept as tests' artefact (GENALIGN_SCREENSHOT_DIR)."""
    reason = _chromium_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    page = write_report(_kept_run(tmp_path))
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1600"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(page.resolve().as_uri())
        section = driver.find_element("id", "samples")
        driver.execute_script("arguments[0].scrollIntoView()", section)
        boxes = driver.execute_script("""
            return Array.from(document.querySelectorAll('#prompt-0 img.sample')).map(function (im) {
              var r = im.getBoundingClientRect();
              return {cls: im.className, x: r.left, y: r.top, w: r.width, h: r.height, nw: im.naturalWidth};
            });""")
        base = [b for b in boxes if "base" in b["cls"]]
        trained = [b for b in boxes if "trained" in b["cls"]]
        assert len(base) == len(trained) == 3
        for b, t in zip(base, trained):
            assert b["nw"] == 128 and b["w"] >= 64 and t["w"] >= 64
            assert abs(b["x"] - t["x"]) < 1 and t["y"] > b["y"] + b["h"] - 1  # same column, trained below base
        assert base[0]["x"] < base[1]["x"] < base[2]["x"]  # seeds side by side
        shot = Path(os.environ.get("GENALIGN_SCREENSHOT_DIR", tmp_path)) / "report_samples.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert section.screenshot(str(shot))
        img = Image.open(shot).convert("RGB")
        assert img.width >= 400 and img.height >= 300
        # the red-channel ramp of the hand-made samples is on screen (not a blank or broken section)
        colours = img.getcolors(maxcolors=1 << 20)
        assert any(c[1][2] == 255 and c[1][0] > 100 and c[1][1] == 0 for c in colours)  # a trained sample's pixels
    finally:
        driver.quit()


def test_old_run_without_kept_samples_draws_once_then_reuses(tmp_path):
    """A run made before training kept its samples: the report draws them once (base model and export, same
    seeds), scores them with the run's rewards, and a second report reuses the drawing."""
    from genalign.config import load_config, save_config
    from genalign.pipelines.tiny import tiny_sd_pipeline

    run = tmp_path / "old"
    run.mkdir()
    cfg = load_config(None, ["pipeline.model=tiny:sd", "validation.max_prompts=1", "validation.samples_per_prompt=2",
                             "validation.num_inference_steps=2", "rewards=[{name: ink_mass}]"])
    save_config(cfg, run / "config.yaml")
    tiny_sd_pipeline(seed=1).save_pretrained(run / "export")
    page = write_report(run).read_text()
    assert "samples drawn for this report" in page
    doc = _parse(run / "report.html")
    imgs = [a for t, a in doc.tags if t == "img" and "sample" in a.get("class", "")]
    assert len([a for a in imgs if "base" in a["class"]]) == len([a for a in imgs if "trained" in a["class"]]) == 2
    assert "ink_mass 0." in "".join(doc.text)
    drawn = run / "samples" / "heldout-trained" / "generation.json"
    stamp = drawn.stat().st_mtime_ns
    write_report(run)
    assert drawn.stat().st_mtime_ns == stamp  # reused, not drawn again
