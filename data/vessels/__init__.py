"""Vessel geometry, the data every vessel stage builds on: read vessel annotations, turn a vessel-wall map into
instances, measure them in µm, match them to truth, and tell dermis from subcutaneous fat.

Every polygon is an (N, 2) float array of level-0 (x, y) pixels; every mask says its downsample of level 0
(pixel convention in :mod:`calciscope.data.vessels.frames`); sizes are in µm and areas in µm².
"""

from calciscope.data.vessels.compartment import CompartmentConfig, CompartmentMap, compartment_map
from calciscope.data.vessels.instances import InstanceConfig, vessel_instances
from calciscope.data.vessels.match import MatchResult, match_vessels, polygon_iou
from calciscope.data.vessels.measure import Shape, VesselGeometry, measure_vessel, measure_vessel_mask, shape_of
from calciscope.data.vessels.truth import Vessel, lumen_ring, read_vessels, ring_mask

__all__ = [
    "CompartmentConfig", "CompartmentMap", "compartment_map", "InstanceConfig", "vessel_instances", "MatchResult",
    "match_vessels", "polygon_iou", "Shape", "VesselGeometry", "measure_vessel", "measure_vessel_mask", "shape_of",
    "Vessel", "lumen_ring", "read_vessels", "ring_mask",
]
