"""Make Debian's pytz importable inside Pyodide.

Debian patches pytz (python3-tz 2022.7.1) to read its time zones from the system folder
/usr/share/zoneinfo, and its import reads tzdata.zi (the database version) and
zone1970.tab (the common zones) from there. Pyodide's in-memory file system has no such
folder, so `import pytz`, and with it `import django`, fails with FileNotFoundError.

Inside Pyodide this module writes the files the example needs into that in-memory folder:
tzdata.zi with an unknown version, an empty zone1970.tab, and a UTC zone file, which
Django checks for when TIME_ZONE is "UTC". Each interpreter has its own in-memory file
system, so nothing on the host changes. Other zones stay unavailable: use UTC, or copy
the tzdata files there.
"""

import os
import struct
import sys
import warnings

ZONEINFO_DIR = "/usr/share/zoneinfo"


def prepare_pytz():
    """Write the zone files pytz needs when running in Pyodide, then import pytz."""
    if sys.platform == "emscripten" and not os.path.exists(os.path.join(ZONEINFO_DIR, "tzdata.zi")):
        write_minimal_zoneinfo(ZONEINFO_DIR)

    # pytz 2022.7.1 has a regular expression with an invalid escape sequence, which Python
    # 3.12 reports as a SyntaxWarning each time the module is compiled. Pyodide writes no
    # bytecode cache, so the warning would otherwise appear at every start.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=SyntaxWarning)
        import pytz  # noqa: F401


def write_minimal_zoneinfo(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tzdata.zi"), "w", encoding="utf-8") as version_file:
        version_file.write("# version unknown\n")
    with open(os.path.join(folder, "zone1970.tab"), "w", encoding="utf-8") as zone_table:
        zone_table.write("# No zones: only UTC is provided.\n")
    with open(os.path.join(folder, "UTC"), "wb") as zone_file:
        zone_file.write(build_utc_tzif())


def build_utc_tzif():
    """Return a TZif version 2 file (RFC 8536) for UTC: no transitions, one local time type."""
    designations = b"UTC\0"
    # Counts in header order: isutcnt, isstdcnt, leapcnt, timecnt, typecnt, charcnt.
    counts = struct.pack(">6l", 0, 0, 0, 0, 1, len(designations))
    header = b"TZif2" + bytes(15) + counts
    # One local time type: UT offset 0 seconds, not daylight saving time, designation "UTC".
    local_time_type = struct.pack(">lBB", 0, 0, 0)
    data_block = local_time_type + designations
    footer = b"\nUTC0\n"
    # Version 2 repeats the header and data block with 64-bit times. With no transitions
    # the two blocks are equal.
    return header + data_block + header + data_block + footer
