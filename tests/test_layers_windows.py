"""Window helpers: padding, partition order, reverse, effective shift and the shifted mask."""

import pytest
import torch

from kpt.layers.windows import (
    effective_shift,
    pad_to_windows,
    roll_to_windows,
    shifted_window_mask,
    window_partition,
    window_reverse,
)


def test_pad_to_windows_pads_bottom_right_with_zeros():
    x = torch.ones(2, 7, 5, 3)
    padded, pads = pad_to_windows(x, (3, 2))
    assert pads == (2, 1) and padded.shape == (2, 9, 6, 3)
    assert padded[:, :7, :5].eq(1).all()
    assert padded[:, 7:].eq(0).all() and padded[:, :, 5:].eq(0).all()
    same, none = pad_to_windows(torch.ones(1, 6, 4, 1), (3, 2))
    assert none == (0, 0) and same.shape == (1, 6, 4, 1)


def test_partition_is_batch_major_row_major_and_reversible():
    b, hp, wp, wh, ww = 2, 6, 4, 3, 2
    token = torch.arange(b * hp * wp, dtype=torch.float32).view(b, hp, wp, 1)
    windows = window_partition(token, (wh, ww))
    assert windows.shape == (b * 4, wh * ww, 1)
    # sample 1, window (row 1, col 0) = index 1*4 + 1*2 + 0; its first token is (3, 0)
    assert windows[1 * 4 + 2, 0, 0] == token[1, 3, 0, 0]
    assert windows[1 * 4 + 2, ww, 0] == token[1, 4, 0, 0]  # second row of the window
    assert torch.equal(window_reverse(windows, (wh, ww), hp, wp), token)
    with pytest.raises(ValueError, match="not a multiple"):
        window_partition(torch.zeros(1, 5, 4, 1), (3, 2))


def test_effective_shift_drops_shift_where_the_window_covers_the_map():
    assert effective_shift(40, 40, 5, 2) == (2, 2)
    assert effective_shift(5, 5, 5, 2) == (0, 0)
    assert effective_shift(15, 10, (3, 10), (1, 2)) == (1, 0)


def torchvision_style_mask(hp, wp, wh, ww, sh, sw):
    """The official slice-and-count construction (independent reference)."""
    img = torch.zeros(hp, wp)
    count = 0
    for h in ((0, -wh), (-wh, -sh), (-sh, None)):
        for w in ((0, -ww), (-ww, -sw), (-sw, None)):
            img[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    lab = img.view(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = lab[:, None, :] - lab[:, :, None]
    return diff.masked_fill(diff != 0, -100.0)


@pytest.mark.parametrize("hp,wp,win,shift", [(40, 40, (5, 5), (2, 2)), (20, 20, (5, 5), (2, 2)),
                                             (15, 10, (3, 5), (1, 2)), (12, 8, (4, 4), (2, 1))])
def test_shifted_window_mask_matches_official_construction(hp, wp, win, shift):
    mask = shifted_window_mask(hp, wp, win, shift)
    ref = torchvision_style_mask(hp, wp, *win, *shift)
    assert mask.shape == (hp // win[0] * (wp // win[1]), win[0] * win[1], win[0] * win[1])
    assert torch.equal(mask, ref)
    assert mask[0].eq(0).all()  # the top-left window is never wrapped


def test_no_mask_without_effective_shift_and_roll_helper():
    assert shifted_window_mask(5, 5, 5, 2) is None
    assert shifted_window_mask(10, 10, 5, 0) is None
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).view(2, 5, 5, 1)
    windows, shift = roll_to_windows(x, 3, 1)  # pads 5 -> 6 then rolls by -1
    assert shift == (1, 1) and windows.shape == (2 * 4, 9, 1)
    assert windows[0, 0, 0] == x[0, 1, 1, 0]
    assert windows[3, 8, 0] == x[0, 0, 0, 0]  # wrapped around to the last window
