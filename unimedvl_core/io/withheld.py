"""No patient data in logs or on stderr through pydicom: its value checks quote the offending value in a log
record and a warning ("Invalid value for VR DA: '1961-07-04'."), and in a DICOM header such a value is
often a patient attribute (birth date, age, name). ``withhold_dicom_values`` makes those messages say which
value representation was wrong but not the value; the rest of pydicom's messages are left as they are."""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["withhold_dicom_values", "redact", "WITHHELD"]

WITHHELD = "<value withheld>"
# pydicom 3's messages that quote an element value (valuerep.py, jsonrep.py)
_QUOTING = (re.compile(r"(Invalid value for VR \w+: ).*", re.S),
            re.compile(r"(non-conformant value )'.*?'", re.S),
            re.compile(r"(Invalid value )'.*?'", re.S))
_WARNING_PATTERNS = (r"Invalid value for VR", r"Unable to convert non-conformant value", r"Invalid value '")


def redact(message: str) -> str:
    """``message`` with any quoted DICOM value replaced by ``WITHHELD``."""
    for pattern in _QUOTING:
        message = pattern.sub(lambda m: m.group(1) + WITHHELD, message)
    return message


class _WithheldValues(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def withhold_dicom_values() -> None:
    """Install the filter on pydicom's logger (once) and silence the duplicate warnings of those messages
    (the log record, without the value, still says what was wrong). Cheap and idempotent: called by every
    DICOM reader and writer, since a warnings context (pytest's, a caller's) may have reset the filters."""
    logger = logging.getLogger("pydicom")
    if not any(isinstance(f, _WithheldValues) for f in logger.filters):
        logger.addFilter(_WithheldValues())
    for pattern in _WARNING_PATTERNS:
        warnings.filterwarnings("ignore", message=pattern)  # an identical filter is replaced, not repeated
