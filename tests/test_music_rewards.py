"""music_key / music_style / music_clap (genalign.rewards.music): closed forms, gradients, loading, registry."""

import math

import numpy as np
import pytest
import torch

from genalign.data.music import SAMPLE_RATE, STYLES, key_label, render_notes
from genalign.rewards import music as RM


def _tone(midi: float, seconds: float = 2.0, timbre: str = "organ") -> torch.Tensor:
    return torch.from_numpy(render_notes(np.array([[0.0, seconds, midi]]), SAMPLE_RATE, seconds, timbre))


def test_semitone_spectrogram_puts_a_note_on_its_row():
    fe = RM.SemitoneSpectrogram()
    for midi in (45, 60, 69, 81):
        spec = fe(_tone(midi, timbre="choir")[None])  # (1, 1, P, frames)
        assert spec.shape[:3] == (1, 1, 95 - 40 + 1)
        row = spec[0, 0, :, 2:-2].mean(-1).argmax().item()
        assert row == midi - 40
        assert abs(spec.mean().item()) < 1e-4  # per-clip mean removed


def test_transposition_augmentation_is_exact_on_the_pitch_axis():
    fe = RM.SemitoneSpectrogram()
    base, up = fe(_tone(60)[None]), fe(_tone(63)[None])
    shifted = RM.shift_pitch(base, 3)
    inner = slice(8, 40)  # rows away from the edges and the vacated rows
    corr = torch.corrcoef(torch.stack([shifted[0, 0, inner].flatten(), up[0, 0, inner].flatten()]))[0, 1]
    assert corr > 0.97
    assert torch.equal(RM.shift_pitch(base, 0), base)
    # labels: tonic moves with the shift, the mode stays
    assert RM.roll_key(torch.tensor([key_label(0, "major")]), 2).item() == key_label(2, "major")
    assert RM.roll_key(torch.tensor([key_label(9, "minor")]), 3).item() == key_label(0, "minor")
    assert RM.roll_key(torch.tensor([key_label(11, "major")]), -12).item() == key_label(11, "major")


def _prompts_for_all_keys():
    from genalign.data.music import key_name

    return [f"a Bach chorale in {key_name(k)}" for k in range(24)]


def test_music_key_reward_is_a_probability_over_24_keys_and_differentiable():
    r = RM.MusicKeyReward(tiny=True)
    x = (0.3 * torch.randn(2, 1, 8192)).requires_grad_(True)
    prompts = _prompts_for_all_keys()
    total = sum(r(x, [p, p]) for p in prompts)
    assert torch.allclose(total, torch.ones(2), atol=1e-5)  # p(key | clip) sums to 1 over the 24 keys
    out = r(x, ["a jig in D major", "a Bach chorale in B flat minor"])
    assert out.shape == (2,) and ((out >= 0) & (out <= 1)).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # gradient direction: a small ascent step raises the reward
    with torch.no_grad():
        before = r(x, ["a jig in D major", "a Bach chorale in B flat minor"])
        after = r(x + 1e-3 * x.grad / x.grad.norm(), ["a jig in D major", "a Bach chorale in B flat minor"])
    assert (after > before).all()
    with pytest.raises(ValueError, match="names no key"):
        r(x.detach(), ["a Bach chorale", "a jig in D major"])
    with pytest.raises(ValueError, match="needs one prompt"):
        r(x.detach())


def test_music_style_reward_reads_the_style_from_the_prompt():
    r = RM.MusicStyleReward(tiny=True)
    x = 0.3 * torch.randn(1, 1, 8192)
    probs = r.probabilities(x)
    assert probs.shape == (1, len(STYLES)) and torch.allclose(probs.sum(-1), torch.ones(1))
    for i, prompt in enumerate(["a four-voice Bach chorale in G major", "a Palestrina mass movement in C major",
                                "a Monteverdi madrigal in G minor", "an Irish reel in D major"]):
        assert torch.allclose(r(x, [prompt]), probs[:, i])
    # another sample rate is resampled to 4 kHz first: 8 kHz input of twice the length gives the same frames
    assert r(torch.randn(1, 16384), ["a jig in G major"], sample_rate=8000).shape == (1,)
    with pytest.raises(ValueError, match="names no style"):
        r(x, ["music in G major"])


def test_missing_weights_say_how_to_rebuild(tmp_path):
    from genalign.rewards.base import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match="build_music.py"):
        RM.MusicKeyReward(weights=str(tmp_path / "nope.safetensors"))


def test_classifier_training_is_deterministic_and_learns_a_pitch():
    # 4 keys' tonic triads as tiny data; 2 epochs on the same seed give bit-identical weights
    from genalign.data.music import key_label as kl

    waves, keys = [], []
    for pc in (0, 2, 7, 9):
        notes = np.array([[0.0, 2.0, 60 + pc], [0.0, 2.0, 64 + pc], [0.0, 2.0, 67 + pc]])
        waves.append(torch.from_numpy(render_notes(notes, SAMPLE_RATE, 2.0, "organ")))
        keys.append(kl(pc, "major"))
    x = torch.stack(waves)[:, None].repeat(4, 1, 1)
    k = torch.tensor(keys).repeat(4)
    s = torch.zeros(len(k), dtype=torch.long)
    a = RM.train_music_classifier(x, k, s, epochs=2, batch_size=8, max_shift=0)
    b = RM.train_music_classifier(x, k, s, epochs=2, batch_size=8, max_shift=0)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    trained = RM.train_music_classifier(x, k, s, epochs=25, batch_size=8, max_shift=0, noise=0.0)
    acc = RM.classifier_accuracy(trained, x, k, s)
    assert acc["key"] == 1.0 and acc["style"] == 1.0


def test_clap_contrastive_loss_hand_values():
    eye = torch.eye(2)
    s = torch.tensor(math.log(10.0))
    # matched orthonormal pairs: each row's CE = log(1 + e^{-10})
    assert torch.allclose(RM.clap_contrastive_loss(eye, eye, s), torch.tensor(math.log1p(math.exp(-10.0))), atol=1e-6)
    # swapped pairs are penalised: CE = log(1 + e^{10})
    assert torch.allclose(RM.clap_contrastive_loss(eye, eye.flip(0), s), torch.tensor(math.log1p(math.exp(10.0))), atol=1e-4)
    # identical captions are positives of each other: two clips, same text → uniform target, loss log 2 at best
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(RM.clap_contrastive_loss(same, same, s), torch.tensor(math.log(2.0)), atol=1e-6)


def test_music_clap_trains_saves_and_loads_through_both_rewards(tmp_path):
    from genalign.registry import rewards as REWARDS

    caps = ["a four-voice Bach chorale in G major, 4/4, slow", "an Irish reel in D major, 2/4, fast"] * 2
    x = torch.stack([_tone(67, 4.096), _tone(62, 4.096, "fiddle")] * 2)[:, None]
    rep = RM.train_music_clap(x, caps, tmp_path / "clap", steps=2, batch_size=4)
    assert rep["steps"] == 2 and math.isfinite(rep["final_loss"])
    a = RM.MusicCLAPScore(weights=str(tmp_path / "clap"))
    b = REWARDS.get("clap")(weights=str(tmp_path / "clap"), sample_rate=SAMPLE_RATE)
    assert a.frontend.sample_rate == SAMPLE_RATE  # the shipped 4 kHz front end, no 48 kHz resampling
    xs = x[:2].clone().requires_grad_(True)
    sa = a(xs, caps[:2])
    assert sa.shape == (2,) and torch.allclose(sa, b(x[:2], caps[:2]), atol=1e-6)
    sa.sum().backward()
    assert torch.isfinite(xs.grad).all() and xs.grad.abs().sum() > 0
    acc = RM.clap_retrieval_accuracy(a, x, caps)
    assert acc["num_captions"] == 2 and acc["chance_top1"] == 0.5 and 0 <= acc["top1"] <= 1
    tok = RM.clap_tokenizer(caps)
    ids = tok(caps[:1])["input_ids"]
    assert ids[0][0] == 0 and ids[0][-1] == 2 and tok.decode(ids[0], skip_special_tokens=True) == caps[0]


def test_music_frechet_distance_is_zero_against_its_own_statistics():
    from genalign.rewards.fad import ReferenceStats

    clf = RM.MusicClassifier().eval()
    x = 0.3 * torch.randn(40, 1, 4096)
    with torch.no_grad():
        ref = ReferenceStats.from_embeddings(clf.features(x))
    assert abs(RM.music_frechet_distance(x, ref, clf)) < 1e-6
    # gain and DC offset do not move the features (log spectrum minus its mean, bins far above DC) ...
    assert abs(RM.music_frechet_distance(0.5 * x + 0.1, ref, clf)) < 1e-6
    # ... a different sound does
    tones = torch.stack([_tone(60 + i % 12, 1.024) for i in range(40)])[:, None] + 0.01 * x
    assert RM.music_frechet_distance(tones, ref, clf) > 1e-3


def test_registered_and_usable_as_fad_encoder():
    from genalign.registry import rewards as REWARDS
    from genalign.rewards.fad import FADDataset

    for name in ("music_key", "music_style", "music_clap"):
        assert name in REWARDS.names()
    fad = FADDataset(encoder="music_key", encoder_kwargs={}, tiny=True, tiny_dim=128)
    assert fad(0.3 * torch.randn(6, 1, 4096)).ndim == 0
