"""Readers shared by prepare, predict and serve: NIfTI, DICOM(+SEG), NPZ and 2D images."""

from medsam3.io.case import Case, CaseError, CaseRef
from medsam3.io.discover import DiscoveryError, discover, find_datasets
from medsam3.io.read import read_case

__all__ = ["Case", "CaseError", "CaseRef", "DiscoveryError", "discover", "find_datasets", "read_case"]
