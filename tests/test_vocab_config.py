from pathlib import Path

import pytest

from medsam3.config import ConfigError, load_config
from medsam3.vocab import UnknownLabelError, Vocabulary, normalize


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.from_file()


@pytest.mark.parametrize(
    ("name", "modality", "prompt", "window"),
    [
        ("liver", "CT", "liver", "soft_tissue"),
        ("Hepatic_Parenchyma", "CT", "liver", "soft_tissue"),
        ("kidney_left", "CT", "left kidney", "soft_tissue"),
        ("lung_upper_lobe_right", "CT", "right lung upper lobe", "lung"),
        ("rib_left_9", "CT", "left rib 9", "bone"),
        ("vertebrae_T9", "CT", "t9 vertebra", "bone"),
        ("heart_atrium_left", "CT", "left atrium", "soft_tissue"),
        ("inferior_vena_cava", "CT", "inferior vena cava", "soft_tissue"),
        ("brain", "MR", "brain", "brain"),
        ("tumor", "US", "breast tumor", "soft_tissue"),
        ("lesion", "DERM", "skin lesion", "soft_tissue"),
        ("polyp", "ENDO", "polyp", "soft_tissue"),
        ("vessel", "FUNDUS", "retinal blood vessel", "soft_tissue"),
        ("nuclei", "PATH", "cell nucleus", "soft_tissue"),
    ],
)
def test_lookup(vocab, name, modality, prompt, window):
    entry = vocab.resolve(name, modality)
    assert (entry.prompt, entry.window) == (prompt, window)


def test_every_sam_med2d_demo_label_is_known(vocab, shared_data):
    from medsam3.io.image2d import target_of

    masks = sorted((shared_data / "sam-med2d-demo" / "masks").glob("*.png"))
    images = [p.stem for p in (shared_data / "sam-med2d-demo" / "images").glob("*.png")]
    names = {target_of(m.stem, next(i for i in images if m.stem.startswith(i + "_"))) for m in masks}
    assert len(names) == 24
    vocab.check(names, "CT")


def test_unknown_labels_listed_and_extra_labels_add_them(vocab):
    with pytest.raises(UnknownLabelError) as err:
        vocab.check(["liver", "hepatic cyst", "blorb"], "CT")
    assert err.value.names == ["blorb", "hepatic cyst"]
    assert "extra_labels" in str(err.value)
    extended = Vocabulary.from_file(extra_labels={"hepatic cyst": {"prompt": "liver cyst", "window": "soft_tissue"},
                                                  "tumor": {"prompt": "liver tumor"}})
    assert extended.resolve("hepatic_cyst").prompt == "liver cyst"
    assert extended.resolve("tumor", "CT").prompt == "liver tumor"  # user additions win over synonyms


def test_normalize():
    assert normalize("  Lung__Upper-Lobe_LEFT ") == "lung upper lobe left"


def test_config_layers_and_overrides(tmp_path: Path):
    user = tmp_path / "user.yaml"
    user.write_text("image_size: 512\nslice_axis: 1\n")
    params = tmp_path / "params.yaml"
    params.write_text("prepare:\n  image_size: 256\n  seed: 7\n")
    cfg = load_config("prepare", ["seed=9", "extra_labels.cyst.prompt=kidney cyst"], user, params)
    assert (cfg.image_size, cfg.slice_axis, cfg.seed) == (256, 1, 9)
    assert cfg.extra_labels.cyst.prompt == "kidney cyst"
    with pytest.raises(ConfigError, match="imag_size"):
        load_config("prepare", ["imag_size=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config("prepare", ["image_size"])
