import subprocess
import sys

import numpy as np
import pytest
import torch

from vq4dit.features import DigitsFeatureNet, FeatureModel, extract, save_random_weights


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
