"""weights.model_folder.ModelFolderWriter: the one writer of model folders (random models, convert, export)."""

import pytest
import torch

from sdlite.weights.model_folder import SD_MODEL_INDEX, WEIGHT_FILES, ModelFolderWriter
from sdlite.weights.safetensors_mmap import open_safetensors


def test_writes_components_as_diffusers_names_them(tmp_path):
    dst = tmp_path / "model"
    with ModelFolderWriter(dst) as out:
        for name in WEIGHT_FILES:
            out.write_component(name, {"n": name}, {"w": torch.full((2, 3), 1.5)})
        out.write_json("model_index.json", SD_MODEL_INDEX)
    assert (dst / "text_encoder" / "model.safetensors").is_file()
    assert (dst / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    with open_safetensors(dst / "vae" / "diffusion_pytorch_model.safetensors") as f:
        assert torch.equal(f["w"], torch.full((2, 3), 1.5)) and f.metadata == {"format": "pt"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_write_leaves_nothing(tmp_path):
    dst = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with ModelFolderWriter(dst) as out:
            out.write_component("unet", {}, {"w": torch.zeros(4)})
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    dst.mkdir()
    with pytest.raises(FileExistsError):
        with ModelFolderWriter(dst):
            pass
