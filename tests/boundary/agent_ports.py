# Run inside a container: try every port of the guest agent (1024 the API,
# 1025 stdio, 1026 the log stream) through every vsock address a container
# could use to reach it: the loopback CID 1, the guest's own CID 3 and
# VMADDR_CID_ANY. On each connection it sends a real ttrpc request (Health
# Check, which the agent answers to the host) and prints one line per try:
#   <cid> <port> <outcome>
# connect-error:<errno> / connect-timeout: the connection was not made;
# closed: made, then closed by the peer without a byte; answered:<n>: the
# peer sent n bytes back; silent: made and held open without an answer.
import errno
import socket
import struct


def field(number, value):
    return bytes([number << 3 | 2, len(value)]) + value


def health_check_frame():
    request = (field(1, b"boxlite.agent.v1.Health") + field(2, b"Check")
               + field(3, b""))
    # ttrpc frame header: length, stream id, type 1 (request), flags.
    return struct.pack(">IIBB", len(request), 1, 1, 0) + request


for cid in (1, 3, socket.VMADDR_CID_ANY):
    for port in (1024, 1025, 1026):
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect((cid, port))
        except socket.timeout:
            outcome = "connect-timeout"
        except OSError as e:
            outcome = "connect-error:" + errno.errorcode.get(e.errno, str(e.errno))
        else:
            try:
                s.sendall(health_check_frame())
                got = s.recv(64)
                outcome = "answered:%d" % len(got) if got else "closed"
            except socket.timeout:
                outcome = "silent"
            except OSError as e:
                # A reset after the connect: the peer closed it.
                outcome = "closed" if e.errno in (errno.ECONNRESET, errno.EPIPE) \
                    else "error:" + errno.errorcode.get(e.errno, str(e.errno))
        finally:
            s.close()
        print(cid, port, outcome, flush=True)
