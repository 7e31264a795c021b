"""The anyres packing (anyres.py) and the variable-length row assembly (sequence.concat_rows): small, exact checks."""
import pytest
import torch

from vladva_openclip.anyres import AnyresGeometry, pack, parse_resize_mode, resize_mode_string, unpack
from vladva_openclip.sequence import assemble, concat_rows

GEOMETRY = AnyresGeometry(tile=48, patch=16, pinpoints=((48, 96), (96, 48), (96, 96), (144, 48), (48, 144)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_round_trip_survives_the_cast(dtype):
    gen = torch.Generator().manual_seed(0)
    sizes = [(1, 1), (65535, 3), (480, 640), (7, 12345)]
    views = [torch.randn(n, 3, 48, 48, generator=gen) for n in (2, 5, 3, 1)]
    batch = torch.stack([pack(v, h, w, GEOMETRY) for v, (h, w) in zip(views, sizes)]).to(dtype)
    assert batch.shape == (4, 3, *GEOMETRY.canvas) == (4, 3, 241, 48)
    got, got_sizes = unpack(batch, GEOMETRY)
    assert got_sizes.tolist() == [list(s) for s in sizes]
    for i, v in enumerate(views):
        assert torch.equal(got[i, : v.shape[0]], v.to(dtype))
        assert not got[i, v.shape[0]:].any()


def test_unpack_refuses_tensors_that_were_not_packed():
    with pytest.raises(ValueError, match="preprocess transform"):
        unpack(torch.zeros(1, 3, *GEOMETRY.canvas), GEOMETRY)
    with pytest.raises(ValueError, match="preprocess transform"):
        unpack(torch.rand(2, 3, *GEOMETRY.canvas), GEOMETRY)
    with pytest.raises(ValueError, match="outside"):
        pack(torch.zeros(1, 3, 48, 48), 0, 5, GEOMETRY)
    with pytest.raises(ValueError, match="views"):
        pack(torch.zeros(6, 3, 48, 48), 5, 5, GEOMETRY)


def test_resize_mode_string_round_trip_and_other_modes():
    assert parse_resize_mode(resize_mode_string(GEOMETRY)) == GEOMETRY
    full = AnyresGeometry(336, 14, ((336, 672),), full=True)
    assert parse_resize_mode(resize_mode_string(full)) == full
    assert parse_resize_mode("shortest") is None and parse_resize_mode(None) is None
    with pytest.raises(ValueError, match="malformed"):
        parse_resize_mode("anyres:336:x")
    with pytest.raises(ValueError, match="at least 48"):
        AnyresGeometry(8, 4, ((8, 16),))
    with pytest.raises(ValueError, match="multiples"):
        AnyresGeometry(336, 14, ((336, 600),))


def test_open_clip_transforms_other_than_anyres_are_untouched():
    import open_clip
    from open_clip.transform import PreprocessCfg

    import vladva_openclip  # noqa: F401
    from vladva_openclip.anyres import AnyresTransform

    plain = open_clip.factory.image_transform_v2(PreprocessCfg(size=32), is_train=False)
    assert not isinstance(plain, AnyresTransform) and plain.__class__.__module__.startswith("torchvision")
    anyres = open_clip.factory.image_transform_v2(PreprocessCfg(size=GEOMETRY.canvas,
                                                                resize_mode=resize_mode_string(GEOMETRY)), False)
    assert isinstance(anyres, AnyresTransform) and anyres.geometry == GEOMETRY


def _reference_concat(parts):
    b = max(max(v.shape[0], n.shape[0]) for v, n in parts)
    rows = [torch.cat([v.expand(b, *v.shape[1:])[i, : int(n.expand(b)[i])] for v, n in parts]) for i in range(b)]
    width = max(r.shape[0] for r in rows)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, r in enumerate(rows):
        mask[i, : r.shape[0]] = 1
    return rows, mask


def test_concat_rows_equals_a_per_row_loop_and_assemble():
    gen = torch.Generator().manual_seed(1)
    parts = [(torch.randn(3, 5, 2, generator=gen), torch.tensor([5, 0, 2])),
             (torch.randn(1, 4, 2, generator=gen), torch.tensor([4])),
             (torch.randn(3, 6, 2, generator=gen), torch.tensor([1, 6, 0])),
             (torch.randn(1, 1, 2, generator=gen), torch.tensor([1]))]
    seq, mask = concat_rows(parts)
    rows, ref_mask = _reference_concat(parts)
    assert torch.equal(mask, ref_mask)
    for i, r in enumerate(rows):
        assert torch.equal(seq[i, : r.shape[0]], r)
    # with fixed-length outer parts it is assemble
    prefix, body, suffix = parts[1][0], parts[2][0], parts[3][0]
    lengths = parts[2][1]
    a_seq, a_mask = assemble(prefix, body, lengths, suffix)
    c_seq, c_mask = concat_rows([(prefix, torch.tensor([4])), (body, lengths), (suffix, torch.tensor([1]))])
    assert torch.equal(a_mask, c_mask) and torch.equal(a_seq * a_mask[..., None], c_seq * c_mask[..., None])
