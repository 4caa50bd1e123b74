"""The music21 corpus → rendered clips + captions (genalign.data.music): metadata, captions, synthesis, split."""

from pathlib import Path

import numpy as np
import pytest
import torch

from genalign.data import music as M


def test_key_labels_round_trip_through_captions_and_prompt_parser():
    info = M.PieceInfo(path="x", style="chorale", tonic_pc=0, mode="major", meter="4/4", voices=4, dance="", bpm=60,
                       beat_quarters=1.0)
    for label in range(24):
        for template in (0, 1, 2):
            cap = M.caption(info, key=label, template=template)
            assert M.parse_prompt(cap) == (label, M.STYLES.index("chorale")), cap
    assert M.key_name(7) == "G major" and M.key_name(12 + 9) == "A minor" and M.key_name(6) == "F sharp major"
    assert M.parse_prompt("a reel in F# minor")[0] == M.key_label(6, "minor")
    assert M.parse_prompt("a jig in Bb major") == (10, M.STYLES.index("fiddle"))
    assert M.parse_prompt("some music") == (None, None)
    with pytest.raises(ValueError, match="mode"):
        M.key_label(0, "dorian")


def test_caption_templates_and_tempo_words():
    info = M.PieceInfo(path="x", style="chorale", tonic_pc=7, mode="major", meter="4/4", voices=4, dance="", bpm=60,
                       beat_quarters=1.0)
    assert M.caption(info, template=0) == "a four-voice Bach chorale in G major, 4/4, slow"
    assert M.caption(info, template=1) == "slow four-voice Bach chorale, 4/4, in G major"
    assert M.caption(info, template=2) == "a Bach chorale for four voices, slow, G major, in 4/4"
    reel = M.PieceInfo(path="y", style="fiddle", tonic_pc=2, mode="major", meter="2/4", voices=1, dance="reel",
                       bpm=120, beat_quarters=1.0)
    assert M.caption(reel, template=0) == "an Irish reel in D major, 2/4, fast"
    assert [M.tempo_word(b) for b in (71.9, 72, 103.9, 104)] == ["slow", "moderate", "moderate", "fast"]
    # every caption word is in the base model's vocabulary (no <unk> for the tokenizer)
    import re

    vocab = set(M.caption_words())
    for cap in (M.caption(info, template=t) for t in range(3)):
        assert set(re.findall(r"\w+|[^\w\s]+", cap)) <= vocab, cap
    with pytest.raises(ValueError, match="template"):
        M.caption(info, template=3)


def test_render_notes_closed_form():
    sr = M.SAMPLE_RATE
    notes = np.array([[0.5, 1.0, 69.0]])  # A4 = 440 Hz from 0.5 s to 1.5 s
    w = M.render_notes(notes, sr, seconds=2.0, timbre="organ")
    assert w.dtype == np.float32 and w.shape == (2 * sr,)
    assert np.all(w[: int(0.5 * sr)] == 0)  # silent before the onset
    assert np.all(w[int(1.55 * sr) + 2:] == 0)  # released 40 ms after the end of the note
    seg = w[int(0.6 * sr):int(1.4 * sr)].astype(np.float64)
    spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
    freqs = np.fft.rfftfreq(len(seg), 1 / sr)
    assert abs(freqs[spec.argmax()] - 440.0) < 2.0
    # partials of 440 Hz below 0.45·sr (1800 Hz at 4 kHz) are 440, 880, 1320, 1760; nothing above
    assert spec[freqs > 1850].max() < 1e-3 * spec.max()
    assert spec[np.abs(freqs - 880) < 3].max() > 0.2 * spec.max()
    up = M.render_notes(notes, sr, seconds=2.0, timbre="organ", transpose=12)
    spec_up = np.abs(np.fft.rfft(up[int(0.6 * sr):int(1.4 * sr)].astype(np.float64) * np.hanning(len(seg))))
    assert abs(freqs[spec_up.argmax()] - 880.0) < 2.0  # transposing an octave doubles the fundamental
    with pytest.raises(ValueError, match="timbre"):
        M.render_notes(notes, sr, timbre="kazoo")


def test_cut_clips_drops_silence_and_normalises():
    sr = 1000
    wave = np.concatenate([np.zeros(2 * sr), np.sin(np.arange(3 * sr) * 0.3)]).astype(np.float32)
    clips = M.cut_clips(wave, sr, max_clips=5)
    assert len(clips) == 3  # two silent windows dropped
    assert all(abs(np.abs(c).max() - 0.8) < 1e-6 for c in clips)
    assert M.cut_clips(wave, sr, max_clips=2).__len__() == 2
    assert M.cut_clips(np.zeros(5000, np.float32), sr, 3) == []


def test_split_is_by_piece_and_stable():
    assert M.is_heldout("bach/bwv2.6.mxl") == M.is_heldout("bach/bwv2.6.mxl")
    frac = np.mean([M.is_heldout(f"piece{i}") for i in range(4000)])
    assert 0.17 < frac < 0.23
    assert all(-5 <= M.transpose_of(f"p{i}") <= 6 and M.transpose_of(f"p{i}") != 0 for i in range(200))


# ---- on real corpus pieces (music21) --------------------------------------------------------------------------


def _paths(*rels):
    from music21 import corpus

    out = []
    for style, rel in rels:
        p = str(corpus.getWork(rel))
        out.append((style, p))
    return out


def test_metadata_of_real_corpus_pieces():
    pytest.importorskip("music21")
    (_, bach), (_, reel) = _paths(("chorale", "bach/bwv2.6.mxl"), ("fiddle", "ryansMammoth/7thRegimentReel.abc"))
    s, why = M.parse_piece(bach)
    assert why is None
    info = M.piece_info(s, bach, "chorale")
    assert (info.path, info.tonic_pc, info.mode, info.meter, info.voices) == ("bach/bwv2.6.mxl", 7, "minor", "4/4", 4)
    assert M.caption(info).startswith("a four-voice Bach chorale in G minor, 4/4, ")
    notes = M.score_notes(s, info.bpm, info.beat_quarters)
    assert notes.shape[1] == 3 and (np.diff(notes[:, 0]) >= 0).all() and notes[:, 2].min() >= 36
    s2, _ = M.parse_piece(reel)
    info2 = M.piece_info(s2, reel, "fiddle")
    assert (info2.dance, info2.tonic_pc, info2.mode, info2.meter) == ("reel", 9, "major", "2/4")
    assert M.caption(info2).startswith("an Irish reel in A major, 2/4, ")


def test_bad_and_slow_files_are_skipped_and_counted(tmp_path):
    pytest.importorskip("music21")
    bad = tmp_path / "broken.abc"
    bad.write_text("X:1\nT:broken\nK:ZZZ\n|]]]((((\n")
    empty = tmp_path / "empty.xml"
    empty.write_text("<not-music/>")
    assert M.parse_piece(str(empty))[0] is None
    (_, bach), = _paths(("chorale", "bach/bwv2.6.mxl"))
    score, why = M.parse_piece(bach, timeout_s=1e-4)  # far too short for any real parse
    assert score is None and why == "timeout"
    corpus = M.render_corpus("all", paths=[("chorale", str(empty)), ("chorale", bach)], clips_per_piece=1)
    assert len(corpus) == 1 and sum(corpus.skipped.values()) == 1
    assert corpus.captions[0].startswith("a four-voice Bach chorale in G minor")


def test_render_corpus_deterministic_and_split_disjoint():
    pytest.importorskip("music21")
    rels = [("chorale", "bach/bwv2.6.mxl"), ("chorale", "bach/bwv10.7.mxl"), ("fiddle", "ryansMammoth/7thRegimentReel.abc"),
            ("fiddle", "ryansMammoth/AcaciaReel.abc"), ("chorale", "bach/bwv101.7.mxl")]
    paths = _paths(*rels)
    a = M.render_corpus("train", paths=paths, clips_per_piece=1, heldout_fraction=0.5)
    b = M.render_corpus("train", paths=paths, clips_per_piece=1, heldout_fraction=0.5)
    h = M.render_corpus("heldout", paths=paths, clips_per_piece=1, heldout_fraction=0.5)
    assert torch.equal(a.waveforms, b.waveforms) and a.captions == b.captions  # bit-identical
    assert a.waveforms.shape[1:] == (1, int(round(M.CLIP_SECONDS * M.SAMPLE_RATE)))
    assert set(a.pieces).isdisjoint(h.pieces) and len(set(a.pieces)) + len(set(h.pieces)) == len(rels)
    # train: each piece also rendered transposed, with the key label moved by the same shift
    for p in set(a.pieces):
        rows = [i for i, q in enumerate(a.pieces) if q == p]
        shifts = {int(a.transpose[i]) for i in rows}
        assert shifts == {0, M.transpose_of(p)}
        k0 = next(int(a.keys[i]) for i in rows if a.transpose[i] == 0)
        k1 = next(int(a.keys[i]) for i in rows if a.transpose[i] != 0)
        assert (k0 % 12 + M.transpose_of(p)) % 12 == k1 % 12 and (k0 >= 12) == (k1 >= 12)
    # held-out captions use the held-out template only
    info = {i.path: i for i in h.infos}
    for cap, p in zip(h.captions, h.pieces):
        assert cap == M.caption(info[p], template=2)
    assert np.abs(a.waveforms.numpy()).max() <= 0.8 + 1e-6


def _tiny_corpus(split="train"):
    """Three rendered notes as a MusicCorpus (stands in for the minute-long corpus render)."""
    from genalign.data.music import SAMPLE_RATE, MusicCorpus, render_notes

    waves = torch.stack([torch.from_numpy(render_notes(np.array([[0.0, 2.0, 60.0 + i]]), SAMPLE_RATE, 4.096))[None]
                         for i in range(3)]).float()
    caps = [f"a four-voice Bach chorale in {k} major, 4/4, slow" for k in ("C", "D", "E")]
    return MusicCorpus(waves, caps, torch.tensor([0, 2, 4]), torch.zeros(3, dtype=torch.long),
                       ["bach/a", "bach/b", "bach/c"], torch.zeros(3, dtype=torch.long), SAMPLE_RATE, split,
                       skipped={"timeout": 1})


def test_music_split_source_resamples_crops_and_names_its_errors(monkeypatch):
    import sys

    import genalign.data.music as M

    calls = []
    monkeypatch.setattr(M, "render_corpus", lambda split, **kw: calls.append((split, kw)) or _tiny_corpus(split))
    from genalign.data.audio import load_music_split

    d = load_music_split("music:train", sample_rate=8_000, channels=2, num_samples=20_000, max_items=2)
    assert calls == [("train", {"per_style": M.DEMO_PER_STYLE, "clips_per_piece": 3, "progress": True})]
    assert d.waveforms.shape == (2, 2, 20_000) and d.sample_rate == 8_000  # 16,384 at 4 kHz → 32,768, cropped
    assert torch.equal(d.waveforms[:, 0], d.waveforms[:, 1])  # mono repeated
    assert d.prompts[1].endswith("D major, 4/4, slow") and d.skipped == {"timeout": 1}
    same = load_music_split("music:heldout", num_samples=None)  # 4 kHz, mono: the rendered clips unchanged
    assert torch.equal(same.waveforms, _tiny_corpus().waveforms) and calls[-1][0] == "heldout"
    with pytest.raises(ValueError, match="music:train and music:heldout"):
        load_music_split("music:all")
    monkeypatch.setitem(sys.modules, "music21", None)  # not installed
    with pytest.raises(ImportError, match=r"pip install 'genalign\[music\]'"):
        load_music_split("music:train")


def test_plan_checks_the_music_split_source():
    from genalign.config import load_config
    from genalign.plan.checks import check_data_rows
    from genalign.plan.models import Plan

    root = Path(__file__).resolve().parent.parent
    for src, ok in (("music:train", True), ("music:everything", False)):
        cfg = load_config(root / "configs" / "ddo_music.yaml", [f"data.source.source={src}"])
        p = Plan(config="x", model="builtin:music", gpu_memory=1.0, trace=False)
        check_data_rows(cfg, p, require=True)
        assert (not p.problems) == ok, p.problems
        assert ok == any("music:train: built-in" in d for d in p.data)
