"""Image loading and preprocessing: parity with transformers, every PIL mode to RGB, safety limits."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from minimind_v.data.formats import BadSample
from minimind_v.data.images import ImageFolder, ImagePreprocessor, load_image, resolve_image_path, to_rgb
from minimind_v.errors import UserError
from minimind_v.modeldir import write_preprocessor_config


def _noise(width, height, mode="RGB", seed=0):
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1, "LA": 2}[mode]
    data = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(data.squeeze(-1) if channels == 1 else data, mode=mode)


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (50, 40), (64, 64)])
@pytest.mark.parametrize("edge", [224, 64])
def test_matches_transformers_clip_processor(size, edge):
    reference = CLIPImageProcessorPil(size={"shortest_edge": edge}, crop_size={"height": edge, "width": edge})
    ours = ImagePreprocessor.from_config(reference.to_dict())
    image = _noise(*size)
    expected = reference(image, return_tensors="pt")["pixel_values"][0]
    got = ours(image)
    assert got.shape == expected.shape == (3, edge, edge) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_config_round_trip_and_fixed_size(tmp_path):
    write_preprocessor_config(tmp_path, ImagePreprocessor.for_image_size(64).to_config())  # modeldir's one writer
    assert ImagePreprocessor.from_pretrained(tmp_path) == ImagePreprocessor.for_image_size(64)
    siglip = ImagePreprocessor.from_config({"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3,
                                            "image_std": [0.5] * 3, "resample": 2})
    assert siglip(_noise(90, 50)).shape == (3, 32, 32) and siglip.shortest_edge is None
    with pytest.raises(UserError, match="no preprocessor_config.json"):
        ImagePreprocessor.from_pretrained(tmp_path / "..")
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        ImagePreprocessor.from_pretrained("nobody/no-such-tower")


def test_modes_convert_to_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: paper shows through
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    assert to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert to_rgb(palette).getpixel((0, 0)) == (10, 20, 30)
    palette.info["transparency"] = 1
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    sixteen = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    sixteen_half = Image.fromarray(np.full((2, 2), 32896, dtype=np.uint16))
    assert sixteen.mode.startswith("I")
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(sixteen_half).getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped to white


def test_sixteen_bit_png_and_exif_orientation(tmp_path):
    png = tmp_path / "deep.png"
    Image.fromarray(np.full((3, 5), 257 * 40, dtype=np.uint16)).save(png)
    assert load_image(png).getpixel((0, 0)) == (40, 40, 40)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: "rotate 90 clockwise to view"
    _noise(40, 20).save(rotated, exif=exif.tobytes())
    assert load_image(rotated).size == (20, 40)


def test_broken_images_are_bad_samples(tmp_path):
    good = io.BytesIO()
    _noise(30, 30).save(good, format="PNG")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(good.getvalue()[:len(good.getvalue()) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ("empty.png", "truncated.png", "text.jpg"):
        with pytest.raises(BadSample) as err:
            load_image(tmp_path / name)
        assert err.value.reason == "bad_image" and name in str(err.value)
    with pytest.raises(BadSample, match="missing_image"):
        load_image(tmp_path / "gone.png")
    assert load_image(good.getvalue()).size == (30, 30)
    with pytest.raises(BadSample, match="image_too_large"):
        load_image(good.getvalue(), max_pixels=899)


def test_paths_stay_inside_the_image_folder(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "secret.png"
    (root / "sub").mkdir(parents=True)
    _noise(2, 2).save(root / "sub" / "ok.png")
    _noise(2, 2).save(outside)
    (root / "link.png").symlink_to(outside)
    assert resolve_image_path(root, "sub/ok.png") == (root / "sub" / "ok.png").resolve()
    assert resolve_image_path(root, str(root / "sub" / "ok.png")).name == "ok.png"  # absolute, but inside
    for name in ("../secret.png", str(outside), "link.png", "sub/../../secret.png"):
        with pytest.raises(BadSample, match="image_path"):
            resolve_image_path(root, name)
    with pytest.raises(BadSample, match="missing_image"):
        resolve_image_path(root, "sub/none.png")


def test_image_folder_resolves_links_inside_and_refuses_the_way_out(tmp_path):
    root, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    for path in (root / "a.png", root / "sub" / "b.png", elsewhere / "c.png"):
        _noise(2, 2).save(path)
    (root / "out").symlink_to(elsewhere)  # a directory link leading out
    (root / "sub" / "alias.png").symlink_to(root / "a.png")  # a file link staying inside
    (root / "sub" / "gone.png").symlink_to(root / "none.png")  # a dangling link
    folder = ImageFolder(root)
    assert folder.resolve("a.png") == (root / "a.png").resolve()
    assert folder.resolve("sub/b.png") == (root / "sub" / "b.png").resolve()
    assert folder.resolve("sub/alias.png") == (root / "a.png").resolve()
    assert folder.resolve(str(root / "sub" / "b.png")) == (root / "sub" / "b.png").resolve()
    for name, reason in (("out/c.png", "image_path"), ("sub/../../elsewhere/c.png", "image_path"),
                         ("sub/gone.png", "missing_image"), ("sub", "missing_image"), ("nodir/x.png", "missing_image"),
                         ("sub/..", "missing_image")):
        with pytest.raises(BadSample, match=reason):
            folder.resolve(name)
        with pytest.raises(BadSample, match=reason):  # the up-front pass's quick check agrees
            ImageFolder(root).check(name)
    for name in ("a.png", "sub/b.png", "sub/alias.png", str(root / "sub" / "b.png")):
        folder.check(name)


def test_pixel_values_batch_in_order():
    prep = ImagePreprocessor.for_image_size(16)
    images = [_noise(20, 30, seed=1), _noise(30, 20, "RGBA", seed=2)]
    batch = prep.pixel_values(images)
    assert batch.shape == (2, 3, 16, 16)
    torch.testing.assert_close(batch[1], prep(to_rgb(images[1])))
    assert json.loads(json.dumps(prep.to_config()))["crop_size"] == {"height": 16, "width": 16}


def test_processor_config_of_transformers_5_is_read_like_preprocessor_config(tmp_path, tokenizer_dir):
    """transformers 5 processors save processor_config.json (image processor inside), no preprocessor_config.json."""
    from transformers import AutoTokenizer, CLIPProcessor

    reference = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 36},
                                      image_mean=[0.5, 0.4, 0.3])
    CLIPProcessor(image_processor=reference, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir)).save_pretrained(
        tmp_path / "new")
    assert (tmp_path / "new" / "processor_config.json").is_file()
    assert not (tmp_path / "new" / "preprocessor_config.json").exists()
    reference.save_pretrained(tmp_path / "old")
    new, old = ImagePreprocessor.from_pretrained(tmp_path / "new"), ImagePreprocessor.from_pretrained(tmp_path / "old")
    assert new == old == ImagePreprocessor.from_config(reference.to_dict())
    assert (new.shortest_edge, new.height, new.mean) == (40, 36, (0.5, 0.4, 0.3))
    image = _noise(70, 50)
    torch.testing.assert_close(new(image), reference(image, return_tensors="pt")["pixel_values"][0], atol=1e-5,
                               rtol=0)
