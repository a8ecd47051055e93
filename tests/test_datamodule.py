"""DataModule: datasets from config blocks, loaders with LesionDataset.collate, workers, Lightning integration."""
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.utilities.model_helpers import is_overridden

from demo.make_phantoms import make_phantoms
from ldm.data.datamodule import DataModule
from ldm.errors import ConfigError

CROP = [32, 64, 64]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_phantoms(tmp_path_factory.mktemp("phantoms"), n=4, seed=1, progress=False)


@pytest.fixture(scope="module")
def phantom_lists(phantoms):
    return phantoms["lists"]


def block(lists, split, kinds=("image", "label", "type", "coarseg"), **params):
    return {"target": "ldm.data.dataset.LesionDataset",
            "params": {**{f"{kind}_list": lists[f"{split}_{kind}_list"] for kind in kinds}, **params}}


def test_loaders_yield_collated_batches(phantoms, phantom_lists):
    config = OmegaConf.create({"batch_size": 2, "num_workers": 0,
                               "train": block(phantom_lists, "train", crop_shape=CROP),
                               "validation": block(phantom_lists, "val", crop_shape=CROP),
                               "test": block(phantom_lists, "val", max_mask_num=2, crop_shape=CROP)})
    data = DataModule(**config)
    data.setup("fit")
    assert set(data.datasets) == {"train", "validation"}
    assert is_overridden("train_dataloader", data) and is_overridden("val_dataloader", data)
    assert is_overridden("test_dataloader", data) and not is_overridden("predict_dataloader", data)
    batches = list(data.train_dataloader())
    assert [batch["image"].shape[0] for batch in batches] == [2, 1]
    first = batches[0]
    assert first["image"].shape == (2, 1, *CROP) and first["label"].shape == (2, *CROP)
    assert len(first["text"]) == 2 and all(isinstance(text, dict) for text in first["text"])
    assert len(first["image_path"]) == 2 and len(first["crop"]) == 2
    validation = next(iter(data.val_dataloader()))
    assert validation["image"].shape == (1, 1, *CROP)
    test = next(iter(data.test_dataloader()))
    assert test["image"].shape == (1, 1, 48, 96, 96) and test["max_mask_num"] == [2]
    assert list(test["type"][0]) == [str(phantoms["manifest"]["cases"][-1]["organ_id"])]
    with pytest.raises(ConfigError, match="data.predict: no dataset configured"):
        data.dataset("predict")


def test_workers_draw_different_augmentations(phantom_lists):
    train = block(phantom_lists, "train", kinds=("image", "label"), crop_shape=CROP, random_sample=True, iter_num=8,
                  augment={"jitter": 6})
    data = DataModule(batch_size=1, num_workers=2, train=train, shuffle_train=False)
    torch.manual_seed(0)
    crops = [batch["crop"][0]["crop_start"] for batch in data.train_dataloader()]
    assert len(crops) == 8
    by_worker = crops[0::2], crops[1::2]  # the loader alternates between its two workers
    assert by_worker[0] != by_worker[1]
    torch.manual_seed(0)
    assert [batch["crop"][0]["crop_start"] for batch in data.train_dataloader()] == crops, "seeded: reproducible"


class TinyModel(pl.LightningModule):
    """Consumes LesionDataset batches; counts what it saw."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.seen = {"train": 0, "val": 0}

    def training_step(self, batch, batch_idx):
        self.seen["train"] += batch["image"].shape[0]
        return (self.weight * batch["image"].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.seen["val"] += batch["image"].shape[0]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.parametrize("with_validation", [True, False])
def test_lightning_fit_uses_the_module(phantom_lists, with_validation):
    blocks = {"train": block(phantom_lists, "train", crop_shape=CROP)}
    if with_validation:
        blocks["validation"] = block(phantom_lists, "val", crop_shape=CROP)
    model = TinyModel()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=DataModule(batch_size=2, train=blocks["train"], validation=blocks.get("validation")))
    assert model.seen == {"train": 3, "val": 1 if with_validation else 0}


def test_config_errors():
    with pytest.raises(ConfigError, match="at least one of"):
        DataModule(batch_size=1)
    with pytest.raises(ConfigError, match="batch_size must be"):
        DataModule(batch_size=0, train={"target": "x.y"})
