"""Registry: every reward builds by name (tiny), class attributes, aliases, lazy optional imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from genalign.registry import rewards as REWARDS

EXPECTED = {
    # name: (modality, kind, differentiable)
    "pickscore-v1": ("image", "instance", True),
    "hps-v2.1": ("image", "instance", True),
    "hps-v2.0": ("image", "instance", True),
    "clipscore": ("image", "instance", True),
    "imagereward-v1.0": ("image", "instance", True),
    "laion-aesthetic-v2": ("image", "instance", True),
    "clap": ("audio", "instance", True),
    "fad-dataset": ("audio", "set", True),
    "fad-song": ("audio", "instance", True),
    "vendi": ("image", "set", True),
    "jpeg-compressibility": ("image", "instance", False),
    "jpeg-incompressibility": ("image", "instance", False),
    "ink_mass": ("image", "instance", True),
    "contrast": ("image", "instance", True),
}
ALIASES = {"pickscore": "pickscore-v1", "hpsv2.1": "hps-v2.1", "imagereward": "imagereward-v1.0",
           "aesthetic": "laion-aesthetic-v2"}


def test_names_attributes_and_aliases():
    names = REWARDS.names()
    for name, (modality, kind, diff) in EXPECTED.items():
        assert name in names
        cls = REWARDS.get(name)
        assert (cls.modality, cls.kind, cls.differentiable) == (modality, kind, diff), name
        assert cls.__doc__ and cls.__doc__.strip(), name
    for alias, target in ALIASES.items():
        assert REWARDS.get(alias) is REWARDS.get(target)
        assert REWARDS.get(alias).registry_name == target
    with pytest.raises(KeyError, match="known rewards"):
        REWARDS.get("pickscore-v9")


@pytest.mark.parametrize("name", ["ink_mass", "contrast", "jpeg-compressibility", "clipscore", "hps-v2.0",
                                  "laion-aesthetic-v2"])
def test_tiny_build_by_name_image(name, images):
    r = REWARDS.get(name)(tiny=True)
    assert not r.training and not any(p.requires_grad for p in r.parameters())
    x = images(2)
    s = r.score(x, ["a cat", "a dog"])
    assert s.shape == (2,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    torch.testing.assert_close(r.score(x, ["a cat", "a dog"]), s)  # deterministic


def test_builtin_import_does_not_import_open_clip():
    code = "import sys, genalign.rewards.builtin; print('open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
