"""Per-family image preprocessing: the resize modes a VladVA model offers, and their defaults."""
import pytest
import torch
from PIL import Image

import vladva_openclip  # noqa: F401  (registers the VladVA names with open_clip)


def _normalised(model, rgb):
    mean, std = torch.tensor(model.visual.image_mean), torch.tensor(model.visual.image_std)
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - mean) / std


@pytest.mark.parametrize("name, default", [("vladva-tiny-qwen2vl", "squash"), ("vladva-qwen2vl2b", "squash"),
                                           ("vladva-tiny-llava", "shortest"), ("vladva-llava7b", "shortest")])
def test_registered_resize_modes(name, default):
    from vladva_openclip.config import VladVAConfig
    from vladva_openclip.registry import get_vladva_config
    from vladva_openclip.transforms import preprocess_cfg

    cfg = VladVAConfig.from_dict(get_vladva_config(name)["vladva_cfg"])
    assert cfg.resize_mode == default and preprocess_cfg(cfg)["resize_mode"] == default


def test_the_three_modes_on_a_wide_image():
    """A 2:1 image, white with a black right half: squash keeps both halves, shortest crops to the middle,
    longest keeps both halves at the aspect ratio and pads above and below (black, as open_clip pads)."""
    import open_clip

    image = Image.new("RGB", (224, 112), (255, 255, 255))
    image.paste((0, 0, 0), (112, 0, 224, 112))
    out = {}
    for mode in ("squash", "shortest", "longest"):
        model, _, preprocess = open_clip.create_model_and_transforms("vladva-tiny-qwen2vl", resize_mode=mode)
        assert model.visual.preprocess_cfg["resize_mode"] == mode
        out[mode] = preprocess(image)
    s = out["squash"].shape[-1]
    white, black = _normalised(model, (255, 255, 255)), _normalised(model, (0, 0, 0))

    def close(px, ref):
        return torch.allclose(px, ref, atol=0.05)

    assert close(out["squash"][:, s // 2, 2], white) and close(out["squash"][:, s // 2, s - 3], black)
    assert close(out["squash"][:, 0, 2], white)  # no padding
    # shortest: the centre square of the 2:1 image, i.e. white left of the middle, black right of it
    assert close(out["shortest"][:, s // 2, s // 4], white) and close(out["shortest"][:, s // 2, 3 * s // 4], black)
    assert close(out["shortest"][:, 0, 2], white)
    # longest: the whole image in the middle half of the rows, padding above and below
    assert close(out["longest"][:, s // 2, 2], white) and close(out["longest"][:, s // 2, s - 3], black)
    assert close(out["longest"][:, 2, 2], black) and close(out["longest"][:, s - 3, 2], black)


def test_unknown_resize_mode_is_a_clear_error():
    import open_clip

    with pytest.raises(ValueError, match="resize_mode must be one of"):
        open_clip.create_model("vladva-tiny-qwen2vl", resize_mode="crop")
