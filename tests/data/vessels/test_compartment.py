"""compartment: dermis vs subcutaneous fat from the empty-pixel fraction of the tissue-mask image."""

import numpy as np

from calciscope.data.slides import open_slide
from calciscope.data.tissue import detect_tissue
from calciscope.data.vessels.compartment import DERMIS, FAT, OUTSIDE, compartment_map
from calciscope.data.vessels.truth import read_vessels


def _maps(slides):
    maps = []
    for slide in slides:
        with open_slide(slide.path) as s:
            maps.append(compartment_map(detect_tissue(s)))
    return maps


def test_agreement_with_the_phantom_compartment_of_each_vessel(vessel_phantoms):
    """The label at each vessel's vertex mean vs the phantom's ``compartment`` (fat below a depth line, dermis
    above). The defaults were picked on 8 phantoms, these 2 among them (fat_fraction on the other 6: 40
    vessels, agreement 0.95); 6 held-out phantoms gave 0.94 (32 vessels). Here: 14 of 15 (0.93): all 11 fat
    vessels, 3 of 4 dermis vessels (the miss is a dermal capillary 11 µm from the map's dermis-fat boundary).
    So few dermis vessels make the dermis rate rough."""
    agree = []
    for slide, cmap in zip(vessel_phantoms, _maps(vessel_phantoms)):
        for v in read_vessels(slide.vessels_path):
            agree.append(cmap.compartment_at(*v.polygon.mean(0)) == v.compartment)
    assert len(agree) == 15 and np.mean(agree) >= 0.9


def test_labels_cover_tissue_only_and_lookups_outside_are_none(vessel_phantoms):
    slide = vessel_phantoms[0]
    with open_slide(slide.path) as s:
        mask = detect_tissue(s)
    cmap = compartment_map(mask)
    assert cmap.labels.shape == mask.tissue.shape and cmap.downsample == mask.downsample
    assert set(np.unique(cmap.labels)) <= {OUTSIDE, DERMIS, FAT} and (cmap.labels[~mask.tissue] == OUTSIDE).all()
    assert (cmap.labels == FAT).any() and (cmap.labels == DERMIS).any()
    assert cmap.compartment_at(-1, 5) is None and cmap.compartment_at(10 * slide.size_px, 5) is None
