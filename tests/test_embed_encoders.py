"""Third-party encoders from a local folder: random-weight timm models saved in the hub layouts users keep UNI,
Virchow2, H-optimus... in (config.json + model.safetensors or pytorch_model.bin), completed by the known-encoder
table (input size, mean/std, µm/px, feature recipe), user-overridable; their h5 output in TRIDENT's layout."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pathdino.embed import h5_dir

sys.path.insert(0, str(Path(__file__).parent))
from embed_fixtures import TILE_PX, make_store  # noqa: E402

SIZES = {"s1": 20, "s2": 7}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[float, str]:
    root = tmp_path_factory.mktemp("stores")
    return {mpp: make_store(root / f"tiles-{mpp}.zarr", SIZES, mpp=mpp) for mpp in (0.5, 1.0)}


def save_hub_folder(
    folder: Path,
    architecture: str,
    build_args: dict,
    config_args: dict,
    pretrained_cfg: dict | None = None,
    torch_bin: bool = False,
    seed: int = 0,
):
    """A random-weight timm model saved the way the hub keeps it; returns the model (for reference outputs)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, num_classes=0, **build_args).eval()
    folder.mkdir(parents=True)
    config = {"architecture": architecture, "num_classes": 0, "model_args": config_args}
    if pretrained_cfg is not None:
        config["pretrained_cfg"] = pretrained_cfg
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if torch_bin:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"))
    return model


def _tiles(store: str, sid: str) -> torch.Tensor:
    from tiling.store import TileStore

    slide = TileStore(store).slide(sid)
    return torch.from_numpy(np.stack(slide.read_tiles(0, slide.n_tiles)))


def _expected(model, store: str, sid: str, input_px: int, mean_std, recipe: str) -> np.ndarray:
    """Tile embeddings by hand, with the model card's preprocessing and recipe."""
    from pathdino.export.load import TileTransform

    x = TileTransform(input_px, *mean_std).batch(_tiles(store, sid))
    with torch.no_grad():
        tokens = model.forward_features(x)
    cls, patch = tokens[:, 0], tokens[:, model.num_prefix_tokens :].mean(1)
    return {"cls": cls, "cls+mean_patch": torch.cat([cls, patch], 1), "mean_patch": patch}[recipe].numpy()


def _opts(**kw):
    from pathdino.embed import EmbedOptions

    return EmbedOptions(**{"num_workers": 0, "progress": False, "batch_size": 8, "formats": ("h5",), **kw})


SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def test_uni_pytorch_bin_folder(stores, tmp_path):
    """UNI as MahmoodLab ships it: vit_large_patch16_224 config, pytorch_model.bin; CLS; 0.5 µm/px, 224 px."""
    from pathdino.embed import EmbeddingStore, embed_store
    from pathdino.export.load import read_encoder_config

    args = {**SMALL, "init_values": 1e-5, "dynamic_img_size": True}
    model = save_hub_folder(tmp_path / "UNI", "vit_large_patch16_224", args, dict(args), torch_bin=True)
    info = read_encoder_config(tmp_path / "UNI")
    assert info.name == "UNI" and info.recipe == "cls" and info.trained_mpps == (0.5,) and info.input_px == 224
    assert info.weights_file == "pytorch_model.bin" and info.third_party

    report = embed_store(stores[0.5], tmp_path / "UNI", tmp_path / "emb", _opts())
    assert report.embedded == ("s1", "s2") and not report.failed
    emb = EmbeddingStore(tmp_path / "emb")
    assert emb.encoder["known_encoder"] == "UNI" and emb.encoder["recipe"] == "cls"
    np.testing.assert_allclose(emb["s1"][0], _expected(model, stores[0.5], "s1", 224, IMAGENET, "cls"), atol=1e-4)

    # The h5 is what TRIDENT / CLAM read: features [N, D], coords [N, 2] with TRIDENT's attributes on coords.
    with h5py.File(h5_dir(tmp_path / "emb") / "s1.h5", "r") as h5:
        assert set(h5.keys()) >= {"features", "coords"} and h5["features"].shape == (20, 64)
        a = h5["coords"].attrs
        assert a["patch_size"] == TILE_PX and a["patch_size_level0"] == TILE_PX and a["name"] == "s1"
        assert a["target_magnification"] == 20 and a["level0_magnification"] == 20 and a["overlap"] == 0
        assert a["level0_width"] == 2220 and a["level0_height"] == 2967 and a["mpp"] == 0.5
        assert h5.attrs["encoder_name"] == "UNI" and h5.attrs["features"] == "cls"

    # A store at another µm/px than UNI's is refused unless forced.
    from pathdino.embed import EmbedError

    with pytest.raises(EmbedError, match=r"1 µm/px, the encoder's 0\.5 µm/px \(UNI, pathdino's encoder table\)"):
        embed_store(stores[1.0], tmp_path / "UNI", tmp_path / "emb-1", _opts())
    forced = embed_store(stores[1.0], tmp_path / "UNI", tmp_path / "emb-1", _opts(force=True))
    assert forced.forced == ("s1", "s2")


def test_virchow2_safetensors_folder_concatenates_cls_and_mean_patch(stores, tmp_path):
    """Virchow2: SwiGLU layers named as strings in config.json, 4 registers, CLS ++ mean patch token (registers
    excluded); trained at several µm/px, so 0.5 and 1.0 µm/px stores both pass. Patch tokens kept, float16."""
    import timm

    from pathdino.embed import EmbeddingStore, embed_store

    build = {
        **SMALL,
        "mlp_ratio": 4.0,
        "reg_tokens": 4,
        "init_values": 1e-5,
        "img_size": 224,
        "mlp_layer": timm.layers.SwiGLUPacked,
        "act_layer": torch.nn.SiLU,
        "global_pool": "",
        "dynamic_img_size": True,
    }
    config = {**build, "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
    folder = tmp_path / "virchow2"
    model = save_hub_folder(
        folder,
        "vit_huge_patch14_224",
        build,
        config,
        pretrained_cfg={
            "input_size": [3, 224, 224],
            "mean": list(IMAGENET[0]),
            "std": list(IMAGENET[1]),
            "hf_hub_id": "paige-ai/Virchow2",
        },
    )
    assert model.num_prefix_tokens == 5
    for mpp in (0.5, 1.0):
        out = tmp_path / f"emb-{mpp}"
        report = embed_store(stores[mpp], folder, out, _opts(patch_tokens=True, part_tiles=8))
        assert report.embedded == ("s1", "s2") and not report.forced
    emb = EmbeddingStore(tmp_path / "emb-0.5")
    want = _expected(model, stores[0.5], "s1", 224, IMAGENET, "cls+mean_patch")
    feats, _ = emb["s1"]
    assert feats.shape == (20, 128)
    np.testing.assert_allclose(feats, want, atol=1e-4)
    with h5py.File(h5_dir(tmp_path / "emb-0.5") / "s1.h5", "r") as h5:
        np.testing.assert_allclose(h5["features"][:], want, atol=1e-4)
        assert h5.attrs["features"] == "cls+mean_patch"
    tokens, _ = EmbeddingStore(tmp_path / "emb-0.5", feature="patch_tokens")["s1"]
    assert tokens.dtype == np.float16 and tokens.shape == (20, 256, 64)  # 16 x 16 patches, no CLS/registers
    np.testing.assert_allclose(tokens.astype(np.float32).mean(1), want[:, 64:], atol=2e-2)
    group = emb.root["slides/s1/patch_tokens"]
    assert group.chunks[0] < 20  # chunked by rows, not one block


def test_hoptimus_and_unknown_folders_and_user_table(stores, tmp_path, caplog):
    """H-optimus-0 gets its mean/std and 224 px from the table (config without pretrained_cfg); an unknown folder
    embeds with a warning; a user table entry (JSON) gives it a µm/px and a recipe."""
    from pathdino.embed import EmbedError, EmbeddingStore, embed_store
    from pathdino.export.load import read_encoder_config

    args = {**SMALL, "init_values": 1e-5, "img_size": 224, "dynamic_img_size": False, "mlp_ratio": 4.0}
    hopt = save_hub_folder(tmp_path / "H-optimus-0", "vit_giant_patch14_reg4_dinov2", args, dict(args))
    info = read_encoder_config(tmp_path / "H-optimus-0")
    assert (info.mean, info.std, info.input_px) == (*HOPTIMUS, 224)
    embed_store(stores[0.5], tmp_path / "H-optimus-0", tmp_path / "emb-h", _opts(slides=("s2",)))
    np.testing.assert_allclose(
        EmbeddingStore(tmp_path / "emb-h")["s2"][0], _expected(hopt, stores[0.5], "s2", 224, HOPTIMUS, "cls"), atol=1e-4
    )

    mine = tmp_path / "my-encoder"
    save_hub_folder(
        mine,
        "vit_small_patch16_224",
        {**SMALL, "img_size": 64},
        {**SMALL, "img_size": 64},
        pretrained_cfg={"input_size": [3, 64, 64], "mean": [0.5] * 3, "std": [0.5] * 3},
        seed=1,
    )
    with caplog.at_level(logging.WARNING):
        report = embed_store(stores[1.0], mine, tmp_path / "emb-u", _opts())
    assert report.embedded == ("s1", "s2") and "does not record the µm/px" in caplog.text

    table = tmp_path / "encoders.json"
    table.write_text(
        json.dumps([{"name": "Mine", "patterns": ["my-encoder"], "target_mpp": 0.5, "recipe": "mean_patch"}])
    )
    with pytest.raises(EmbedError, match=r"the encoder's 0\.5 µm/px \(Mine"):
        embed_store(stores[1.0], mine, tmp_path / "emb-t", _opts(encoder_table=str(table)))
    embed_store(stores[0.5], mine, tmp_path / "emb-t", _opts(encoder_table=str(table)))
    emb = EmbeddingStore(tmp_path / "emb-t")
    np.testing.assert_allclose(emb["s1"][0], EmbeddingStore(tmp_path / "emb-t", feature="mean_patch")["s1"][0])
    assert emb.encoder["recipe"] == "mean_patch" and emb.encoder["known_encoder"] == "Mine"


def test_folders_that_cannot_load_say_why(tmp_path):
    from pathdino.export.load import EncoderFormatError, load_encoder, read_encoder_config

    phikon = tmp_path / "phikon-v2"
    phikon.mkdir()
    (phikon / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 1024}))
    (phikon / "model.safetensors").write_bytes(b"")
    with pytest.raises(EncoderFormatError, match="transformers.*not timm"):
        read_encoder_config(phikon)
    other = tmp_path / "some-hf-model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (other / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(EncoderFormatError, match="no 'architecture'.*transformers config"):
        read_encoder_config(other)

    # Pickled objects are refused: weights_only=True.
    pickled = tmp_path / "pickled"
    save_hub_folder(
        pickled,
        "vit_small_patch16_224",
        {**SMALL, "img_size": 32},
        {**SMALL, "img_size": 32},
        pretrained_cfg={"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
        torch_bin=True,
    )
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled / "pytorch_model.bin")
    with pytest.raises(EncoderFormatError, match="weights_only=True"):
        load_encoder(pickled)
    # Weights that do not fit the config name the problem.
    wrong = tmp_path / "wrong"
    save_hub_folder(
        wrong,
        "vit_small_patch16_224",
        {**SMALL, "img_size": 32},
        {**SMALL, "depth": 3, "img_size": 32},
        pretrained_cfg={"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
    )
    with pytest.raises(EncoderFormatError, match=r"does not fit.*missing \['blocks\.2"):
        load_encoder(wrong)
    lacking = tmp_path / "nameless"
    save_hub_folder(lacking, "vit_small_patch16_224", {**SMALL, "img_size": 32}, {**SMALL, "img_size": 32})
    with pytest.raises(EncoderFormatError, match="not a known encoder.*--encoder-table"):
        read_encoder_config(lacking)


def test_table_matching_is_most_specific_first():
    from pathdino.export.known_encoders import KNOWN_ENCODERS, match_encoder

    def name(folder, hub=None):
        found = match_encoder(Path(folder), hub, KNOWN_ENCODERS)
        return found.name if found else None

    assert name("UNI2-h") == "UNI2-h" and name("uni") == "UNI" and name("models/UNI_weights") == "UNI"
    assert name("Virchow2") == "Virchow2" and name("virchow") == "Virchow" and name("unicorn") is None
    assert name("x", "bioptimus/H-optimus-1") == "H-optimus-1" and name("prov-gigapath") == "Prov-GigaPath"
    assert name("weights", "MahmoodLab/UNI") == "UNI"
