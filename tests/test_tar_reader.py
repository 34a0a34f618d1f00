"""The loader's own tar reader and torchvision decoding (resnet_dist.data) against what they replace.

The reader must yield exactly what webdataset's tar iterator (Python's tarfile) yields, on our shards
and on any standard tar; decoding must give PIL's convert("L"/"RGB") pixels (docs/performance.md).
"""

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds
from helpers import shard
from PIL import Image

from resnet_dist.data import Piece, collate, decode_image, png_is_sound
from resnet_dist.errors import DataError
from resnet_dist.tars import IMAGE_EXTS, tar_members, tar_samples


def webdataset_samples(data: bytes, url: str) -> list[dict]:
    files = wds.tariterators.tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])
    return list(wds.tariterators.group_by_keys(files))


class FakeShard:
    def __init__(self, file: str):
        self.file = file


def ours(data: bytes, skip: int = 0, take: int = 10**9, url: str = "x.tar") -> list[dict]:
    return list(tar_samples(data, Piece(FakeShard(url), skip, take)))


@pytest.fixture(scope="module", params=["png", "jpeg"])
def packed(request, tmp_path_factory) -> list[bytes]:
    out = tmp_path_factory.mktemp("shards") / request.param
    result = shard(
        "synthetic",
        "--out",
        str(out),
        "--num-classes",
        "3",
        "--image-size",
        "12",
        "--num-samples",
        "90",
        "--channels",
        "3",
        "--shard-size",
        "40",
        "--format",
        request.param,
        "--seed",
        "2",
    )
    assert result.returncode == 0, result.stderr
    return [p.read_bytes() for p in sorted(out.glob("*.tar"))]


def test_our_shards_read_as_webdataset_reads_them_at_every_skip_and_take(packed):
    for data in packed:
        expected = webdataset_samples(data, "x.tar")
        assert ours(data) == expected and len(expected) > 5
        for skip, take in [(0, 1), (1, 3), (len(expected) - 2, 5), (len(expected), 1)]:
            assert ours(data, skip, take) == expected[skip : skip + take]


def tar_of(fmt: int, members: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


LONG = "d/" + "deep_folder_" * 12 + "/"  # > 100 characters: GNU long names, pax paths, ustar prefixes
MEMBERS = [
    ("a", None),
    ("a/k1.png", b"\x89PNG one"),
    ("a/k1.cls", b"3"),
    ("a/k1.coarse.cls", b"1"),
    (LONG, None),
    (LONG + "k2.jpg", b"j" * 513),
    (LONG + "k2.cls", b"4"),
    ("k3.txt", b""),
    ("k3.CLS", b"5"),
    ("noext", b"skipped by webdataset"),
    ("__meta__", b"m"),
    ("é/k4.png", b"x" * 1024),
    ("é/k4.cls", b"0"),
]


@pytest.mark.parametrize(
    "fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT], ids=["gnu", "pax", "ustar"]
)
def test_any_standard_tar_reads_as_tarfile_and_webdataset_read_it(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if not m[0].startswith("é")]
    data = tar_of(fmt, members)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        files = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert [(name, data[start : start + size]) for name, start, size in tar_members(data)] == files
    # webdataset's samples that hold an image: k3 (txt + cls only) is not a sample, the count index.json records
    expected = [s for s in webdataset_samples(data, "x.tar") if any(ext.lower() in IMAGE_EXTS for ext in s)]
    assert [s["__key__"] for s in ours(data)] == [s["__key__"] for s in expected] and "k3" not in str(expected)
    assert ours(data) == expected and len(expected) == len({n.rsplit(".")[0] for n, p in members if p is not None}) - 3
    assert ours(data, 1, 2) == expected[1:3]


def test_a_pax_size_and_path_override_the_header():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k.png")
        info.size, info.pax_headers = 700, {"path": "renamed.png", "comment": "x" * 300}
        tar.addfile(info, io.BytesIO(b"p" * 700))
    data = buf.getvalue()
    assert [(n, size) for n, _, size in tar_members(data)] == [("renamed.png", 700)]
    assert ours(data) == webdataset_samples(data, "x.tar")


def test_a_pax_record_of_length_zero_raises_instead_of_looping_forever():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k.png")
        info.size, info.pax_headers = 3, {"comment": "x" * 20}
        tar.addfile(info, io.BytesIO(b"abc"))
    data = bytearray(buf.getvalue())
    record = data.index(b" comment=")
    data[record - 2 : record] = b"00"  # the record's length field ("30") in the pax payload, outside any checksum
    with pytest.raises(ValueError, match="pax record length 0"):
        list(tar_members(bytes(data)))


def test_a_damaged_header_or_a_cut_member_raises_where_tarfile_would_stop():
    data = tar_of(tarfile.GNU_FORMAT, MEMBERS)
    damaged = bytearray(data)
    second = list(tar_members(data))[1][1] - 512
    damaged[second + 10] ^= 0x20  # a byte of the second file's header name
    with pytest.raises(ValueError, match="checksum"):
        ours(bytes(damaged))
    with pytest.raises(ValueError, match="cut short"):
        ours(data[: next(start for name, start, _ in tar_members(data) if name.endswith("k2.jpg")) + 100])
    assert list(tar_members(b"\0" * 1024)) == []


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def pil_pixels(data: bytes, channels: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        array = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    return array[:, :, None] if array.ndim == 2 else array


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 256, (19, 23, 3), dtype=np.uint8))
PNGS = {
    "L": RGB.convert("L"),
    "RGB": RGB,
    "RGBA": RGB.convert("RGBA"),
    "LA": RGB.convert("LA"),
    "P": RGB.convert("P", palette=Image.ADAPTIVE, colors=40),
    "1": RGB.convert("1"),
    "I;16": Image.fromarray(np.arange(19 * 23, dtype=np.uint16).reshape(19, 23) * 100),
}


@pytest.mark.parametrize("mode", list(PNGS) + ["P+tRNS", "interlaced"])
@pytest.mark.parametrize("channels", [1, 3])
def test_png_decodes_to_pils_pixels_exactly(mode, channels):
    if mode == "P+tRNS":
        data = encoded(PNGS["P"], "PNG", transparency=3)
    elif mode == "interlaced":
        data = encoded(RGB, "PNG")  # PIL cannot write Adam7; the check on byte 28 sends it to PIL anyway
    else:
        data = encoded(PNGS[mode], "PNG")
    out = decode_image(data, channels, (19, 23), "x")
    assert out.dtype == np.uint8 and np.array_equal(out, pil_pixels(data, channels))


JPEG_TOLERANCE = 0  # measured: torchvision's libjpeg-turbo and Pillow's give the same pixels here


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
@pytest.mark.parametrize("subsampling", [0, 2])
@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_decodes_to_pils_pixels_within_the_documented_tolerance(mode, subsampling, channels):
    data = encoded(RGB.convert(mode), "JPEG", quality=90, subsampling=subsampling)
    out = decode_image(data, channels, (19, 23), "x")
    assert np.abs(out.astype(int) - pil_pixels(data, channels)).max() <= JPEG_TOLERANCE


def flipped(data: bytes, start: int, stop: int) -> bytes:
    out = bytearray(data)
    out[start:stop] = bytes(b ^ 0x5A for b in out[start:stop])
    return bytes(out)


def jpeg_segment(data: bytes, marker: int) -> tuple[int, int]:
    """(start, end) of the payload of the first JPEG segment with this marker (after its length field)."""
    at = data.index(bytes([0xFF, marker]))
    return at + 4, at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")


def damaged(fmt: str, damage: str) -> bytes:
    data = encoded(RGB, fmt)
    if damage == "flip pixels":  # PNG: bytes of the IDAT stream (libpng: a segfault in torchvision 0.29)
        return flipped(data, 48, 88)
    if damage == "flip end":  # PNG: the end of the compressed pixel stream, before its checksum
        return flipped(data, len(data) - 30, len(data) - 20)
    if damage == "flip huffman table":  # JPEG: the first DHT segment's code counts and symbols
        return flipped(data, *jpeg_segment(data, 0xC4))
    if damage == "flip frame header":  # JPEG: SOF0's precision, size and components
        return flipped(data, *jpeg_segment(data, 0xC0))
    if damage == "truncate":
        return data[: len(data) // 2]
    return data[:40] + bytes(200)  # garbage


DAMAGE = {
    "PNG": ["flip pixels", "flip end", "truncate", "garbage"],
    # Flipped bytes in JPEG's quantisation tables or entropy-coded data still decode (libjpeg and Pillow
    # conceal them, see the next test), so JPEG is damaged where the decoder must refuse it.
    "JPEG": ["flip huffman table", "flip frame header", "truncate", "garbage"],
}


@pytest.mark.parametrize("fmt,damage", [(fmt, damage) for fmt, cases in DAMAGE.items() for damage in cases])
def test_damaged_images_raise_the_same_data_error_and_never_crash(fmt, damage):
    data = damaged(fmt, damage)
    if fmt == "PNG":
        assert not png_is_sound(data)
    with pytest.raises(Exception) as pil:  # every case really is damaged: PIL itself refuses it
        pil_pixels(data, 3)
    with pytest.raises(DataError, match=r"^where: image does not decode \(") as caught:
        decode_image(data, 3, (19, 23), "where")
    assert str(pil.value).split(" <")[0] in str(caught.value)  # PIL's message (minus a BytesIO's address)


@pytest.mark.parametrize("start,stop", [(48, 88), (-30, -20)], ids=["quantisation table", "entropy data"])
@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_damage_the_decoders_conceal_gives_pils_pixels(start, stop, channels):
    """Damage JPEG decoders conceal (wrong pixels, no error) is no error here either, and the fast path
    still returns exactly what PIL makes of it."""
    data = encoded(RGB, "JPEG")
    data = flipped(data, start % len(data), stop % len(data))
    out = decode_image(data, channels, (19, 23), "x")
    assert np.array_equal(out, pil_pixels(data, channels))
    assert not np.array_equal(out, pil_pixels(encoded(RGB, "JPEG"), channels))  # the damage did show


def test_a_size_mismatch_is_the_same_error():
    with pytest.raises(DataError, match="where: image is 23x19, index says 5x4"):
        decode_image(encoded(RGB, "PNG"), 3, (4, 5), "where")


def test_collate_is_uint8_nhwc_and_takes_views():
    items = [(np.full((4, 5, 3), i, np.uint8).transpose(1, 0, 2).copy().transpose(1, 0, 2), i) for i in range(3)]
    images, labels = collate(items)
    assert images.dtype.is_floating_point is False and tuple(images.shape) == (3, 4, 5, 3)
    assert images[2].eq(2).all() and labels.tolist() == [0, 1, 2]
