"""Register a DectrisLive device in the Tango database named by TANGO_HOST.

    python deploy/register.py INSTANCE DEVICE DCU_HOST [DCU_PORT]
"""
import sys

import tango


def main() -> None:
    if len(sys.argv) not in (4, 5):
        raise SystemExit(__doc__)
    instance, device, host = sys.argv[1:4]
    port = sys.argv[4] if len(sys.argv) == 5 else "80"
    info = tango.DbDevInfo()
    info.name, info._class, info.server = device, "DectrisLive", f"DectrisLive/{instance}"
    db = tango.Database()
    db.add_device(info)
    db.put_device_property(device, {"DcuHost": [host], "DcuPort": [port]})
    print(f"registered {device} in DectrisLive/{instance} (DCU {host}:{port}) on {db.get_db_host()}")


if __name__ == "__main__":
    main()
