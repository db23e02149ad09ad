"""training.ood_reference: the trainers fit their network's OOD reference from their own data (the tile model's and
the classifier's are checked in test_train.py and test_train_classifier.py)."""

import numpy as np
import yaml

from calciscope.data.slides import open_slide
from calciscope.data.tissue import TissueConfig, detect_tissue
from calciscope.inference.ood import segmenter_windows as predict_windows
from calciscope.model.segmenter import load_segmenter
from calciscope.training.ood_reference import segmenter_windows
from calciscope.training.segmenter_data import load_config as load_segmenter_config
from calciscope.training.segmenter_data import load_slides
from calciscope.training.train_segmenter import train_segmenter


def test_train_vessels_fits_the_segmenters_reference_on_its_windows(tmp_path, vessel_phantoms):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("slide_id,patient_id,path\n" + "".join(
        f"{s.slide_id},{s.patient_id},{s.path}\n" for s in vessel_phantoms))
    config = tmp_path / "vessels.yaml"
    config.write_text(yaml.safe_dump({"manifest": "manifest.csv", "out": str(tmp_path / "out"), "steps": 10,
                                      "batch_size": 2, "crop_px": 96, "widths": [8, 16, 24], "val_fraction": 0.5}))
    model, card = load_segmenter(train_segmenter(load_segmenter_config(config)))
    ref = card.ood()
    assert ref.unit == "window" and ref.dim == 24 and ref.fit["n_validation_slides"] == 1
    # the windows are the ones predict runs the segmenter on (tissue decides which; the phantoms are 1 mm wide)
    slides = load_slides(load_segmenter_config(config), None)
    with open_slide(vessel_phantoms[0].path) as slide:
        expected = len(predict_windows(slide, detect_tissue(slide, TissueConfig()), card)[0])
    rows = segmenter_windows(model, card, next(s for s in slides if s.slide_id == vessel_phantoms[0].slide_id).rgb)
    assert rows.shape[1] == 24 and abs(len(rows) - expected) <= 2
    assert np.isfinite(ref.distances(rows)).all()
