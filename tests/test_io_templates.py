"""Image templates and sectors (gpuflm.io.templates)."""

from __future__ import annotations

import os

import pytest

from conftest import shared_path

from gpuflm.errors import ImageFormatError, MissingImagesError
from gpuflm.io.templates import Sector, find_images, format_number_ranges, group_sectors, template_of
from gpuflm.models.experiment import template_path


@pytest.mark.parametrize(
    "name, template, number",
    [
        ("x_00012.cbf.gz", "x_#####.cbf.gz", 12),
        ("/d/l-cyst_01_00001.cbf", "/d/l-cyst_01_#####.cbf", 1),
        ("thau_3_2_0019.cbf.bz2", "thau_3_2_####.cbf.bz2", 19),
        ("example_004.cbf.gz", "example_###.cbf.gz", 4),
        ("image.0001", "image.####", 1),  # no extension after the number
        ("x_1.2.cbf", "x_1.#.cbf", 2),  # the last run of digits
        ("lyso_001.mar2300", "lyso_###.mar2300", 1),  # digits inside the extension are not the number
        ("data_000001.h5", "data_######.h5", 1),
        ("master.h5", "master.h5", None),
        ("Therm_6_2_master.h5", "Therm_6_2_master.h5", None),
        ("noext", "noext", None),
    ],
)
def test_template_of(name, template, number):
    assert template_of(name) == (template, number)
    if number is not None:
        assert template_path(template, number) == name  # and back


def test_find_images_lists_what_exists(tmp_path):
    for n in (1, 2, 3, 7, 12):
        (tmp_path / f"a_{n:04d}.cbf").write_bytes(b"")
    (tmp_path / "a_00005.cbf").write_bytes(b"")  # wider field: another template
    (tmp_path / "a_0004.cbf.gz").write_bytes(b"")  # another suffix
    (tmp_path / "b_0006.cbf").write_bytes(b"")
    assert find_images(tmp_path / "a_####.cbf") == [1, 2, 3, 7, 12]
    assert find_images(tmp_path / "a_#####.cbf") == [5]
    assert find_images(tmp_path / "nothing_##.cbf") == []
    with pytest.raises(ImageFormatError, match="folder"):
        find_images(tmp_path / "missing" / "a_####.cbf")


def test_l_cysteine_four_sweeps_are_four_sectors():
    images = shared_path("l_cysteine", "images")
    # one file of each sweep (any image), and a second file of sweep 1: still four sectors of 15 images
    picks = [images / "l-cyst_01_00003.cbf", images / "l-cyst_02_00015.cbf", images / "l-cyst_03_00001.cbf",
             images / "l-cyst_04_00009.cbf", images / "l-cyst_01_00010.cbf"]
    sectors = group_sectors(picks)
    assert [os.path.basename(s.template) for s in sectors] == [f"l-cyst_0{i}_#####.cbf" for i in (1, 2, 3, 4)]
    for s in sectors:
        assert s.image_numbers == tuple(range(1, 16)) and s.missing == ()
        assert os.path.isabs(s.template)
        assert os.path.exists(s.path_of(15))


def test_every_file_of_a_template_gives_one_sector():
    images = shared_path("l_cysteine", "images")
    all_files = sorted(images.glob("l-cyst_*.cbf"))
    assert len(all_files) == 60
    sectors = group_sectors(all_files)
    assert len(sectors) == 4 and all(len(s.image_numbers) == 15 for s in sectors)
    assert group_sectors(str(images / "l-cyst_02_#####.cbf")) == [sectors[1]]  # a template works too


def test_missing_images_are_reported(tmp_path):
    images = shared_path("l_cysteine", "images")
    for n in range(1, 16):
        if n not in (5, 9, 10, 11):
            os.symlink(images / f"l-cyst_01_{n:05d}.cbf", tmp_path / f"l-cyst_01_{n:05d}.cbf")
    (sector,) = group_sectors([tmp_path / "l-cyst_01_00001.cbf"])
    assert sector.missing == (5, 9, 10, 11)
    assert sector.runs() == [(1, 4), (6, 8), (12, 15)]
    with pytest.raises(MissingImagesError) as e:
        sector.require_complete()
    assert str(e.value) == f"images 5, 9-11 of {tmp_path / 'l-cyst_01_#####.cbf'} are missing"


def test_single_missing_image_wording(tmp_path):
    for n in (1, 3):
        (tmp_path / f"s_{n:03d}.img").write_bytes(b"")
    (sector,) = group_sectors([tmp_path / "s_001.img"])
    with pytest.raises(MissingImagesError, match=r"image 2 of .*s_###.img is missing"):
        sector.require_complete()


def test_unnumbered_file_is_its_own_sector(tmp_path):
    (tmp_path / "still.cbf").write_bytes(b"")
    (sector,) = group_sectors([tmp_path / "still.cbf"])
    assert sector == Sector(template=None, image_numbers=(1,), paths=(str(tmp_path / "still.cbf"),))
    assert sector.path_of(1) == str(tmp_path / "still.cbf")


def test_bad_inputs_name_the_path(tmp_path):
    with pytest.raises(ImageFormatError, match="no such file"):
        group_sectors([tmp_path / "x_0001.cbf"])
    with pytest.raises(ImageFormatError, match="is a folder"):
        group_sectors([tmp_path])
    with pytest.raises(MissingImagesError, match="no image on disk"):
        group_sectors([str(tmp_path / "x_####.cbf")])


def test_format_number_ranges():
    assert format_number_ranges([5, 9, 10, 11]) == "5, 9-11"
    assert format_number_ranges([3, 1, 2, 2]) == "1-3"
    assert format_number_ranges([]) == ""
