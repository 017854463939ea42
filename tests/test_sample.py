import numpy as np
import pytest
import torch

from vq4dit.sample import generate_shard, guided_output, image_generator, labels_for, space_timesteps, to_uint8


def test_space_timesteps_follows_the_published_rule():
    assert space_timesteps(1000, [10]) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    fifty = space_timesteps(1000, [50])
    assert len(fifty) == 50 and fifty[0] == 0 and fifty[-1] == 999
    assert fifty[:4] == [0, 20, 41, 61]  # 999/49 = 20.39: 20.39 -> 20, 40.78 -> 41, 61.16 -> 61
    assert space_timesteps(1000, [250])[:3] == [0, 4, 8]  # stride 4.012
    assert space_timesteps(1000, [1000]) == list(range(1000))
    assert space_timesteps(10, [3, 2]) == [0, 2, 4, 5, 9]  # two sections of 5 steps
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, [20])


def test_image_generator_depends_on_seed_and_index_only():
    a = torch.randn(4, generator=image_generator(0, 7))
    assert torch.equal(a, torch.randn(4, generator=image_generator(0, 7)))
    assert not torch.equal(a, torch.randn(4, generator=image_generator(0, 8)))
    assert not torch.equal(a, torch.randn(4, generator=image_generator(1, 7)))
    labels, _ = labels_for(0, 0, 200, 10)
    assert set(labels.tolist()) == set(range(10))


def test_guidance_touches_only_the_guided_noise_channels():
    cond = torch.ones(2, 8, 4, 4)
    uncond = torch.zeros(2, 8, 4, 4)
    out = guided_output(torch.cat([cond, uncond]), channels=4, cfg_scale=1.5, cfg_channels=3)
    assert torch.all(out[:, :3] == 1.5)  # uncond + 1.5 * (cond - uncond)
    assert torch.all(out[:, 3:] == 1.0)  # 4th noise channel and the learned variance: conditional, unguided
    all_channels = guided_output(torch.cat([cond, uncond]), channels=4, cfg_scale=1.5, cfg_channels=None)
    assert torch.all(all_channels[:, :4] == 1.5) and torch.all(all_channels[:, 4:] == 1.0)


def test_uint8_conversion_matches_dit():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    assert to_uint8(x).ravel().tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_shards_do_not_depend_on_shard_or_batch_size(tiny_dit, cfg_scale):
    whole, labels = generate_shard(tiny_dit, None, 3, 0, 6, 6, steps=4, cfg_scale=cfg_scale, cfg_channels=None)
    first, _ = generate_shard(tiny_dit, None, 3, 0, 2, 1, steps=4, cfg_scale=cfg_scale, cfg_channels=None)
    rest, rest_labels = generate_shard(tiny_dit, None, 3, 2, 4, 3, steps=4, cfg_scale=cfg_scale, cfg_channels=None)
    assert whole.shape == (6, 8, 8, 1) and whole.dtype == np.uint8
    np.testing.assert_array_equal(whole, np.concatenate([first, rest]))
    np.testing.assert_array_equal(labels[2:], rest_labels)


def test_guidance_changes_samples(tiny_dit):
    plain, _ = generate_shard(tiny_dit, None, 0, 0, 4, 4, steps=3, cfg_scale=1.0, cfg_channels=None)
    guided, _ = generate_shard(tiny_dit, None, 0, 0, 4, 4, steps=3, cfg_scale=4.0, cfg_channels=None)
    assert not np.array_equal(plain, guided)


def test_bf16_autocast_stays_close_and_precision_is_checked(tiny_dit):
    fp32, _ = generate_shard(tiny_dit, None, 0, 0, 2, 2, steps=3, cfg_scale=1.5, cfg_channels=None)
    bf16, _ = generate_shard(tiny_dit, None, 0, 0, 2, 2, steps=3, cfg_scale=1.5, cfg_channels=None,
                             precision="bf16")
    assert np.abs(fp32.astype(int) - bf16.astype(int)).mean() < 8
    with pytest.raises(ValueError, match="fp16"):
        generate_shard(tiny_dit, None, 0, 0, 2, 2, steps=3, cfg_scale=1.5, cfg_channels=None, precision="fp16")
