import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from vq4dit import features as features_module
from vq4dit.features import DigitsFeatureNet, FeatureModel, ImageStream, extract, save_random_weights


@pytest.fixture
def digits_weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "digits-cnn.pt"
    torch.save(DigitsFeatureNet().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random-weight Inception saved like torch-fidelity's release file."""
    torch.manual_seed(0)
    return save_random_weights("inception-v3-compat", tmp_path_factory.mktemp("inception") / "random.pth")


def test_digits_features_have_the_three_sets(digits_weights):
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    features = extract(images, FeatureModel("digits-cnn", str(digits_weights)), batch_size=4, device="cpu")
    assert features["pool"].shape == (10, 128) and features["spatial"].shape == (10, 7 * 4 * 4)
    assert features["logits"].shape == (10, 10)
    again = extract(images[3:5], FeatureModel("digits-cnn", str(digits_weights)), batch_size=1, device="cpu")
    np.testing.assert_allclose(again["pool"], features["pool"][3:5], rtol=1e-5, atol=1e-6)


def test_inception_gives_pool_spatial_and_unbiased_logits(inception_weights):
    model = FeatureModel("inception-v3-compat", str(inception_weights))
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    features = extract(images, model, batch_size=2, device="cpu")
    assert features["pool"].shape == (2, 2048)
    assert features["spatial"].shape == (2, 7 * 17 * 17)  # ADM's mixed_6/conv, first 7 channels
    assert features["logits"].shape == (2, 1008)
    with torch.no_grad():  # the hooked layer is Mixed_6d's 1x1 branch, flattened channels-last
        net = model.net
        seen = {}
        net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
        net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    expected = seen["x"][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
    np.testing.assert_allclose(features["spatial"], expected, rtol=1e-5, atol=1e-6)


def test_missing_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        FeatureModel("inception-v3-compat", str(tmp_path / "nowhere.pth"))


def test_features_command_keeps_reference_statistics(digits_weights, tmp_path):
    images = np.zeros((6, 8, 8, 1), np.uint8)
    reference = tmp_path / "ref.npz"
    np.savez(reference, arr_0=images, mu=np.ones(128), sigma=np.eye(128))
    out = tmp_path / "features.npz"
    subprocess.run([sys.executable, "-m", "vq4dit", "features", "--inputs", str(reference), "--extractor",
                    "digits-cnn", "--weights", str(digits_weights), "--device", "cpu", "--output", str(out)],
                   check=True, capture_output=True)
    with np.load(out) as data:
        assert {"pool", "spatial", "logits", "mu", "sigma"} <= set(data.files)
        np.testing.assert_array_equal(data["mu"], np.ones(128))


def test_features_command_rejects_float_images(digits_weights, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((2, 8, 8, 1), np.float32))
    result = subprocess.run([sys.executable, "-m", "vq4dit", "features", "--inputs", str(bad), "--extractor",
                             "digits-cnn", "--weights", str(digits_weights), "--output", str(tmp_path / "o.npz")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "bad.npz" in result.stderr and "uint8" in result.stderr


@pytest.fixture
def digit_shards(tmp_path):
    """Shards of 7, 5 and 9 digit-sized images (stored and compressed .npz), and all of them in one array."""
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8) for n in (7, 5, 9)]
    paths = [tmp_path / f"shard{i}.npz" for i in range(3)]
    np.savez(paths[0], arr_0=arrays[0])
    np.savez_compressed(paths[1], arr_0=arrays[1])
    np.savez(paths[2], arr_0=arrays[2], meta=np.array("{}"))
    return [str(p) for p in paths], np.concatenate(arrays)


@pytest.mark.parametrize("batch_size", [4, 6, 21, 50])
def test_streamed_shards_give_the_features_of_the_whole_array(digits_weights, digit_shards, batch_size, monkeypatch):
    """Batches that straddle shards (4, 6 divide no shard size) and chunks smaller than a shard (3 images)."""
    paths, images = digit_shards
    monkeypatch.setattr(features_module, "CHUNK_BYTES", 3 * 8 * 8)
    model = FeatureModel("digits-cnn", str(digits_weights))
    streamed = extract(ImageStream(paths), model, batch_size, "cpu")
    whole = {key: [] for key in ("pool", "spatial", "logits")}  # the whole-array path: slices of one array
    with torch.no_grad():
        for begin in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[begin:begin + batch_size]).permute(0, 3, 1, 2).contiguous()
            for key, value in zip(whole, model(batch)):
                whole[key].append(value.numpy())
    for key in whole:
        np.testing.assert_array_equal(streamed[key], np.concatenate(whole[key]))


def test_image_stream_hands_out_consecutive_images_and_names_bad_files(digit_shards, tmp_path, monkeypatch):
    paths, images = digit_shards
    monkeypatch.setattr(features_module, "CHUNK_BYTES", 2 * 8 * 8)
    stream = ImageStream(paths)
    assert len(stream) == 21
    first = stream.take(8)
    stream.put_back(first[5:])
    np.testing.assert_array_equal(np.concatenate([first[:5], stream.take(10), stream.take(100)]), images)
    whole = tmp_path / "whole.npz"
    np.savez(whole, arr_0=images)
    truncated = tmp_path / "truncated.npz"
    with zipfile.ZipFile(whole) as source, zipfile.ZipFile(truncated, "w") as archive:  # header says 21 images
        archive.writestr("arr_0.npy", source.read("arr_0.npy")[:-64])
    with pytest.raises(ValueError, match="truncated.npz: arr_0 ends before its 21 images"):
        ImageStream([truncated]).take(21)
    missing = tmp_path / "no_images.npz"
    np.savez(missing, pool=np.zeros(3))
    with pytest.raises(ValueError, match=r"no_images.npz: missing key\(s\) \['arr_0'\]"):
        ImageStream([missing])


def test_out_of_memory_halves_the_batch_and_gives_the_features_of_the_smaller_batch(digits_weights, digit_shards,
                                                                                    monkeypatch, caplog):
    """Device memory simulated on the CPU: the feature network raises torch.OutOfMemoryError above 5 images."""
    paths, _ = digit_shards
    model = FeatureModel("digits-cnn", str(digits_weights))
    at_5 = extract(ImageStream(paths), model, 5, "cpu")
    forward = FeatureModel.forward

    def small_device(self, images, limit=5):
        if len(images) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, images)

    monkeypatch.setattr(FeatureModel, "forward", small_device)
    with caplog.at_level("WARNING"):
        halved = extract(ImageStream(paths), model, 20, "cpu")  # 20 -> 10 -> 5 at the first batch
    assert [r.message for r in caplog.records] == ["out of cpu memory at batch size 20: going on at 10",
                                                   "out of cpu memory at batch size 10: going on at 5"]
    for key in at_5:
        np.testing.assert_array_equal(halved[key], at_5[key])
    monkeypatch.setattr(FeatureModel, "forward", lambda self, images: small_device(self, images, limit=0))
    with pytest.raises(torch.OutOfMemoryError):  # not even one image fits: the error, not a loop
        extract(ImageStream(paths), model, 2, "cpu")


def test_the_cost_model_prices_the_chunk_the_stream_reads():
    from vq4dit import cost  # cost does not import features (torch): its copy of the chunk size must follow

    assert cost.READ_CHUNK_BYTES == features_module.CHUNK_BYTES
