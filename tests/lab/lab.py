#!/usr/bin/env python3
"""Traffic for ktrace's network-namespace lab (stdlib only).

  lab.py server PORT [ADDR]       echo server on ADDR:PORT (0.0.0.0; "::" for
                                  IPv6); a line "OOW"
                                  makes it answer "ok" and then send one
                                  segment far outside the TCP window from its
                                  own address (the reply conntrack will mark
                                  INVALID and leave un-NATed)
  lab.py client HOST PORT N       opens N connections, echoes once on each,
                                  prints {"ports": [...]}, then obeys lines on
                                  stdin: "oow" (ask the server for an
                                  out-of-window segment on every connection),
                                  "send" (send on every connection and print
                                  {"results": {port: "ok"|"reset"|...}}),
                                  "oowc" (send, from this side, one segment
                                  far outside the window on every
                                  connection, acking what was received: the
                                  request conntrack will mark INVALID),
                                  "abort" (close with SO_LINGER 0: an
                                  application reset), "close" (close
                                  cleanly), "quit"
  lab.py refuse HOST PORT N       N connection attempts that are refused

Only ever talks to addresses inside the lab's own namespaces.
"""
import json
import socket
import struct
import sys
import threading
import time

SOL_TCP = 6
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2


def queue_seq(sock, queue):
    sock.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, queue)
    return struct.unpack("I", sock.getsockopt(SOL_TCP, TCP_QUEUE_SEQ, 4))[0]


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def pseudo_header(src, dst, length):
    """The TCP checksum's pseudo-header, IPv4 or IPv6 by the address."""
    if ":" in src:
        return (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
                + struct.pack("!IxxxB", length, 6))
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, length)


def send_out_of_window(conn, peer=None):
    """Sends one ACK|PSH segment from this socket's address with a sequence
    number 1 GiB past what the peer expects (SEQ over the upper bound),
    acking exactly what this socket received (so a reset answering it is
    in this socket's window)."""
    local, peer = conn.getsockname(), peer or conn.getpeername()
    conn.setsockopt(SOL_TCP, TCP_REPAIR, 1)
    snd_nxt = queue_seq(conn, TCP_SEND_QUEUE)
    rcv_nxt = queue_seq(conn, TCP_RECV_QUEUE)
    conn.setsockopt(SOL_TCP, TCP_REPAIR, 0)
    payload = b"x"
    seq = (snd_nxt + (1 << 30)) & 0xFFFFFFFF
    hdr = struct.pack("!HHIIBBHHH", local[1], peer[1], seq, rcv_nxt, 5 << 4, 0x18, 65535, 0, 0)
    pseudo = pseudo_header(local[0], peer[0], len(hdr) + len(payload))
    csum = checksum(pseudo + hdr + payload)
    hdr = hdr[:16] + struct.pack("!H", csum) + hdr[18:]
    if ":" in local[0]:
        # IPv6 raw sockets leave the TCP checksum to us (computed above).
        raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
        raw.bind((local[0], 0))
    else:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    raw.sendto(hdr + payload, (peer[0], 0))
    raw.close()


def serve_conn(conn):
    f = conn.makefile("rb")
    try:
        for line in f:
            if line.strip() == b"OOW":
                conn.sendall(b"ok\n")
                time.sleep(0.3)  # let the client's ACK of "ok" arrive
                send_out_of_window(conn)
            else:
                conn.sendall(line)
    except OSError:
        pass
    finally:
        conn.close()


def server(port, addr):
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if ":" in addr:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    s.listen(512)
    print("listening", flush=True)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve_conn, args=(conn,), daemon=True).start()


def client(host, port, n):
    conns = []
    for _ in range(n):
        c = socket.create_connection((host, port), timeout=5)
        c.sendall(b"hi\n")
        assert c.recv(16) == b"hi\n"
        conns.append(c)
    ports = [c.getsockname()[1] for c in conns]
    print(json.dumps({"ports": ports}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "oow":
            for c in conns:
                c.sendall(b"OOW\n")
                c.recv(16)
            print(json.dumps({"oow": len(conns)}), flush=True)
        elif cmd == "send":
            results = {}
            for c, p in zip(conns, ports):
                try:
                    c.sendall(b"again\n")
                    data = c.recv(16)
                    results[p] = "ok" if data == b"again\n" else "closed"
                except ConnectionResetError:
                    results[p] = "reset"
                except socket.timeout:
                    results[p] = "timeout"
                except OSError as e:
                    results[p] = "error: %s" % e
            print(json.dumps({"results": results}), flush=True)
        elif cmd == "oowc":
            for c in conns:
                send_out_of_window(c)
            print(json.dumps({"oowc": len(conns)}), flush=True)
        elif cmd == "abort":
            for c in conns:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()
            print(json.dumps({"aborted": len(conns)}), flush=True)
        elif cmd == "close":
            for c in conns:
                c.close()
            print(json.dumps({"closed": len(conns)}), flush=True)
        elif cmd == "quit":
            return


def refuse(host, port, n):
    refused = 0
    for _ in range(n):
        try:
            socket.create_connection((host, port), timeout=2).close()
        except ConnectionRefusedError:
            refused += 1
    print(json.dumps({"refused": refused}), flush=True)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "server":
        server(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "0.0.0.0")
    elif cmd == "client":
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "refuse":
        refuse(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("unknown command " + cmd)
