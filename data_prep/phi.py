"""DICOM de-identification by allow-list.

Only the attributes below are ever copied out of a DICOM header; everything else, including
all of PS3.15's Basic Application Level Confidentiality Profile (patient name, id, birth date,
sex, age, accession number, institution, physicians, station, every date and time, every UID,
study and series descriptions, free-text comments) is dropped by construction. Values are
re-checked: an allowed attribute whose value looks like a date, a UID or a person name is
dropped too, and burned-in annotation is flagged.
"""
from __future__ import annotations

import re

# keyword -> name in our metadata. Technical, non-identifying attributes only.
ALLOWED = {
    "Modality": "modality",
    "BodyPartExamined": "body_part",
    "ViewPosition": "view",
    "ImageLaterality": "laterality",
    "Laterality": "laterality",
    "PatientPosition": "patient_position",
    "PixelSpacing": "pixel_spacing",
    "ImagerPixelSpacing": "imager_pixel_spacing",
    "SliceThickness": "slice_thickness",
    "SpacingBetweenSlices": "spacing_between_slices",
    "PhotometricInterpretation": "photometric",
    "BitsStored": "bits_stored",
    "Rows": "rows",
    "Columns": "columns",
    "NumberOfFrames": "num_frames",
    "KVP": "kvp",
    "ImageType": "image_type",
    "ConvolutionKernel": "kernel",
    "MagneticFieldStrength": "field_strength",
    "EchoTime": "echo_time",
    "RepetitionTime": "repetition_time",
}

# A sample of what the Basic Profile removes, kept for tests and for the log's assurance line.
BASIC_PROFILE_EXAMPLES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                          "AccessionNumber", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
                          "StationName", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime",
                          "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
                          "StudyID", "StudyDescription", "SeriesDescription", "OperatorsName",
                          "PerformingPhysicianName", "DeviceSerialNumber", "OtherPatientIDs")

_UID = re.compile(r"^\d+(\.\d+){3,}$")
_DATE = re.compile(r"^(19|20)\d{6}")
_NAME = re.compile(r"\^")


def _plain(value):
    """pydicom values -> JSON-able plain values."""
    from pydicom.valuerep import PersonName

    if isinstance(value, PersonName):
        return None  # never a person name
    if isinstance(value, (list, tuple)) or value.__class__.__name__ == "MultiValue":
        out = [_plain(v) for v in value]
        return None if any(v is None for v in out) else out
    if isinstance(value, (int, float)):
        return float(value) if isinstance(value, float) else int(value)
    if isinstance(value, bytes):
        return None
    try:
        f = float(value)  # DS / IS strings
        return int(f) if f.is_integer() and "." not in str(value) else f
    except (TypeError, ValueError):
        s = str(value).strip()
        if _UID.match(s) or _DATE.match(s) or _NAME.search(s):
            return None
        return s


def safe_metadata(ds) -> dict:
    """The allow-listed, value-checked attributes of a pydicom Dataset."""
    meta = {}
    for keyword, name in ALLOWED.items():
        if keyword in ds and ds[keyword].value not in (None, ""):
            value = _plain(ds[keyword].value)
            if value not in (None, "", []):
                meta[name] = value
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        meta["burned_in_annotation"] = True  # pixels may show text: review before release
    return meta
