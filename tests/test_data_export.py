"""Script-free export: parquet + card loaded by plain `datasets.load_dataset` gives the builder's rows; Hub push."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from imagenets_hf.data import export as export_module
from imagenets_hf.data.export import build_imagenets_dataset_dict, export_imagenets
from imagenets_hf.data.imagenets import default_synset_words, load_imagenets
from imagenets_hf.data.masks import encode_mask
from imagenets_hf.data.mini import MINI_WNIDS, SYNSET_FILE_NAME, mini_class_names

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export_cache")


@pytest.fixture(scope="module")
def exported(mini_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "out"
    counts = export_imagenets(mini_dir, out, synset_words=mini_dir / SYNSET_FILE_NAME)
    assert counts == {"train_semi": 100, "validation": 50, "test": 30}
    return out


def _card_yaml(out: Path) -> dict:
    text = (out / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1])


def _raw_rows(dataset: datasets.Dataset) -> list[dict]:
    """Rows with undecoded images (bytes), sorted by image_id."""
    dataset = dataset.cast_column("image", datasets.Image(decode=False))
    dataset = dataset.cast_column("annotation", datasets.Image(decode=False))
    return sorted(dataset, key=lambda row: row["image_id"])


@pytest.mark.parametrize("split", ["train_semi", "validation", "test"])
def test_load_dataset_on_export_equals_builder(mini_dir, exported, cache_dir, split):
    builder_rows = load_imagenets(mini_dir, split=split, synset_words=mini_dir / SYNSET_FILE_NAME, cache_dir=cache_dir)
    loaded = datasets.load_dataset(str(exported), "mini", split=split, cache_dir=str(cache_dir / "hub"))
    assert loaded.features == builder_rows.features
    assert loaded.features["label"].names == mini_class_names()
    assert len(loaded) == len(builder_rows)
    for got, want in zip(_raw_rows(loaded), _raw_rows(builder_rows)):
        assert got["image_id"] == want["image_id"]
        assert got["label"] == want["label"]
        assert got["image"]["bytes"] == want["image"]["bytes"]
        if want["annotation"] is None:
            assert got["annotation"] is None
        else:
            got_ids = np.asarray(Image.open(io.BytesIO(got["annotation"]["bytes"])))
            want_ids = np.asarray(Image.open(io.BytesIO(want["annotation"]["bytes"])))
            assert got_ids.dtype == np.uint16 and np.array_equal(got_ids, want_ids)


def test_card_names_config_files_and_classes(exported):
    card = _card_yaml(exported)
    assert card["configs"] == [
        {
            "config_name": "mini",
            "data_files": [
                {"split": "train_semi", "path": "mini/train_semi-*"},
                {"split": "validation", "path": "mini/validation-*"},
                {"split": "test", "path": "mini/test-*"},
            ],
        }
    ]
    label = next(feature for feature in card["dataset_info"]["features"] if feature["name"] == "label")
    names = label["dtype"]["class_label"]["names"]
    assert [names[str(index)] for index in range(len(names))] == mini_class_names()
    assert sorted(path.name for path in (exported / "mini").iterdir()) == [
        "test-00000-of-00001.parquet",
        "train_semi-00000-of-00001.parquet",
        "validation-00000-of-00001.parquet",
    ]


def _card_class_names(out: Path, config_name: str) -> list[str]:
    card = _card_yaml(out)
    info = card["dataset_info"]
    info = next(entry for entry in info if entry["config_name"] == config_name) if isinstance(info, list) else info
    label = next(feature for feature in info["features"] if feature["name"] == "label")
    names = label["dtype"]["class_label"]["names"]
    return [names[str(index)] for index in range(len(names))]


def test_export_names_classes_from_the_folder_synset_words_by_default(mini_dir, tmp_path):
    # The mini folder holds LOC_synset_mapping.txt: used when no synset_words is given, as evaluation and training do.
    assert default_synset_words(mini_dir) == mini_dir / SYNSET_FILE_NAME
    export_imagenets(mini_dir, tmp_path / "out", splits=["validation"])
    assert _card_class_names(tmp_path / "out", "mini") == mini_class_names()
    # Without the file, the wnids name the classes.
    bare = tmp_path / "bare"
    for folder in ("validation", "validation-segmentation"):
        shutil.copytree(mini_dir / folder, bare / folder)
    assert default_synset_words(bare) is None
    export_imagenets(bare, tmp_path / "bare_out", splits=["validation"])
    assert _card_class_names(tmp_path / "bare_out", "mini") == ["other", *MINI_WNIDS]


def _tiny_subset_folder(root: Path, num_classes: int) -> Path:
    """One 8x8 validation image + mask per class (enough for an official class count)."""
    rng = np.random.default_rng(0)
    for index in range(1, num_classes + 1):
        wnid = f"n{index:08d}"
        (root / "validation" / wnid).mkdir(parents=True)
        (root / "validation-segmentation" / wnid).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "validation" / wnid / "a.png")
        ids = np.zeros((8, 8), np.int64)
        ids[2:5, 2:5] = index
        encode_mask(ids).save(root / "validation-segmentation" / wnid / "a.png")
    return root


def test_official_subset_config_name_and_second_config(tmp_path, exported, mini_dir, cache_dir):
    root = _tiny_subset_folder(tmp_path / "ImageNetS50", 50)
    out = tmp_path / "out"
    export_imagenets(mini_dir, out, splits=["validation"])
    export_imagenets(root, out)
    export_imagenets(root, out)  # re-export replaces the files
    card = _card_yaml(out)
    assert [config["config_name"] for config in card["configs"]] == ["50", "mini"]
    assert sorted(path.name for path in (out / "50").iterdir()) == ["validation-00000-of-00001.parquet"]
    fifty = datasets.load_dataset(str(out), "50", split="validation", cache_dir=str(tmp_path / "hub"))
    assert len(fifty) == 50 and fifty.features["label"].num_classes == 51
    row = fifty[fifty["image_id"].index("n00000007/a")]
    assert row["label"] == 7 and np.asarray(row["annotation"]).max() == 7
    mini = datasets.load_dataset(str(out), "mini", split="validation", cache_dir=str(tmp_path / "hub"))
    assert len(mini) == 50


def _script_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_dataset_script", REPO_ROOT / "scripts" / "export_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_push_to_hub_private_by_default_and_annotations_only(mini_dir, cache_dir, monkeypatch, capsys):
    calls = []

    def fake_push(self, repo_id, **kwargs):  # the Hub is out of reach here: record what would be pushed
        calls.append((self, repo_id, kwargs))

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", fake_push)
    monkeypatch.setattr(export_module, "build_imagenets_dataset_dict", _cached_builder(cache_dir))
    main = _script_main()
    main(["--data-dir", str(mini_dir), "--push-to-hub", "me/imagenets-mini"])
    main(["--data-dir", str(mini_dir), "--push-to-hub", "me/masks", "--public", "--annotations-only"])
    assert "pushed config 'mini' to me/imagenets-mini (private)" in capsys.readouterr().out

    full, repo_id, kwargs = calls[0]
    assert repo_id == "me/imagenets-mini" and kwargs["config_name"] == "mini" and kwargs["private"] is True
    assert set(full) == {"train_semi", "validation", "test"}
    assert full["validation"].features["label"].names == mini_class_names()  # the folder's LOC_synset_mapping.txt
    assert full["validation"].column_names == ["image", "annotation", "image_id", "label"]

    masks, repo_id, kwargs = calls[1]
    assert repo_id == "me/masks" and kwargs["config_name"] == "mini" and kwargs["private"] is False
    assert set(masks) == {"train_semi", "validation"}  # the test split has no masks to publish
    assert masks["validation"].column_names == ["annotation", "image_id", "label"]
    assert masks["validation"]["image_id"] == full["validation"]["image_id"]


def _cached_builder(cache_dir: Path):
    def build(*args, **kwargs):
        kwargs.setdefault("cache_dir", cache_dir)
        return build_imagenets_dataset_dict(*args, **kwargs)

    return build


def test_script_requires_an_output(mini_dir):
    with pytest.raises(SystemExit):
        _script_main()(["--data-dir", str(mini_dir)])
    with pytest.raises(SystemExit):
        _script_main()(["--data-dir", str(mini_dir), "--out", "x", "--annotations-only"])
