#!/usr/bin/env python3
"""Traffic for the vmtest guest's lab that tests/lab/lab.py does not make
(stdlib only).

  vmlab.py attempt HOST PORT N TIMEOUT   N connection attempts, each given
                                         TIMEOUT seconds; prints
                                         {"connected": a, "timeout": b,
                                          "refused": c, "error": d}

Only ever talks to addresses inside the lab's own namespaces.
"""
import json
import socket
import sys


def attempt(host, port, n, timeout):
    counts = {"connected": 0, "timeout": 0, "refused": 0, "error": 0}
    held = []
    for _ in range(n):
        try:
            held.append(socket.create_connection((host, port), timeout=timeout))
            counts["connected"] += 1
        except socket.timeout:
            counts["timeout"] += 1
        except ConnectionRefusedError:
            counts["refused"] += 1
        except OSError:
            counts["error"] += 1
    print(json.dumps(counts), flush=True)
    for s in held:
        s.close()


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "attempt":
        attempt(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
    else:
        sys.exit("unknown command " + cmd)
